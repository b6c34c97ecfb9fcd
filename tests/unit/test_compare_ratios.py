"""bench/compare.py's comparison lines over several rounds (pure: made-up rows, nothing is run)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
compare = pytest.importorskip("compare")


def row(system: str, nodes: int, name: str, round_no: int, delivered: float, node_cpu: float) -> dict:
    return {"system": system, "nodes": nodes, "row": name, "round": round_no, "delivered_per_s": delivered,
            "node_cpu_us_per_msg": node_cpu, "platform_cpu_us_per_msg": node_cpu * 2, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0}}


def by_what(items: list[dict]) -> dict[str, dict]:
    return {item["what"]: item for item in items}


def test_each_round_has_its_own_ratio_and_the_median_is_of_the_ratios_not_of_the_sums():
    rows = []
    # ours/peer per round: 10,000/5,000 = 2.0, 12,000/3,000 = 4.0, 9,000/3,000 = 3.0
    for rn, ours, peer in ((1, 10000, 5000), (2, 12000, 3000), (3, 9000, 3000)):
        rows += [row("ours", 2, "batch", rn, ours, 40.0 + rn), row("peer", 2, "emit", rn, peer, 200.0)]
    rows.append(row("ours", 2, "single", 1, 1500, 300.0))

    got = by_what(compare.ratios(rows, [2]))

    assert [got[f"2 nodes: delivered msg/s, ours batch vs peer, round {rn}"]["ours/peer"] for rn in (1, 2, 3)] == [2.0, 4.0, 3.0]
    median = got["2 nodes: delivered msg/s, ours batch vs peer, median of 3 rounds"]
    assert median["ours/peer"] == 3.0 and median["ours"] == 10000 and median["peer"] == 3000 and median["median"]
    # CPU per message: the median only; single against the first round's peer row
    assert "2 nodes: node CPU µs per delivered msg, ours batch vs peer, round 1" not in got
    assert got["2 nodes: node CPU µs per delivered msg, ours batch vs peer, median of 3 rounds"]["ours"] == 42.0
    assert got["2 nodes: delivered msg/s, ours single vs peer"]["ours/peer"] == 0.3


def test_node_growth_per_round_and_median_and_a_round_missing_a_row_is_left_out():
    rows = []
    for rn, at2, at4 in ((1, 40.0, 60.0), (2, 50.0, 50.0), (3, 40.0, 48.0)):
        rows += [row("ours", 2, "batch", rn, 1, at2), row("ours", 4, "batch", rn, 1, at4)]
    rows.pop()  # round 3 has no 4-node row

    got = by_what(compare.ratios(rows, [2, 4]))

    what = "ours batch: node CPU µs/msg at 4 nodes / at 2 nodes"
    assert got[f"{what}, round 1"]["growth"] == 1.5 and got[f"{what}, round 2"]["growth"] == 1.0
    assert f"{what}, round 3" not in got
    assert got[f"{what}, median of 2 rounds"]["growth"] == 1.25


def test_one_round_keeps_the_plain_lines():
    rows = [row("ours", 2, "batch", 1, 9000, 40.0), row("peer", 2, "emit", 1, 3000, 200.0)]

    got = by_what(compare.ratios(rows, [2]))

    assert got["2 nodes: delivered msg/s, ours batch vs peer"]["ours/peer"] == 3.0
    assert not any("round" in what for what in got)
