"""Text that came from outside, shown as one line of a log or an error (:func:`printable`).  Pure;
any thread.

Auth shows PyJWT's messages with it, which quote parts of a token's header before any signature is
checked; a push node shows auth's answers with it, which it logs and sends as close reasons.  Both
services import it from here: it belongs to neither.
"""

from __future__ import annotations

#: The most characters :func:`printable` keeps by default.
MAX_CHARS = 200


def printable(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` as one line of printable ASCII, at most ``limit`` characters: line breaks, other
    control characters and non-ASCII written as Python escapes (``\\n``, ``\\x1b``, ``\\ud800``),
    the rest as it is.  For text anyone could have written (``Unsupported critical extension:
    <name>`` from a token's header): a line break in it would forge a log line, and a lone
    surrogate, which no UTF-8 encoder takes, made a node answer such a handshake 500 and leave such
    a refresh unanswered.  Text shown this way once is left as it is.  Pure."""
    if not (text.isascii() and text.isprintable()):
        # Character by character, so that text shown this way once is left as it is (a backslash
        # is printable): a node shows auth's reasons with this too.
        text = "".join(char if char.isascii() and char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."
