"""Username rules shared by server and client (docs/wire.md, "Usernames").

A username is 3-32 characters after NFKC normalisation and lower-casing, drawn from ``[a-z0-9._-]``
and starting with a letter or a digit. The client normalises before sending; the server refuses a
name that is not already in normal form, so one account never has two spellings on the wire.
"""

from __future__ import annotations

import re
import unicodedata

from .errors import INVALID_USERNAME, ProtocolError

MIN_LENGTH = 3
MAX_LENGTH = 32
_PATTERN = re.compile(rf"[a-z0-9][a-z0-9._-]{{{MIN_LENGTH - 1},{MAX_LENGTH - 1}}}")


def normalize_username(name: str) -> str:
    """Return the normal form of ``name`` (NFKC, lower case, trimmed) or raise ``invalid_username``."""
    if not isinstance(name, str):
        raise ProtocolError(INVALID_USERNAME, "username must be a string")
    if len(name) > 4 * MAX_LENGTH:  # bound the normalisation work on hostile input
        raise ProtocolError(INVALID_USERNAME, f"username longer than {MAX_LENGTH} characters")
    normal = unicodedata.normalize("NFKC", name.strip()).lower()
    if not MIN_LENGTH <= len(normal) <= MAX_LENGTH:
        raise ProtocolError(INVALID_USERNAME, f"username must be {MIN_LENGTH}-{MAX_LENGTH} characters")
    if _PATTERN.fullmatch(normal) is None:
        raise ProtocolError(
            INVALID_USERNAME,
            "username may contain only a-z, 0-9, '.', '_', '-' and must start with a letter or digit",
        )
    return normal


def require_normalized(name: str) -> str:
    """Accept ``name`` only if it is already in normal form (what the server expects on the wire)."""
    normal = normalize_username(name)
    if normal != name:
        raise ProtocolError(
            INVALID_USERNAME, f"username is not in normal form (send {normal!r}, normalised by the client)"
        )
    return name


# Look-alike folds (Unicode TR39 "skeleton", restricted to what a valid name can hold). Valid names
# are ASCII after NFKC and lower-casing (`_PATTERN`), so the non-ASCII confusables of TR39's
# confusables.txt cannot occur; what is left are its ASCII entries (0 -> o, 1/i/l -> l, rn -> m,
# vv -> w) plus separators that read as nothing at the end of a name. "rn" folds first.
_SKELETON_FOLDS = (("rn", "m"), ("vv", "w"), ("0", "o"), ("1", "l"), ("i", "l"))


def skeleton(name: str) -> str:
    """The look-alike form of a valid username: two names with equal skeletons are easily confused.

    Used by the relay's registration (refuse a name confusable with an existing or reserved one) and
    by the client's new-contact warning. ``name`` must be valid (``normalize_username``).
    """
    folded = normalize_username(name)
    for old, new in _SKELETON_FOLDS:
        folded = folded.replace(old, new)
    stripped = folded.rstrip("._-")
    # Separators inside a name are kept: "bob.smith" and "bobsmith" are different people, but a
    # trailing "_" is easy to miss on screen.
    return stripped or folded
