"""Which admin key an ``Authorization: Bearer`` header carries: ``AUTH_ADMIN_KEY`` (index 0) or one
of ``AUTH_ADMIN_KEY_PREVIOUS`` during a rotation (``auth.app.matching_key``).  Pure."""

from __future__ import annotations

from auth.app import matching_key

KEYS = (b"current-admin-key-0123456789", b"previous-admin-key-0123456789", b"older-admin-key-0123456789")


def test_the_current_key_and_every_previous_one_is_found_by_its_place():
    assert [matching_key(key, KEYS) for key in KEYS] == [0, 1, 2]


def test_a_key_that_is_none_of_them_is_not_found():
    assert matching_key(b"current-admin-key-012345678", KEYS) is None
    assert matching_key(b"current-admin-key-0123456789x", KEYS) is None
    assert matching_key(b"", KEYS) is None


def test_with_no_previous_key_only_the_current_one_is_found():
    assert matching_key(KEYS[0], KEYS[:1]) == 0
    assert matching_key(KEYS[1], KEYS[:1]) is None
