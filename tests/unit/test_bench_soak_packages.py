"""bench/soak.py refuses at once, saying what to install, when its client process's package
(``websockets``, from bench/requirements.txt) is missing, instead of running for its minutes with
no client (pure: nothing is started; the missing package is made up)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
soak = pytest.importorskip("soak")


def test_soak_refuses_a_run_when_its_clients_package_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(soak, "CLIENT_MODULE", "no_such_module_for_the_soak")
    with pytest.raises(SystemExit) as exc:
        soak.parse_args([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_module_for_the_soak" in err and "pip install -r bench/requirements.txt" in err


def test_soak_runs_with_its_clients_package_installed():
    pytest.importorskip(soak.CLIENT_MODULE)
    assert soak.parse_args(["--minutes", "1"]).minutes == 1
