#!/usr/bin/env python
"""What one push node spends per delivery, against the rate it delivers at and against how many
envelopes each of its queue messages carries.

One command (from anywhere; the repository root is found from this file)::

    python bench/nodecost.py [--users 200] [--seconds 4] [--rates 1000,3000,6000] [--envelopes 50]
                             [--at-rate 3000] [--sizes 1,5,25,100] [--json out.json]

It starts the private cluster of ``bench/e2e.py`` (its own redis-server, auth, one Celery worker,
two push nodes, ``--users`` raw WebSocket clients in one process that ack every message), then
publishes ``wsnode.deliver`` batches straight to node A's queue with ``tasks.dispatch.publish``,
as Dispatch does, each envelope for one random user of node A, paced to a rate.  No business
process and no Collect: what is measured is the node alone (its loop, its queue thread, its
publisher thread sending the ``acked`` receipts), from its threads' run times in nanoseconds
(``common.ProcSampler``) before and after each row.

Two series:

- ``--rates`` at ``--envelopes`` envelopes per queue message: the cost per delivery against the
  node's load.  A node's loop handles what is ready at each wake-up together (one write per
  connection for its frames, one read for the acks a connection sent meanwhile), so the busier
  it is the less a delivery costs;
- ``--sizes`` envelopes per queue message at ``--at-rate``: the cost of a queue message itself.
  If a queue message cost ``F`` and a delivery ``E``, a row would cost ``E + F / size`` per
  delivery.

Why it exists: ``compare.py`` reports each system's node CPU per delivered message at 2 and at 4
nodes.  At 4 nodes, ours' nodes each deliver about half as many messages a second, in queue
messages of half as many envelopes.  These two series tell those two effects apart.

Every row checks that every envelope was delivered (``delivered``: the distinct envelopes of the
row received, = ``expected``) and none twice (``duplicates``); a row that lost or duplicated any is
flagged, the temporary folder is kept and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (puts the repository on sys.path too)
from common import ProcSampler  # noqa: E402
from tasks.ids import IdGenerator  # noqa: E402


def parse_list(text: str, kind=int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


class RowReceipts:
    """The receipts of one row, whose envelopes have the seqs ``seq0`` .. ``seq0 + count - 1``, each
    for one user (one connection): ``delivered`` counts the distinct seqs of the row received,
    ``duplicates`` the receipts of a seq already received, ``stray`` the receipts of other seqs
    (late frames of the row before)."""

    def __init__(self, seq0: int, count: int) -> None:
        self.seqs = range(seq0, seq0 + count)
        self.got: set[int] = set()
        self.duplicates = self.stray = 0

    def add(self, records: list[tuple]) -> None:
        """``records``: the client process's [(conn index, id, seq, t_send, t_recv)]."""
        for record in records:
            seq = record[2]
            if seq not in self.seqs:
                self.stray += 1
            elif seq in self.got:
                self.duplicates += 1
            else:
                self.got.add(seq)

    @property
    def delivered(self) -> int:
        return len(self.got)


def run_row(bench: e2e.Bench, publish, address: str, users: list[str], clock: ProcSampler, rate: float, size: int,
            seconds: float, seq: int, settle: float) -> tuple[dict, int]:
    """Publish ``rate`` envelopes/s in queue messages of ``size`` for ``seconds`` to ``address``;
    returns the row and the next sequence number.  ``clock`` reads the node's CPU (as ``"node"``)."""
    ids = IdGenerator()
    bench.take()  # drop anything left from before
    batches = max(1, int(rate * seconds / size))
    clock.start(f"{rate:g}/s in {size}s")
    t0 = time.monotonic()
    receipts = RowReceipts(seq, batches * size)
    expected = 0
    for i in range(batches):
        now = time.time()
        envelopes = [{"id": mid, "to": [random.choice(users)], "data": {"t": now, "seq": seq + j, "u": None}, "ts": now}
                     for j, mid in enumerate(ids.next_ids(size))]
        seq += size
        expected += size
        publish(address, envelopes)
        delay = t0 + (i + 1) * size / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    sent_seconds = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        receipts.add(bench.take()[0])
        if receipts.delivered >= expected:
            break
        time.sleep(0.1)
    time.sleep(settle)  # the acks of the last messages, and their receipts task
    receipts.add(bench.take()[0])
    cpu = clock.end()["node"]["cpu_s"]
    elapsed = time.monotonic() - t0  # the window of cpu: publishing, the wait for the receipts, the settle
    delivered = receipts.delivered
    return {
        "rate": rate, "size": size, "queue_messages": batches, "expected": expected, "delivered": delivered,
        "duplicates": receipts.duplicates, "stray": receipts.stray,
        "achieved_rate": round(expected / sent_seconds, 1),
        "node_cpu_us_per_delivery": round(cpu * 1e6 / max(delivered, 1), 1),
        "node_cpu_us_per_queue_message": round(cpu * 1e6 / batches, 1),
        "node_cpu_percent": round(cpu / elapsed * 100, 1),
        "seconds": round(elapsed, 3),
    }, seq


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| envelopes/s asked | achieved | envelopes per queue msg | queue msgs | delivered/expected |   dup | node CPU µs per delivery | node CPU µs per queue msg | node % of a core |")
    print("|------------------:|---------:|------------------------:|-----------:|-------------------:|------:|-------------------------:|--------------------------:|-----------------:|")
    for r in rows:
        counts = f"{r['delivered']:,}/{r['expected']:,}" + ("" if r["delivered"] == r["expected"] else " LOST")
        dup = f"{r['duplicates']:,}" + (" DUP" if r["duplicates"] else "")
        print(f"| {r['rate']:17,.0f} | {r['achieved_rate']:8,.0f} | {r['size']:23d} | {r['queue_messages']:10,d} | "
              f"{counts:>18} | {dup:>5} | {r['node_cpu_us_per_delivery']:24.1f} | "
              f"{r['node_cpu_us_per_queue_message']:25.1f} | {r['node_cpu_percent']:16.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=200, help="WebSocket clients over the 2 nodes (default 200); node A holds half")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of publishing per row (default 4)")
    parser.add_argument("--rates", default="1000,3000,6000", help="envelopes/s of the first series (default 1000,3000,6000)")
    parser.add_argument("--envelopes", type=int, default=50, help="envelopes per queue message in the first series (default 50)")
    parser.add_argument("--at-rate", type=float, default=3000, help="envelopes/s of the second series (default 3000)")
    parser.add_argument("--sizes", default="1,5,25,100", help="envelopes per queue message of the second series (default 1,5,25,100)")
    parser.add_argument("--rounds", type=int, default=2, help="times each series is run, one after the other (default 2): the spread is the noise")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after a row's last publish before its CPU is read (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and its logs")
    args = parser.parse_args()

    bench = e2e.Bench(argparse.Namespace(users=args.users, log_level="INFO", flower=None, keep=args.keep))
    bad = False
    clock: ProcSampler | None = None
    try:
        bench.start_cluster()
        users = bench.start_clients()
        # This process publishes as a worker does: the Celery app and settings of the cluster.
        for name in ("BROKER_URL", "REDIS_URL", "RESULT_BACKEND", "DATA_DIR", "AUTH_URL"):
            if name in bench.env:
                os.environ[name] = bench.env[name]
        from tasks.dispatch import publish  # imports worker: the Celery app, with the settings above

        node = bench.nodes[0]
        address = f"127.0.0.1:{node.port}"
        mine = [user for i, user in enumerate(users) if i % 2 == 0]  # e2e puts user i on node i mod 2
        started = time.strftime("%Y-%m-%d %H:%M %Z")
        # The node's threads' run times, in nanoseconds: psutil's clock ticks (10 ms) were about 2 % of a
        # row's node CPU at 1,000 envelopes/s.
        clock = ProcSampler()
        clock.add("node", node.pid, children="threads")
        seq = 0
        _, seq = run_row(bench, publish, address, mine, clock, 1000, 10, 1.0, seq, args.settle)  # warm-up, not reported
        by_rate, by_size = [], []
        for _ in range(max(1, args.rounds)):
            for rate in parse_list(args.rates, float):
                row, seq = run_row(bench, publish, address, mine, clock, rate, args.envelopes, args.seconds, seq, args.settle)
                by_rate.append(row)
            for size in parse_list(args.sizes):
                row, seq = run_row(bench, publish, address, mine, clock, args.at_rate, size, args.seconds, seq, args.settle)
                by_size.append(row)
        print(f"nodecost {started}, {os.cpu_count()} cores, node A holds {len(mine)} of {len(users)} users, {args.seconds:g} s per row")
        order = {"rate": parse_list(args.rates, float), "size": parse_list(args.sizes)}
        print_table(f"Against the rate ({args.envelopes} envelopes per queue message), {args.rounds} round(s):",
                    sorted(by_rate, key=lambda r: order["rate"].index(r["rate"])))
        print_table(f"Against envelopes per queue message (at {args.at_rate:,.0f} envelopes/s), {args.rounds} round(s):",
                    sorted(by_size, key=lambda r: order["size"].index(r["size"])))
        lost = any(r["delivered"] < r["expected"] for r in by_rate + by_size)
        duplicated = any(r["duplicates"] for r in by_rate + by_size)
        if args.json:
            args.json.write_text(json.dumps({"started": started, "by_rate": by_rate, "by_size": by_size}, indent=2))
        if lost or duplicated:
            bad = bench.keep = True
            what = " and ".join(w for w, flag in (("not delivered", lost), ("delivered twice", duplicated)) if flag)
            print(f"some envelopes were {what}: see the logs kept below", file=sys.stderr)
    finally:
        if clock is not None:
            clock.stop()
        bench.stop_all()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
