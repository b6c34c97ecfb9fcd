"""Sign and check the tokens browsers present to push nodes.

Pure: no I/O, no clock; the caller passes ``now`` (unix seconds).  Any thread.

A token is a JWT signed with HS256 carrying:

- ``sub``: the user id;
- ``iat``: when it was issued, unix seconds with microsecond precision (a JSON number such as
  ``1732712345.123456``; NumericDate may be fractional), so that revoking a user's tokens at time T
  spares a token issued even a millisecond after T;
- ``exp``: when it stops working, whole unix seconds (``ceil(iat + ttl)``);
- ``jti``: a random id, the key of a per-token revocation.

``verify`` checks the signature and the claims, then ``exp`` against the ``now`` it is given; it
accepts HS256 only (never ``none``).  Revocation is not checked here: see ``auth.revocations``.

Secret rotation: ``issue`` signs with the one secret it is given (``AUTH_SECRET``); ``verify`` also
takes the ``previous`` secrets (``AUTH_SECRET_PREVIOUS``), tried in order only after the current
one's signature did not match, so a token signed with the current secret costs what it did
without them.  A token signed with a previous secret gives the same claims (its ``jti`` and
``iat``, which revocations key on), marked ``signed_with_previous``.
"""

from __future__ import annotations

import itertools
import math
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

from auth import AuthError
from logtext import printable

ALGORITHM = "HS256"
MAX_USER_ID_LENGTH = 128
REQUIRED_CLAIMS = ("sub", "jti", "iat", "exp")
#: The most characters of PyJWT's message that a ``malformed (...)`` reason shows (:func:`logtext.printable`).
MAX_REASON_CHARS = 200

# Whitespace, control, format (invisible) and surrogate characters may not appear in a user id.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})


class InvalidUserId(AuthError):
    """A user id is not a non-empty string of at most 128 visible characters without whitespace."""


class TokenError(AuthError):
    """A token cannot be accepted; the message says why, without the token itself."""


class TokenExpired(TokenError):
    """The token was valid but its ``exp`` has passed: the client needs a new token.  ``claims``:
    what the token says (its signature checked), for revoking it all the same."""

    def __init__(self, message: str, claims: Claims | None = None) -> None:
        super().__init__(message)
        self.claims = claims


class TokenInvalid(TokenError):
    """The token was not issued by this service with this secret, or is damaged."""


@dataclass(frozen=True)
class IssuedToken:
    token: str
    #: Whole unix seconds at which the token stops working.
    expires_at: int
    jti: str


@dataclass(frozen=True)
class Claims:
    user_id: str
    jti: str
    #: Unix seconds, microsecond precision.
    issued_at: float
    #: Whole unix seconds at which the token stops working.
    expires_at: int
    #: Signed with one of the ``previous`` secrets ``verify`` was given, not the current one.
    signed_with_previous: bool = False

    @property
    def issued_at_us(self) -> int:
        """``issued_at`` in whole unix microseconds, exact (the unit of user revocation cutoffs)."""
        return round(self.issued_at * 1_000_000)


def forbidden_character(user_id: str) -> str | None:
    """The first character of ``user_id`` that a user id may not hold (whitespace, control,
    format or surrogate), or None.  Also what ``tasks.collect`` checks of its recipients, so that
    no message is stored for an id no token can carry.  Pure."""
    if user_id.isprintable() and " " not in user_id:
        return None  # a printable string without spaces holds none of them (str.isprintable: C speed)
    for char in user_id:
        if char.isspace() or unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            return char
    return None


def check_user_id(user_id: object) -> str:
    """Return ``user_id`` if it is acceptable, else raise ``InvalidUserId`` saying what is expected."""
    expected = f"expected a user id: a string of 1 to {MAX_USER_ID_LENGTH} characters without whitespace, control, format (invisible) or surrogate characters"
    if not isinstance(user_id, str):
        raise InvalidUserId(f"{expected}, got {type(user_id).__name__}")
    if not user_id:
        raise InvalidUserId(f"{expected}, got an empty string")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise InvalidUserId(f"{expected}, got {len(user_id)} characters")
    char = forbidden_character(user_id)
    if char is not None:
        raise InvalidUserId(f"{expected}, got {user_id[:40]!r} which contains {char!r}")
    if user_id == "*":
        raise InvalidUserId(f"{expected}, got '*', which means 'every user online' to tasks.collect: choose another id")
    return user_id


def issue(secret: str, user_id: str, now: float, ttl: int) -> IssuedToken:
    """Sign a token for ``user_id`` issued at ``now`` that expires ``ttl`` seconds later (rounded up)."""
    check_user_id(user_id)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise ValueError(f"ttl={ttl!r}: expected a whole number of seconds greater than 0")
    issued_at = math.floor(now * 1_000_000) / 1_000_000
    expires_at = math.ceil(issued_at + ttl)
    jti = secrets.token_urlsafe(12)
    claims = {"sub": user_id, "iat": issued_at, "exp": expires_at, "jti": jti}
    token = jwt.encode(claims, secret, algorithm=ALGORITHM)
    return IssuedToken(token=token, expires_at=expires_at, jti=jti)


def verify(secret: str, token: object, now: float, previous: Sequence[str] = ()) -> Claims:
    """The claims of ``token`` if it is signed with ``secret`` (or, failing that, one of the
    ``previous`` secrets, in order) and not expired at ``now``.

    Raises ``TokenExpired`` or ``TokenInvalid``; messages never contain the token.
    """
    if not isinstance(token, str) or not token:
        raise TokenInvalid(f"expected a non-empty string, got {type(token).__name__ if not isinstance(token, str) else 'an empty string'}")
    if not token.isascii():
        # A JWT is base64url and dots.  PyJWT encodes the text first, and a lone surrogate (which
        # JSON's \ud800 escape carries) raised UnicodeEncodeError out of it: a 500, for a whole list.
        raise TokenInvalid("malformed (not ASCII: a token is base64url text and dots)")
    for index, key in enumerate(itertools.chain((secret,), previous)):  # previous read only when needed
        try:
            payload = _decode(token, key)
        except jwt.InvalidSignatureError:
            continue  # another secret may have signed it; anything else is wrong whichever did
        return _claims(payload, now, signed_with_previous=index > 0)
    raise TokenInvalid("signature does not match (signed with another secret, or altered)")


def _decode(token: str, key: str) -> dict:
    """The payload of ``token`` signed with ``key``; raises ``jwt.InvalidSignatureError`` when
    ``key`` did not sign it, ``TokenInvalid`` when it is wrong whatever the key."""
    try:
        return jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            # exp and iat are checked below, against the ``now`` we were given, not PyJWT's clock.
            options={"require": list(REQUIRED_CLAIMS), "verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )
    except jwt.InvalidSignatureError:
        raise
    except jwt.InvalidAlgorithmError:
        raise TokenInvalid(f"algorithm is not {ALGORITHM}") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenInvalid(f"missing claim {exc.claim!r}") from None
    except jwt.PyJWTError as exc:
        raise TokenInvalid(f"malformed ({printable(str(exc), MAX_REASON_CHARS)})") from None


def _claims(payload: dict, now: float, signed_with_previous: bool) -> Claims:
    user_id, jti, issued_at, expires_at = (payload[name] for name in REQUIRED_CLAIMS)
    try:
        check_user_id(user_id)
    except InvalidUserId:
        raise TokenInvalid("claim 'sub' is not a valid user id") from None
    if not isinstance(jti, str) or not jti:
        raise TokenInvalid("claim 'jti' is not a non-empty string")
    if isinstance(issued_at, bool) or not isinstance(issued_at, (int, float)) or not math.isfinite(issued_at):
        raise TokenInvalid("claim 'iat' is not a number of seconds")
    if isinstance(expires_at, bool) or not isinstance(expires_at, int):
        raise TokenInvalid("claim 'exp' is not a whole number of seconds")
    claims = Claims(user_id=user_id, jti=jti, issued_at=float(issued_at), expires_at=expires_at, signed_with_previous=signed_with_previous)
    if now >= expires_at:
        raise TokenExpired(f"token expired at {expires_at}", claims)
    return claims
