"""Which open connections a revocation announced by auth closes (``wsnode.revocations``), and
auth's own rule for reading its revocation list (``auth.revocations.revoked_by``).  Pure."""

from __future__ import annotations

import json

import pytest
from redis.exceptions import NoPermissionError

from auth.revocations import JTI_PREFIX, USER_PREFIX, revoked_by
from wsnode.auth import Identity
from wsnode.revocations import RecentRevocations, Revocation, covers, keys_of, parse

ALICE = Identity("alice", "jti-1", 1_000_000)


def test_a_token_revocation_covers_that_token_only():
    assert covers(Revocation("alice", token_id="jti-1"), ALICE)
    assert not covers(Revocation("alice", token_id="jti-2"), ALICE)
    assert not covers(Revocation("bob", token_id="jti-1"), ALICE)


def test_a_user_revocation_covers_the_tokens_issued_up_to_its_cutoff():
    assert covers(Revocation("alice", cutoff_us=1_000_000), ALICE)
    assert covers(Revocation("alice", cutoff_us=2_000_000), ALICE)
    assert not covers(Revocation("alice", cutoff_us=999_999), ALICE)
    assert not covers(Revocation("bob", cutoff_us=2_000_000), ALICE)


def test_a_token_without_an_issue_time_is_covered_by_its_users_revocation_as_the_list_check_covers_it():
    unknown = Identity("alice", "jti-1", None)

    assert covers(Revocation("alice", cutoff_us=1), unknown)
    assert revoked_by(None, b"1", unknown.issued_at_us or 0)  # what the node's check against the list does
    assert not covers(Revocation("bob", cutoff_us=1), unknown)


def test_a_connection_without_a_token_id_is_covered_by_nothing():
    assert not covers(Revocation("alice", cutoff_us=2_000_000), Identity("alice"))
    assert not covers(Revocation("alice", cutoff_us=2_000_000), None)


@pytest.mark.parametrize("body, expected", [
    ({"user_id": "alice", "token_id": "jti-1"}, Revocation("alice", token_id="jti-1")),
    ({"user_id": "alice", "cutoff_us": 5}, Revocation("alice", cutoff_us=5)),
])
def test_parse_reads_what_auth_publishes(body, expected):
    assert parse(json.dumps(body).encode()) == expected


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]", json.dumps({"user_id": "alice"}).encode(),
                                  json.dumps({"user_id": "alice", "token_id": "j", "cutoff_us": 5}).encode(),
                                  json.dumps({"user_id": 7, "token_id": "j"}).encode(), json.dumps({"user_id": "a", "cutoff_us": "5"}).encode()])
def test_parse_ignores_anything_else(data):
    assert parse(data) is None


def test_the_keys_of_a_connection_are_those_auth_reads_and_its_rule_decides():
    assert keys_of(ALICE) == (JTI_PREFIX + "jti-1", USER_PREFIX + "alice")
    assert revoked_by(b"1", None, 1_000_000)
    assert revoked_by(None, b"1000000", 1_000_000)
    assert not revoked_by(None, b"999999", 1_000_000)
    assert not revoked_by(None, None, 1_000_000)


def test_an_identity_comes_from_a_verify_answer_with_or_without_the_token_fields():
    assert Identity.from_answer({"user_id": "alice", "expires_at": 9, "token_id": "jti-1", "issued_at_us": 1_000_000}) == ALICE._replace(expires_at=9)
    assert Identity.from_answer({"user_id": "alice", "expires_at": 9}) == Identity("alice", expires_at=9)  # an auth of an earlier version
    assert Identity.from_answer({"user_id": "alice", "expires_at": True, "issued_at_us": "1"}) == Identity("alice")
    with pytest.raises(TypeError):
        Identity.from_answer({"user_id": 5})


def test_an_identity_is_expired_from_its_expiry_on_and_never_without_one():
    identity = Identity("alice", expires_at=1_000)

    assert not identity.expired(999.9)
    assert identity.expired(1_000) and identity.expired(1_001)
    assert not Identity("alice").expired(10**12)


def test_recent_revocations_cover_a_connection_that_binds_within_their_window_only():
    recent = RecentRevocations(seconds=10.0)
    recent.add(Revocation("alice", cutoff_us=2_000_000), now=100.0)
    assert recent.covering(ALICE, now=105.0)
    assert not recent.covering(Identity("bob", "jti-9", 1), now=105.0)
    assert not recent.covering(ALICE, now=110.5)  # forgotten after its window
    assert not recent.covering(ALICE, now=105.0)


def test_a_recent_revocation_is_kept_for_its_seconds_however_many_come_after_it():
    """A burst of revocations ("log everyone out") used to push the oldest out after 1,000, a
    moment after it came: a connection whose token it revoked, checked just before, was bound."""
    recent = RecentRevocations(seconds=10.0)
    recent.add(Revocation("alice", token_id="jti-1"), now=100.0)
    for n in range(5000):
        recent.add(Revocation(f"user-{n}", token_id=f"t-{n}"), now=100.5)
    assert recent.covering(ALICE, now=101.0)
    assert not recent.covering(ALICE, now=110.1)
    assert recent.covering(Identity("user-7", "t-7", 1), now=110.1)
    assert len(recent) == 5000
    assert not recent.covering(Identity("user-7", "t-7", 1), now=111.0) and len(recent) == 0


class _RefusingPubSub:
    """redis-py's asyncio PubSub against a user without the channel: SUBSCRIBE is sent without its
    answer read, and Redis's NOPERM comes with the next read."""

    async def subscribe(self, channel):
        pass

    async def get_message(self, timeout=None):
        raise NoPermissionError("this user has no permissions to access one of the channels used as arguments")

    async def aclose(self):
        pass


async def test_a_user_without_the_channel_is_told_once_and_never_as_subscribed_again(monkeypatch, caplog):
    """The listener took SUBSCRIBE for done when it was sent: it logged "subscribed ... again" and
    "no subscription ..." (and checked every connection against the revocation list) once a second."""
    import asyncio
    import logging

    import wsnode.revocations as revocations

    monkeypatch.setattr(revocations, "RESUBSCRIBE_SECONDS", 0.01)
    resubscribed = []

    async def on_resubscribed():
        resubscribed.append(1)

    listener = revocations.RevocationListener("redis://push-app:pw@127.0.0.1:1/1", "test", lambda revocation: None, on_resubscribed)
    monkeypatch.setattr(listener._redis, "pubsub", lambda **kw: _RefusingPubSub())
    with caplog.at_level(logging.INFO, logger="wsnode.revocations"):
        listener.start()
        await asyncio.sleep(0.3)
        await listener.stop()
    lines = [record.getMessage() for record in caplog.records]
    assert len([line for line in lines if "no subscription to" in line]) == 1, lines
    assert not [line for line in lines if "subscribed to" in line and "again" in line] and not resubscribed and not listener.subscribed
