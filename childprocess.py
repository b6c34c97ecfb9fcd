"""One child process of the platform's launcher (:mod:`launcher`): started in its own process
group from the repository root, its output in a log file or echoed behind a ``name |`` prefix, its
readiness waited for, and stopped with its group.

Each :class:`Service` is driven from one thread; its reader thread only copies output.  Errors are
:class:`LauncherError`.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

REPO_ROOT = Path(__file__).resolve().parent
_COLOURS = (36, 33, 35, 32, 34, 31, 96, 93, 95, 92)  # ANSI foreground codes, picked by Service(colour=i)


class LauncherError(RuntimeError):
    """A process could not be found, started, or did not become ready; the message says why."""


#: True while a Service creates its process.  A KeyboardInterrupt raised inside ``subprocess.Popen``
#: leaves a child that no one has a handle on (it ran on after ``cluster.py`` stopped, holding its
#: port): a signal handler calls :func:`interrupt_now_or_soon`, which records the interrupt then,
#: and ``Service.start`` raises it once the process is known, so that it is stopped.  Main thread.
_starting = False
_interrupted = False


def interrupt_now_or_soon() -> None:
    """For a signal handler that stops the program with KeyboardInterrupt: raise it now, or, while
    a Service creates its process, as soon as that process is known."""
    global _interrupted
    if _starting:
        _interrupted = True
        return
    raise KeyboardInterrupt


class Service:
    """One child process: ``argv`` run in ``cwd`` with ``env``, in a new process group.

    Output (stdout and stderr together) goes to ``log_path`` when given, else to ``stream``
    (default ``sys.stdout``) as ``name | line``, padded to ``width`` and coloured on a terminal.
    The last lines are also kept in memory for :meth:`log_tail` and :meth:`wait_log`.
    """

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, *,
                 cwd: str | Path = REPO_ROOT, log_path: str | Path | None = None,
                 stream: TextIO | None = None, width: int = 0, colour: int | None = None) -> None:
        self.name, self.argv, self.cwd = name, [str(a) for a in argv], Path(cwd)
        self.env = dict(os.environ if env is None else env)
        self.log_path = Path(log_path) if log_path is not None else None
        self._stream, self._width, self._colour = stream, width, colour
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=2000)
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def start(self) -> Service:
        if self._proc is not None:
            raise LauncherError(f"{self.name} was already started (pid {self.pid}); create a new Service")
        sink = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            sink = open(self.log_path, "a", encoding="utf-8")  # closed by the reader thread
        global _starting, _interrupted
        _starting = True  # an interrupt now is raised below, once the process is known (interrupt_now_or_soon)
        try:
            try:
                self._proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                if sink:
                    sink.close()
                raise LauncherError(f"cannot start {self.name} ({' '.join(self.argv)}): {exc}") from exc
            self._reader = threading.Thread(target=self._copy_output, args=(self._proc.stdout, sink),
                                            name=f"{self.name}-output", daemon=True)
            self._reader.start()
        finally:
            _starting = False
        if _interrupted:
            _interrupted = False
            raise KeyboardInterrupt
        return self

    def _copy_output(self, pipe, sink: TextIO | None) -> None:
        """Reader thread: one line at a time into the tail buffer and the file or stream."""
        stream = self._stream or sys.stdout
        prefix = f"{self.name:<{self._width}} | "
        if sink is None and self._colour is not None and stream.isatty():
            prefix = f"\x1b[{_COLOURS[self._colour % len(_COLOURS)]}m{prefix}\x1b[0m"
        out, lead = (sink, "") if sink is not None else (stream, prefix)
        try:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self._lock:
                    self._lines.append(line)
                if out is None:
                    continue
                try:
                    out.write(lead + line + "\n")
                    out.flush()
                except (OSError, ValueError):
                    # Our stream is gone (the terminal closed): keep reading the pipe, or the
                    # child would block writing its log, stopping included.
                    out = None
        except (OSError, ValueError):
            pass  # the pipe was closed under us: stop copying
        finally:
            pipe.close()
            if sink is not None:
                sink.close()

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of output, as one string."""
        with self._lock:
            return "\n".join(list(self._lines)[-n:])

    def wait_ready(self, check: Callable[[], object], timeout: float = 30.0, what: str = "ready") -> None:
        """Poll ``check()`` until it returns true; exceptions count as "not yet".

        Raises :class:`LauncherError` with the log tail at once if the process exits, or at ``timeout``.
        """
        deadline, last = time.monotonic() + timeout, None
        while True:
            exited = not self.alive
            if exited:
                self._join_reader(1.0)  # so the tail, and wait_log, see the last lines
            try:
                if check():
                    return
            except Exception as exc:  # noqa: BLE001 - any failure of a probe means "not yet"
                last = exc
            if exited:
                raise LauncherError(f"{self.name} exited with code {self.returncode} before it was {what}; "
                                    f"last output:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise LauncherError(f"{self.name} was not {what} after {timeout:g}s (last probe: {last!r}); "
                                    f"last output:\n{self.log_tail()}")
            time.sleep(0.1)

    def wait_http_ok(self, url: str, timeout: float = 30.0) -> None:
        """Wait until ``GET url`` answers 200 (no proxy is used)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def check() -> bool:
            with opener.open(url, timeout=2) as response:
                return response.status == 200

        self.wait_ready(check, timeout, what=f"answering 200 at {url}")

    def wait_log(self, substring: str, timeout: float = 30.0) -> None:
        """Wait until a line of output (since start) contains ``substring``."""
        def check() -> bool:
            with self._lock:
                return any(substring in line for line in self._lines)

        self.wait_ready(check, timeout, what=f"logging {substring!r}")

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit by itself and return its exit code (None on timeout)."""
        try:
            code = self._proc.wait(timeout) if self._proc else None
        except subprocess.TimeoutExpired:
            return None
        self._join_reader(2.0)
        return code

    def terminate(self, timeout: float = 10.0, hurry: threading.Event | None = None) -> int | None:
        """Stop the process and its whole group; return its exit code (None if never started).

        SIGTERM goes to the leader alone, so Celery's warm shutdown drains its own pool instead of
        having its pool children killed mid-task; if it is still running after ``timeout``, or
        once ``hurry`` is set, the group gets SIGKILL.  Whatever is left in the group then gets
        SIGTERM and, a second later, SIGKILL.
        """
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._signal(signal.SIGTERM, group=False)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._proc.wait(min(0.2, max(deadline - time.monotonic(), 0.0)))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
                        self._signal(signal.SIGKILL)
                        self._proc.wait()
                        break
        if self._signal(signal.SIGTERM):
            deadline = time.monotonic() + 1.0
            while self._signal(0) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._signal(signal.SIGKILL)
        self._join_reader(2.0)
        return self._proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole group at once (a crash), and wait for the leader."""
        if self._proc is None:
            return None
        self._signal(signal.SIGKILL)
        self._proc.wait()
        self._join_reader(2.0)
        return self._proc.returncode

    def _signal(self, signum: int, group: bool = True) -> bool:
        """Send ``signum`` to the group (pgid = leader pid) or the leader; False if nobody was there."""
        try:
            if group:
                os.killpg(self._proc.pid, signum)
            elif self._proc.poll() is None:
                os.kill(self._proc.pid, signum)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _join_reader(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout)
