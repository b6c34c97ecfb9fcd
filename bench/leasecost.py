"""What renewing one node's leases costs: ``python bench/leasecost.py [--users 10000]``.

Starts a private ``redis-server`` (``launcher.RedisServer``, a free port), has one
``wsnode.registry.Leases`` write ``--users`` leases, then renews them ``--rounds`` times and prints,
per renewal, the node's CPU (``time.process_time`` around ``Leases.renew``: redis-py's and the
loop's Python) and Redis's (the ``usec`` of ``EVALSHA`` in ``INFO commandstats``: the script calls'
own time), as the median and the range.  Nothing else is measured; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis.asyncio as aioredis  # noqa: E402

import launcher  # noqa: E402
from wsnode.registry import _SCRIPT_USERS, Leases  # noqa: E402


async def measure(url: str, users: int, rounds: int) -> tuple[list[float], list[float], int]:
    client = aioredis.Redis.from_url(url)
    try:
        leases = Leases(client, "127.0.0.1:9", 30.0)
        names = [f"user-{n}" for n in range(users)]
        await leases.register(names, node=True)
        await leases.renew(names)  # scripts loaded, connection made
        node_ms, redis_ms = [], []
        for _ in range(rounds):
            before = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("usec", 0)
            started = time.process_time()
            lapsed = await leases.renew(names)
            node_ms.append((time.process_time() - started) * 1000)
            after = (await client.info("commandstats"))["cmdstat_evalsha"]["usec"]
            redis_ms.append((after - before) / 1000)
            assert not lapsed, lapsed
        return node_ms, redis_ms, -(-users // _SCRIPT_USERS)
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with launcher.RedisServer() as server:
        node_ms, redis_ms, calls = asyncio.run(measure(server.url(0), args.users, args.rounds))
    for what, values in (("node CPU", node_ms), ("Redis", redis_ms)):
        print(f"{what}: median {statistics.median(values):.1f} ms, {min(values):.1f}-{max(values):.1f} ms "
              f"per renewal of {args.users} users ({calls} script calls; {statistics.median(values) / calls * 1000:.0f} us per call)")


if __name__ == "__main__":
    main()
