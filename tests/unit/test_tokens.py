"""Pure tests of ``auth.tokens``: plain strings and numbers in, claims or exceptions out."""

from __future__ import annotations

import base64
import json

import jwt
import pytest

from auth import AuthError
from auth import tokens
from auth.tokens import Claims, InvalidUserId, TokenError, TokenExpired, TokenInvalid

SECRET = "unit-test-secret-long-enough-for-hs512-as-well-0123456789abcdefghij"
OTHER_SECRET = "another-secret-also-with-32-bytes-or-more"
NOW = 1_700_000_000.25
TTL = 3600


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def signed(claims: dict, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def good_claims(**overrides) -> dict:
    claims = {"sub": "alice", "jti": "j1", "iat": NOW, "exp": int(NOW) + TTL}
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def test_a_token_issued_for_alice_verifies_as_alice():
    issued = tokens.issue(SECRET, "alice", NOW, TTL)

    claims = tokens.verify(SECRET, issued.token, NOW + 1)

    assert claims == Claims(user_id="alice", jti=issued.jti, issued_at=NOW, expires_at=issued.expires_at)


def test_issued_at_keeps_microseconds_and_never_rounds_up():
    now = 1_700_000_000.999_9996
    claims = tokens.verify(SECRET, tokens.issue(SECRET, "alice", now, TTL).token, now)

    assert claims.issued_at <= now
    assert claims.issued_at == pytest.approx(now, abs=2e-6)
    assert claims.issued_at_us / 1_000_000 == claims.issued_at


def test_expires_at_is_whole_seconds_at_least_ttl_after_issue():
    issued = tokens.issue(SECRET, "alice", NOW, TTL)

    assert isinstance(issued.expires_at, int)
    assert issued.expires_at == 1_700_000_000 + TTL + 1


def test_every_token_gets_its_own_jti():
    first, second = (tokens.issue(SECRET, "alice", NOW, TTL) for _ in range(2))

    assert first.jti != second.jti
    assert first.token != second.token


def test_a_token_still_verifies_just_before_it_expires():
    issued = tokens.issue(SECRET, "alice", NOW, TTL)

    assert tokens.verify(SECRET, issued.token, issued.expires_at - 0.001).user_id == "alice"


def test_a_token_is_expired_from_its_expiry_second_on():
    issued = tokens.issue(SECRET, "alice", NOW, TTL)

    for now in (issued.expires_at, issued.expires_at + 1000):
        with pytest.raises(TokenExpired):
            tokens.verify(SECRET, issued.token, now)


def test_expired_and_invalid_are_token_errors_and_auth_errors():
    assert issubclass(TokenExpired, TokenError) and issubclass(TokenInvalid, TokenError)
    assert issubclass(TokenError, AuthError) and issubclass(InvalidUserId, AuthError)


def test_a_tampered_signature_is_invalid():
    header, payload, signature = tokens.issue(SECRET, "alice", NOW, TTL).token.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]

    with pytest.raises(TokenInvalid, match="signature"):
        tokens.verify(SECRET, f"{header}.{payload}.{flipped}", NOW)


def test_a_payload_changed_to_another_user_is_invalid():
    header, _, signature = tokens.issue(SECRET, "alice", NOW, TTL).token.split(".")
    forged = f"{header}.{b64(good_claims(sub='mallory'))}.{signature}"

    with pytest.raises(TokenInvalid, match="signature"):
        tokens.verify(SECRET, forged, NOW)


def test_a_token_signed_with_another_secret_is_invalid():
    issued = tokens.issue(OTHER_SECRET, "alice", NOW, TTL)

    with pytest.raises(TokenInvalid, match="signature"):
        tokens.verify(SECRET, issued.token, NOW)


def test_an_unsigned_token_with_alg_none_is_invalid():
    unsigned = jwt.encode(good_claims(), None, algorithm="none")

    with pytest.raises(TokenInvalid, match="HS256"):
        tokens.verify(SECRET, unsigned, NOW)


def test_a_hand_made_alg_none_token_with_a_signature_is_invalid():
    forged = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(good_claims())}.c2ln"

    with pytest.raises(TokenInvalid):
        tokens.verify(SECRET, forged, NOW)


def test_a_token_signed_with_another_hmac_algorithm_is_invalid():
    with pytest.raises(TokenInvalid, match="HS256"):
        tokens.verify(SECRET, signed(good_claims(), algorithm="HS512"), NOW)


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c", "...", "é.é.é", "eyJhbGciOiJIUzI1NiJ9.!!!.sig", "a.b.c.d"])
def test_a_malformed_string_is_invalid(token):
    with pytest.raises(TokenInvalid):
        tokens.verify(SECRET, token, NOW)


@pytest.mark.parametrize("token", [None, 123, b"bytes", ["a.b.c"]])
def test_something_that_is_not_a_string_is_invalid(token):
    with pytest.raises(TokenInvalid, match="expected a non-empty string"):
        tokens.verify(SECRET, token, NOW)


@pytest.mark.parametrize("claim", ["sub", "jti", "iat", "exp"])
def test_a_signed_token_missing_a_claim_is_invalid(claim):
    with pytest.raises(TokenInvalid, match=f"missing claim '{claim}'"):
        tokens.verify(SECRET, signed(good_claims(**{claim: None})), NOW)


@pytest.mark.parametrize(
    "overrides",
    [{"sub": 42}, {"sub": "a b"}, {"jti": 7}, {"jti": ""}, {"iat": "yesterday"}, {"iat": True}, {"exp": "soon"}, {"exp": 1.5e9 + 0.5}, {"exp": True}],
)
def test_a_signed_token_with_a_claim_of_the_wrong_type_is_invalid(overrides):
    with pytest.raises(TokenInvalid):
        tokens.verify(SECRET, signed(good_claims(**overrides)), NOW)


def test_error_messages_never_contain_the_token():
    token = tokens.issue(OTHER_SECRET, "alice", NOW, TTL).token

    with pytest.raises(TokenInvalid) as caught:
        tokens.verify(SECRET, token, NOW)

    assert token not in str(caught.value)
    assert token.split(".")[2] not in str(caught.value)


@pytest.mark.parametrize("name", ["x\n2026-12-07 04:00:00,000 ERROR wsnode.app: forged", "\ud800", "\x1b[31m\u2028", "x" * 3000])
def test_a_header_naming_a_critical_extension_of_any_text_is_invalid_with_a_reason_of_one_printable_line(name):
    """PyJWT quotes the name in its message (``Unsupported critical extension: ...``) before any
    signature is checked: nodes log the reason and send it as a close reason."""
    header = {"alg": "HS256", "typ": "JWT", "crit": [name]}
    token = f"{b64(header)}.{b64(good_claims())}.c2ln"

    with pytest.raises(TokenInvalid) as raised:
        tokens.verify(SECRET, token, NOW)

    reason = str(raised.value)
    assert reason.startswith("malformed (Unsupported critical extension: "), reason
    assert reason.isascii() and reason.isprintable() and len(reason) < 300, reason


@pytest.mark.parametrize(
    "user_id",
    ["", " ", "al ice", "alice\n", "\talice", "a\x00b", "a\x7fb", "zero\u200bwidth", "nb\u00a0sp", "x" * 129, "*", None, 42, ["alice"]],
)
def test_a_bad_user_id_is_refused_with_what_was_expected(user_id):
    with pytest.raises(InvalidUserId, match="expected a user id"):
        tokens.issue(SECRET, user_id, NOW, TTL)


@pytest.mark.parametrize("user_id", ["zero\u200bwidth", "bom\ufeff", "lone\ud800surrogate"])
def test_a_user_id_refused_for_a_format_or_surrogate_character_is_told_that_such_characters_are_refused(user_id):
    """The error listed whitespace and control characters only: a zero-width space was refused
    "without whitespace or control characters", naming a character that is neither."""
    with pytest.raises(InvalidUserId, match=r"without whitespace, control, format \(invisible\) or surrogate characters"):
        tokens.issue(SECRET, user_id, NOW, TTL)


@pytest.mark.parametrize("user_id", ["alice", "x" * 128, "alice@example.com", "user:42", "用户", "Ünïcödé"])
def test_a_good_user_id_is_accepted(user_id):
    issued = tokens.issue(SECRET, user_id, NOW, TTL)

    assert tokens.verify(SECRET, issued.token, NOW).user_id == user_id


@pytest.mark.parametrize("ttl", [0, -1, 1.5, True])
def test_a_ttl_that_is_not_a_positive_whole_number_is_refused(ttl):
    with pytest.raises(ValueError, match="ttl"):
        tokens.issue(SECRET, "alice", NOW, ttl)


# --- secret rotation: AUTH_SECRET_PREVIOUS ------------------------------------------------------

PREVIOUS_SECRET = "previous-secret-retired-at-rotation-0123456789"


class ReadCount(list):
    """A list of secrets that counts how often it is read (pure: no mock, just a list)."""

    reads = 0

    def __iter__(self):
        self.reads += 1
        return super().__iter__()


def test_a_token_signed_with_a_previous_secret_still_verifies_marked_as_such():
    issued = tokens.issue(PREVIOUS_SECRET, "alice", NOW, TTL)

    claims = tokens.verify(SECRET, issued.token, NOW + 1, previous=[PREVIOUS_SECRET])

    assert claims == Claims(user_id="alice", jti=issued.jti, issued_at=NOW, expires_at=issued.expires_at, signed_with_previous=True)


def test_any_of_several_previous_secrets_verifies_its_tokens():
    previous = [OTHER_SECRET, PREVIOUS_SECRET]

    for secret in previous:
        assert tokens.verify(SECRET, tokens.issue(secret, "alice", NOW, TTL).token, NOW, previous=previous).signed_with_previous


def test_a_token_signed_with_the_current_secret_is_not_marked_and_never_reads_the_previous_ones():
    previous = ReadCount([PREVIOUS_SECRET])

    claims = tokens.verify(SECRET, tokens.issue(SECRET, "alice", NOW, TTL).token, NOW, previous=previous)

    assert claims.user_id == "alice" and not claims.signed_with_previous
    assert previous.reads == 0  # the hot path: one HMAC, as without previous secrets


def test_a_token_signed_with_a_secret_neither_current_nor_previous_is_invalid():
    issued = tokens.issue("an-unknown-secret-of-an-attacker-0123456789", "alice", NOW, TTL)

    with pytest.raises(TokenInvalid, match="signature does not match"):
        tokens.verify(SECRET, issued.token, NOW, previous=[PREVIOUS_SECRET, OTHER_SECRET])


def test_a_previous_secret_no_longer_given_verifies_nothing():
    issued = tokens.issue(PREVIOUS_SECRET, "alice", NOW, TTL)

    with pytest.raises(TokenInvalid, match="signature"):
        tokens.verify(SECRET, issued.token, NOW)


def test_a_token_signed_with_a_previous_secret_expires_as_any_other():
    issued = tokens.issue(PREVIOUS_SECRET, "alice", NOW, TTL)

    with pytest.raises(TokenExpired):
        tokens.verify(SECRET, issued.token, issued.expires_at, previous=[PREVIOUS_SECRET])


@pytest.mark.parametrize("overrides", [{"sub": None}, {"sub": "a b"}, {"exp": "soon"}])
def test_a_token_signed_with_a_previous_secret_has_its_claims_checked_as_any_other(overrides):
    with pytest.raises(TokenInvalid):
        tokens.verify(SECRET, signed(good_claims(**overrides), secret=PREVIOUS_SECRET), NOW, previous=[PREVIOUS_SECRET])


def test_a_token_signed_with_a_previous_secret_keeps_the_id_and_issue_time_revocations_key_on():
    from auth.revocations import revoked_by

    issued = tokens.issue(PREVIOUS_SECRET, "alice", NOW, TTL)
    claims = tokens.verify(SECRET, issued.token, NOW, previous=[PREVIOUS_SECRET])

    assert claims.jti == issued.jti
    assert revoked_by(None, round(NOW * 1_000_000), claims.issued_at_us)  # a user revocation made when it was issued
    assert not revoked_by(None, round(NOW * 1_000_000) - 1, claims.issued_at_us)


def test_new_tokens_are_signed_with_the_current_secret_only():
    issued = tokens.issue(SECRET, "alice", NOW, TTL)

    with pytest.raises(TokenInvalid, match="signature"):
        tokens.verify(PREVIOUS_SECRET, issued.token, NOW)


@pytest.mark.parametrize("user_id", ["\U0001f600" * tokens.MAX_USER_ID_LENGTH, "\u00e9" * tokens.MAX_USER_ID_LENGTH, "a" * tokens.MAX_USER_ID_LENGTH])
def test_the_refresh_frame_of_the_longest_token_fits_the_smallest_frame_limit_a_node_takes(user_id):
    """settings.MIN_FRAME_BYTES, the floor of MAX_FRAME_BYTES: a browser's refresh frame (push.js
    sends JSON.stringify's compact form) must pass a node's frame limit, with tokens issued until
    the year 2286 (ten-digit times) and a TTL of a year."""
    import settings

    issued = tokens.issue(SECRET, user_id, 9_999_999_999.999999 - 366 * 86400, 365 * 86400)
    frame = json.dumps({"type": "refresh", "token": issued.token}, separators=(",", ":")).encode()
    assert len(frame) <= settings.MIN_FRAME_BYTES
    if user_id.startswith("\U0001f600"):
        assert len(frame) > 2048, "not the longest token: the floor is checked against a shorter one"
