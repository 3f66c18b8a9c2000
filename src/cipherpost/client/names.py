"""Names that arrive from the network: the relay's own rule, and look-alike warnings.

A sender name in a ``deliver`` frame is whatever the relay says it is. It is used only if it is a
username exactly as the relay itself would accept one (``protocol/usernames.py:require_normalized``:
NFKC, lower case, ``[a-z0-9._-]``, 3-32 characters) and not the user's own name; anything else
(case, zero-width or other invisible characters, non-ASCII look-alikes, escape sequences) is refused
before it can be pinned, stored as a contact, or printed. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..protocol.errors import ProtocolError
from ..protocol.usernames import require_normalized, skeleton

MAX_SHOWN_NAME = 40   # characters of a refused name kept for the notice (escaped, never raw)


class InvalidSenderName(ValueError):
    """The relay delivered a message under a name that no account can have."""


def check_sender(name: object, own: str) -> str:
    """``name`` if it is a valid, normalised username other than ``own``; else InvalidSenderName."""
    if not isinstance(name, str):
        raise InvalidSenderName("the relay sent a message without a sender name")
    try:
        require_normalized(name)
    except ProtocolError:
        raise InvalidSenderName(f"the relay delivered a message under the invalid sender name "
                                f"{shown_name(name)}; refused, nothing was stored for that name") from None
    if name == own:
        raise InvalidSenderName("the relay delivered a message under your own name; refused")
    return name


def shown_name(name: str) -> str:
    """A refused name as ASCII (escapes visible), bounded: safe in a notice and in the database."""
    escaped = ascii(name[:MAX_SHOWN_NAME])
    return escaped + ("..." if len(name) > MAX_SHOWN_NAME else "")


def confusable_with(name: str, others: Iterable[str]) -> str | None:
    """An existing name that ``name`` is easily confused with (0/o, 1/l/i, rn/m, trailing
    separators), or None. ``others`` are valid usernames; ``name`` itself is not reported."""
    target = skeleton(name)
    for other in others:
        if other != name and skeleton(other) == target:
            return other
    return None


def confusable_warning(name: str, others: Iterable[str]) -> str | None:
    other = confusable_with(name, others)
    if other is None:
        return None
    return (f"'{name}' looks like your contact '{other}' but is a different account: check who this "
            "is before you trust it")
