"""bench/common.py's machine-speed probe, which every benchmark prints before and after its run: what
it reports from the timings (a fake timer, so nothing here depends on the machine's speed) and
how the heading says it."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
common = pytest.importorskip("common")


class FakeTimer:
    """timeit.Timer's two calls speed_ms makes, with set answers; records what it was asked."""

    made: list = []

    def __init__(self, stmt):
        self.stmt = stmt
        self.asked: list = []
        FakeTimer.made.append(self)

    def autorange(self):
        return 50, 0.21  # 50 loops take at least 0.2 s

    def repeat(self, repeat, number):
        self.asked.append((repeat, number))
        return [0.30, 0.25, 0.27][:repeat]


def test_speed_is_the_best_repeat_per_loop_in_milliseconds_of_the_probe(monkeypatch):
    FakeTimer.made = []
    monkeypatch.setattr(common.timeit, "Timer", FakeTimer)
    assert common.speed_ms(3) == pytest.approx(0.25 / 50 * 1000)  # 5 ms: the best of the three, not the mean
    (timer,) = FakeTimer.made
    assert timer.stmt == "sum(range(100000))"  # what bench/README.md and HISTORY.md quote as timeit
    assert timer.asked == [(3, 50)]  # each repeat runs the loop count autorange chose


def test_speed_line_says_the_probe_and_both_speeds_in_milliseconds():
    assert common.speed_line(1.3149, 1.36) == 'timeit "sum(range(100000))" 1.31 ms before, 1.36 after'
