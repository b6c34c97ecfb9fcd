"""How ``tasks.redis_transport`` tells, from the error of its read script, a server too old for a
read of several messages (``RPOP`` with a count, Redis 6.2), after which it reads one per ``BRPOP``."""

from __future__ import annotations

import pytest

from tasks.backlogread import _TAKE_MORE, count_unsupported, flags_unsupported


@pytest.mark.parametrize("error", [
    # what a script gets on Redis 3.x to 6.0 (through redis-py, which drops the "ERR ")
    "Error running script (call to f_5ab6...): @user_script:6: @user_script: 6: Wrong number of args calling Redis command From Lua script",
    # on Redis 7
    "Wrong number of args calling Redis command from script script: 93c0d894084e2bed479c3db6ef090d11ee083d7b, on @user_script:6.",
    # the command sent by a client
    "wrong number of arguments for 'rpop' command",
])
def test_a_server_without_rpops_count_is_told_by_its_arity_error(error):
    assert count_unsupported(error)


@pytest.mark.parametrize("error", [
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "Error running script (call to f_5ab6...): @user_script:6: user_script:6: Cannot serialise number: must not be NaN or Inf",
    "OOM command not allowed when used memory > 'maxmemory'.",
])
def test_other_errors_of_the_script_are_not_taken_for_it(error):
    assert not count_unsupported(error)


def test_a_server_without_script_flags_is_told_by_the_compile_error_of_the_first_line():
    # Redis 6 compiles the read script's "#!lua flags=allow-oom" line as Lua (through redis-py, without "ERR ")
    assert flags_unsupported("Error compiling script (new function): user_script:1: unexpected symbol near '#'")
    assert not flags_unsupported("OOM command not allowed when used memory > 'maxmemory'.")
    assert not flags_unsupported("Error compiling script (new function): user_script:9: '=' expected near 'x'")


def test_the_read_script_may_record_what_it_took_over_maxmemory():
    assert _TAKE_MORE.split("\n", 1)[0] == "#!lua flags=allow-oom"
