"""bench/compare.py and bench/capacity.py refuse at once, saying what to install, when the peer's
packages (bench/requirements.txt) are missing, instead of failing after ours' rows ran (pure:
nothing is started; the missing package is made up)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
common = pytest.importorskip("common")
compare = pytest.importorskip("compare")
capacity = pytest.importorskip("capacity")


@pytest.fixture
def peer_missing(monkeypatch):
    monkeypatch.setattr(common, "PEER_MODULES", {"no_such_module_for_the_peer": "python-nosuch"})


@pytest.fixture
def peer_installed(monkeypatch):
    monkeypatch.setattr(common, "PEER_MODULES", {"json": "json"})


def test_compare_refuses_a_run_with_the_peer_when_its_packages_are_missing(peer_missing, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.parse_args([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "python-nosuch" in err and "pip install -r bench/requirements.txt" in err and "--systems ours" in err


def test_compare_runs_ours_alone_without_the_peers_packages(peer_missing):
    assert compare.parse_args(["--systems", "ours"]).systems == ["ours"]


def test_compare_with_the_peers_packages_installed(peer_installed):
    assert compare.parse_args([]).systems == ["ours", "peer"]


@pytest.mark.parametrize("argv", [[], ["--system", "peer"]])
def test_capacity_refuses_a_run_with_the_peer_when_its_packages_are_missing(peer_missing, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        capacity.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "pip install -r bench/requirements.txt" in err and "--system ours" in err
