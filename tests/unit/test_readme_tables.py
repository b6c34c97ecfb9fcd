"""Pure tests that README.md's tables say what the code does: the configuration table against
``settings.py`` (which variables, their defaults) and the close-code table against
``wsnode/closecodes.py`` (which codes, their reasons).  No sockets, no processes.

The variables and their defaults are read from ``settings.py``'s source (``ast``): every call
whose first argument is ``_env`` and second a string literal reads that variable (``_read``,
``_secret_list``), and a ``_read``'s default is its literal, so the environment the test session
sets (tests/conftest.py) does not change what is compared.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import settings
from wsnode.closecodes import CloseCode

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SETTINGS_SOURCE = (ROOT / "settings.py").read_text(encoding="utf-8")

#: Close codes whose reason in ``closecodes.py`` the node never sends, so the README need not show
#: it: 1002 always names what was wrong with the client's close frame (``wsnode.wire.close_problem``),
#: and 1011 is reserved, not sent by this version (README and ``CloseCode.INTERNAL_ERROR`` say so).
REASONS_NEVER_SENT = {CloseCode.PROTOCOL_ERROR, CloseCode.INTERNAL_ERROR}


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of each row of the Markdown table of ``text`` whose header row starts with
    ``header`` (``| variable |``), without the header and its ``|---|`` line."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"README.md has no table whose header starts with {header!r}"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        # A cell may hold an escaped pipe (``\|``), which does not end it.
        rows.append([cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def documented_defaults(text: str) -> dict[str, str]:
    """Each variable of the configuration table, with its default cell as written; a row that
    names several variables (```PING_INTERVAL`, `PING_TIMEOUT```) gives each its own default
    (```25`, `20```) when the cell lists one per variable, else the whole cell to each."""
    documented: dict[str, str] = {}
    for variable_cell, _meaning, default_cell in table_rows(text, "| variable |"):
        names = backticked(variable_cell)
        defaults = [f"`{value}`" for value in backticked(default_cell)]
        each = defaults if len(names) > 1 and len(defaults) == len(names) else [default_cell] * len(names)
        for name, default in zip(names, each):
            assert name not in documented, f"README.md's configuration table lists {name} twice"
            documented[name] = default
    return documented


def settings_reads(source: str) -> dict[str, ast.Call]:
    """The call of ``settings.py`` that reads each environment variable, by the variable's name."""
    reads = {}
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id == "_env"
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            reads[node.args[1].value] = node
    return reads


def close_code_rows(text: str) -> dict[int, str]:
    """The close-code table's meaning cell, by code."""
    return {int(code): meaning for code, meaning, _client in table_rows(text, "| code | meaning |")}


READS = settings_reads(SETTINGS_SOURCE)
DOCUMENTED = documented_defaults(README)


def test_settings_py_reads_variables_at_all():
    # Guards the parsing above: an empty result would make every test below pass vacuously.
    assert {"REDIS_URL", "REDELIVER_AFTER", "AUTH_SECRET_PREVIOUS"} <= set(READS)


def test_every_variable_settings_reads_is_in_the_readme_table():
    missing = sorted(set(READS) - set(DOCUMENTED))
    assert not missing, f"settings.py reads {', '.join(missing)}, which README.md's configuration table does not list: add a row"


def test_every_variable_the_readme_table_lists_is_read_by_settings():
    unread = sorted(set(DOCUMENTED) - set(READS))
    assert not unread, f"README.md's configuration table lists {', '.join(unread)}, which settings.py does not read: drop the row"


@pytest.mark.parametrize("name", sorted(READS))
def test_the_readme_default_is_the_code_default(name):
    if name not in DOCUMENTED:
        pytest.skip(f"{name} is not in the README table (the test above fails for it)")
    check_default(name, DOCUMENTED[name], READS[name])


def check_default(name: str, cell: str, call: ast.Call) -> None:
    """Fail unless the README's default ``cell`` for ``name`` is what ``call`` (its read in
    settings.py) gives when the variable is unset."""
    helper = call.func.id if isinstance(call.func, ast.Name) else ast.unparse(call.func)
    if helper != "_read":
        # _secret_list: a comma-separated list, empty when unset.
        assert cell == "unset", f"{name}: README.md's default is {cell!r}, but settings.py reads it with {helper}, empty when unset: write 'unset'"
        return
    default, convert = call.args[2], call.args[3]
    if isinstance(default, ast.Name) and default.id.startswith("DEV_"):
        return  # a development value, described in words (the README must not print the secret)
    if isinstance(default, ast.Name):
        # Another setting's value (RESULT_BACKEND defaults to REDIS_URL), which the README names.
        assert cell == f"`{default.id}`", f"{name}: README.md's default is {cell!r}, but settings.py's is {default.id}'s value: write `{default.id}`"
        return
    code_default = eval(compile(ast.Expression(default), "settings.py", "eval"), {})  # a literal: 30.0, 1 << 20, ("*",)
    if cell == "unset":
        assert code_default is None, f"{name}: README.md's default is unset, but settings.py's is {code_default!r}"
        return
    values = backticked(cell)
    assert values, f"{name}: README.md's default {cell!r} holds no `value`, but settings.py's is {code_default!r}"
    # The README's value read as settings.py reads the variable: "30" is 30.0 for a float, "*" is
    # ("*",) for ALLOWED_ORIGINS, "0" is None (no limit) for MAX_USER_CONNECTS.
    converter = eval(compile(ast.Expression(convert), "settings.py", "eval"), vars(settings))
    try:
        documented = converter(values[0])
    except (TypeError, ValueError) as exc:
        pytest.fail(f"{name}: README.md's default {values[0]!r} is not a value settings.py accepts ({exc}); settings.py's is {code_default!r}")
    assert documented == code_default, f"{name}: README.md's default is {values[0]!r}, settings.py's is {code_default!r}"


def test_the_close_code_table_lists_exactly_the_codes_closecodes_defines():
    documented = set(close_code_rows(README))
    defined = {int(code) for code in CloseCode}
    assert documented == defined, (f"README.md's close-code table and wsnode/closecodes.py differ: only in the README "
                                   f"{sorted(documented - defined)}, only in the code {sorted(defined - documented)}")


@pytest.mark.parametrize("code", sorted(set(CloseCode) - REASONS_NEVER_SENT), ids=lambda code: f"{int(code)}-{code.name}")
def test_the_close_code_table_shows_the_reason_the_node_sends(code):
    meaning = close_code_rows(README).get(int(code))
    if meaning is None:
        pytest.skip(f"{int(code)} is not in the README table (the test above fails for it)")
    assert code.reason in backticked(meaning) or meaning.startswith(code.reason), (
        f"README.md's row for {int(code)} does not show the reason closecodes.py sends with it, {code.reason!r} "
        f"(as `{code.reason}`, or as the start of the row's meaning): {meaning[:120]!r}...")
