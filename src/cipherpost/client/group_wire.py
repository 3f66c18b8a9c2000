"""Group payloads (docs/groups.md): pure encode/decode, no I/O.

Control payloads travel inside ordinary 1:1 messages, as the plaintext kind ``"group"``::

    [1, "change", group_id, change]            an admin-signed change (group_state.Change)
    [1, "welcome", group_id, [change...]]      the whole log, to a new member
    [1, "state_req", group_id, have_version]   "I missed a change": answered with "state"
    [1, "state", group_id, [change...]]        the answerer's whole log
    [1, "skd", group_id, distribution]         the sender's SenderKeyDistribution
    [1, "resend_req", group_id, chain_id]      "I cannot decrypt your chain": answered with "skd"

Group messages (kind ``grp`` on the wire) carry a ``GroupMessage`` whose plaintext is
``pad(pack([1, "text", text, sent_at, sender, group_id, state_version]))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from ..crypto.encoding import pack, unpack
from ..crypto.errors import CryptoError
from .errors import ClientError

GROUP_PAYLOAD_VERSION: Final = 1
CONTROL_TYPES: Final = frozenset({"change", "welcome", "state_req", "state", "skd", "resend_req"})
MAX_TIMESTAMP_MS: Final = 1 << 53


class BadGroupPayload(ClientError):
    """A group payload that does not parse."""


@dataclass(frozen=True, slots=True)
class Control:
    type: str
    group_id: bytes
    value: Any


def encode_control(type_: str, group_id: bytes, value: Any) -> bytes:
    return pack([GROUP_PAYLOAD_VERSION, type_, group_id, value])


def decode_control(data: Any) -> Control:
    if not isinstance(data, bytes):
        raise BadGroupPayload("group payload is not bytes")
    try:
        a = unpack(data, what="group payload", max_size=1 << 20)
    except CryptoError as exc:
        raise BadGroupPayload(str(exc)) from None
    if (not isinstance(a, list) or len(a) != 4 or a[0] != GROUP_PAYLOAD_VERSION or a[1] not in CONTROL_TYPES
            or not isinstance(a[2], bytes) or len(a[2]) != 32):
        raise BadGroupPayload("malformed group payload")
    return Control(a[1], a[2], a[3])


def encode_text(text: str, sent_at: int, sender: str, group_id: bytes, version: int) -> bytes:
    return pack([GROUP_PAYLOAD_VERSION, "text", text, sent_at, sender, group_id, version])


def decode_text(data: bytes, *, sender: str, group_id: bytes) -> tuple[str, int, int]:
    """``(text, sent_at, version)``, checked against the relay's sender and the group."""
    try:
        a = unpack(data, what="group message", max_size=1 << 20)
    except CryptoError as exc:
        raise BadGroupPayload(str(exc)) from None
    if (not isinstance(a, list) or len(a) != 7 or a[0] != GROUP_PAYLOAD_VERSION or a[1] != "text"
            or not isinstance(a[2], str) or type(a[3]) is not int or not 0 <= a[3] < MAX_TIMESTAMP_MS
            or type(a[6]) is not int):
        raise BadGroupPayload("malformed group message")
    if a[4] != sender or a[5] != group_id:
        raise BadGroupPayload(f"the relay delivered it as from {sender}, but it was written by {a[4]!r} "
                              "or for another group; not shown")
    return a[2], a[3], a[6]
