"""The Auth service: issues, verifies and revokes the tokens browsers present to push nodes.

Run it with ``python -m auth``.  Modules:

- ``auth.tokens``: pure; sign and check tokens (PyJWT, HS256).
- ``auth.revocations``: the Redis revocation list (per token and per user); loop thread only.
- ``auth.app``: Tornado handlers and the ``AuthService`` wiring with ``start()``/``stop()``.
- ``auth.__main__``: settings, logging, signals.

Exception tree (every exception of this package derives from ``AuthError``)::

    AuthError
    ├── InvalidUserId            a user id is not a non-empty string of at most 128 printable,
    │                            non-space characters
    ├── TokenError
    │   ├── TokenExpired         the token's ``exp`` has passed
    │   └── TokenInvalid         bad signature, malformed, missing claims, or not HS256
    ├── RevocationsUnavailable   Redis did not answer, so revocation cannot be checked or recorded
    └── RevocationNotAnnounced   a revocation is recorded but its publish to the push nodes failed
"""


class AuthError(Exception):
    """Base of every exception raised by the ``auth`` package."""
