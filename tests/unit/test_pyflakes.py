"""The project's Python has no pyflakes warnings: no undefined name, no unused import or variable,
no redefinition, no f-string without a placeholder.

The files checked are those git tracks (``git ls-files``), so a virtualenv, a data folder or a
benchmark's temporary files are never read.  Where git or the repository is not there (an unpacked
archive), the test skips, saying why.
"""

from __future__ import annotations

import io
import shutil
import subprocess

import pytest
from pyflakes.api import checkPath
from pyflakes.reporter import Reporter

import launcher


def tracked_python_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the files to check are those git tracks")
    listed = subprocess.run(["git", "ls-files", "-z", "*.py"], cwd=launcher.REPO_ROOT, capture_output=True, timeout=30)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout ({listed.stderr.decode(errors='replace').strip()}): the files to check are those git tracks")
    return [str(launcher.REPO_ROOT / name) for name in listed.stdout.decode().split("\0") if name]


def test_the_tracked_python_files_have_no_pyflakes_warnings():
    files = tracked_python_files()
    assert len(files) > 100, f"git listed only {len(files)} Python files under {launcher.REPO_ROOT}"
    warnings, errors = io.StringIO(), io.StringIO()
    reporter = Reporter(warnings, errors)
    found = sum(checkPath(path, reporter) for path in files)
    said = (warnings.getvalue() + errors.getvalue()).strip()
    assert found == 0 and not said, f"pyflakes found {found} problem(s); fix them (run `.venv/bin/pyflakes $(git ls-files '*.py')`):\n{said}"
