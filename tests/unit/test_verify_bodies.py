"""How a push node cuts the tokens that came together into ``POST /verify`` bodies auth reads
(``wsnode.auth.within_body``).  Pure."""

from __future__ import annotations

import json

import pytest

from wsnode.auth import within_body


def body_bytes(tokens: list[str]) -> int:
    return len(json.dumps({"tokens": tokens}).encode())


@pytest.mark.parametrize("limit", [60, 200, 1000, 64 * 1024])
def test_every_body_fits_and_the_tokens_keep_their_order(limit):
    tokens = [f"t{n}-" + "\U0001F600é" * (n % 7) for n in range(300)]
    parts = within_body(tokens, limit)
    assert [token for part in parts for token in part] == tokens
    assert all(part for part in parts)
    assert all(body_bytes(part) <= limit for part in parts if len(part) > 1)


def test_short_tokens_go_in_one_body_and_long_ones_in_as_few_as_fit():
    assert within_body(["a", "b", "c"], 64 * 1024) == [["a", "b", "c"]]
    tokens = ["x" * 2000] * 100
    parts = within_body(tokens, 64 * 1024)
    assert [len(part) for part in parts] == [32, 32, 32, 4]
    assert body_bytes(parts[0]) <= 64 * 1024 < body_bytes(parts[0] + tokens[:1])  # full: one more would not fit


def test_a_token_longer_than_the_limit_goes_alone():
    assert within_body(["a", "y" * 100, "b"], 50) == [["a"], ["y" * 100], ["b"]]
