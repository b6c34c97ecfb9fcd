"""How a command stops on a bad setting: one line on stderr, exit status 2, no traceback.

``settings.py`` checks every variable as it is imported (and ``settings.check_secrets`` the auth
service's secrets, in production) and raises ``settings.SettingsError``, whose message names the
variable.  Left uncaught, that message came last in a Python traceback of ten lines (seventy under
Celery's "Couldn't import 'worker'"), with exit status 1.  Each command runs its imports under
:func:`exit_on_bad_settings` (auth its check of the secrets through :func:`refuse`), which prints
``PROG: error: MESSAGE``, as argparse does for a bad option of the same command, and exits with
:data:`EXIT_STATUS`, argparse's (and Celery's) for a command-line error:

- ``python -m auth``, ``python -m wsnode``, ``python -m demo`` and ``python cluster.py``, when run
  as the program (``__name__ == "__main__"``);
- ``worker.py``, when the ``celery`` command imports it as its app (``celery -A worker ...``): the
  ``SystemExit`` passes through Celery's loading of the app, which reports any ``Exception`` with
  its traceback.

Everything else that imports ``settings`` (the tests, library code, ``import worker`` in a
script) still gets ``SettingsError``, a ``ValueError``.  Main thread; nothing here reads a setting.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

#: Exit status of a command stopped by a bad setting: argparse's for a bad command line, as the
#: same commands give for a bad option (``--port 70000``).
EXIT_STATUS = 2


def is_settings_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``settings.SettingsError``; also one that stopped the import of
    ``settings``, which is then gone from ``sys.modules`` (so its class is known by its name)."""
    return any(cls.__module__ == "settings" and cls.__qualname__ == "SettingsError" for cls in type(exc).__mro__)


def refuse(prog: str, exc: BaseException) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` on stderr and exit with :data:`EXIT_STATUS`."""
    message = " ".join(str(exc).splitlines())  # one line, whatever the message holds
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_STATUS) from None


@contextmanager
def exit_on_bad_settings(prog: str, program: bool) -> Iterator[None]:
    """Run the block; a ``SettingsError`` in it ends the process (:func:`refuse`) when ``program``
    is true (the module is the command's own), and is raised as it is otherwise."""
    try:
        yield
    except ValueError as exc:
        if not (program and is_settings_error(exc)):
            raise
        refuse(prog, exc)


def imported_by_celery_command() -> bool:
    """Whether this process is the ``celery`` command (``celery ...``, ``python -m celery ...``),
    which imports the app module of ``-A`` itself; a process that only uses the app (a push node,
    a test, a script) never imports Celery's command line."""
    return "celery.bin.celery" in sys.modules
