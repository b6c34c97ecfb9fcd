"""bench/: stopping everything at the end of a run, also when a second Ctrl-C or SIGTERM interrupts
the stopping (fake actions; nothing is started: a real redis-server whose start
failed is in tests/integration/test_bench_redis_start.py)."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
common = pytest.importorskip("common")
e2e = pytest.importorskip("e2e")


def test_cleanup_runs_every_action_past_an_interruption_and_raises_it_again_at_the_end():
    done = []

    def interrupted():
        done.append("b")
        raise KeyboardInterrupt("second Ctrl-C")

    cleanup = common.Cleanup()
    for what, action in (("a", lambda: done.append("a")), ("b", interrupted), ("c", lambda: done.append("c"))):
        cleanup.push(what, action)
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        cleanup.run(reraise=True)
    assert done == ["c", "b", "a"]


class FakeService:
    def __init__(self, name: str, stopped: list, fail: BaseException | None = None) -> None:
        self.name, self.stopped, self.fail = name, stopped, fail

    def terminate(self, timeout: float = 10.0) -> None:
        self.stopped.append(self.name)
        if self.fail is not None:
            raise self.fail


def bench(keep: bool = False) -> "e2e.Bench":
    return e2e.Bench(argparse.Namespace(users=1, log_level="INFO", flower=None, keep=keep))


def test_e2e_stop_all_stops_every_service_and_removes_the_folder_past_a_second_ctrl_c(capsys):
    b = bench()
    stopped: list = []
    services = [FakeService("auth", stopped), FakeService("worker", stopped, KeyboardInterrupt("signal 15")), FakeService("node", stopped)]
    for service in services:
        b.cleanup.push(service.name, service.terminate)
    with pytest.raises(KeyboardInterrupt):
        b.stop_all()
    assert stopped == ["node", "worker", "auth"]
    assert not b.tmp.exists()
    assert "stopping worker failed: KeyboardInterrupt" in capsys.readouterr().err

