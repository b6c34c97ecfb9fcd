"""``python -m auth`` takes no options: ``--help`` answers and exits, any other argument is refused,
and neither starts the service (pure: ``serve`` is replaced; nothing listens)."""

import pytest

from auth import __main__ as auth_main


@pytest.fixture(autouse=True)
def no_serve(monkeypatch):
    async def serve():  # pragma: no cover - reached only by the bug this guards against
        raise AssertionError("the service was started")

    monkeypatch.setattr(auth_main, "serve", serve)


def test_help_says_the_settings_are_environment_variables_and_starts_nothing(capsys):
    with pytest.raises(SystemExit) as exc:
        auth_main.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "python -m auth" in out and "AUTH_PORT" in out


def test_an_argument_is_refused_not_ignored(capsys):
    with pytest.raises(SystemExit) as exc:
        auth_main.main(["--port", "9000"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --port 9000" in capsys.readouterr().err


def test_help_names_every_setting_the_service_reads(capsys):
    """The epilog lists the variables auth reads; REQUEST_TIMEOUT (6daf946) was left out of it."""
    import re
    from pathlib import Path

    source = Path(auth_main.__file__).read_text()
    read = {name for name in re.findall(r"settings\.([A-Z][A-Z_]+)\b", source) if not name.startswith("DEV_")}
    with pytest.raises(SystemExit):
        auth_main.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert read and not {name for name in read if name not in out}
