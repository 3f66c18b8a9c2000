"""The plaintext of a text message: what goes inside the ratchet's encryption, and its checks.

Pure functions, no I/O (STYLE.md habit 1); ``Client.send`` and the receive path call them.

Payload (msgpack, then padded)::

    pad([PLAINTEXT_VERSION, "text", text, sent_at_ms, written_by, written_for])

The names are inside the encryption, so a relay cannot relabel who wrote to whom. Padding is
ISO/IEC 7816-4 (0x80 then zeros) up to a multiple of :data:`PAD_BLOCK`, as Signal does, so the
ciphertext length shows only a bucket, not the exact length.

Size: one limit, :data:`MAX_TEXT_BYTES` (UTF-8 bytes), chosen so that the padded payload plus the
largest envelope overhead (the first message of a session carries the PQXDH initial message,
~1.3 KB; :data:`ENVELOPE_OVERHEAD` rounds it up) fits the relay's default body limit
(``protocol.frames.DEFAULT_MAX_BODY``). A relay configured with a smaller limit is honoured too
(:func:`check_outgoing`); the limit is checked before the ratchet moves.
"""

from __future__ import annotations

from typing import Any, Final

from ..crypto.encoding import expect_array, pack, unpack
from ..crypto.errors import CryptoError
from ..protocol.frames import DEFAULT_MAX_BODY
from .errors import ClientError

PLAINTEXT_VERSION: Final = 1
PAD_BLOCK: Final = 160   # plaintexts are padded to a multiple of this, as Signal does
MAX_TIMESTAMP_MS: Final = 1 << 53
# Initial message (ML-KEM-768 ciphertext 1,088 B, identity, ephemeral key, ids) + ratchet header +
# GCM tag + msgpack framing is ~1.3 KB; rounded up.
ENVELOPE_OVERHEAD: Final = 2048
# Worst case of the msgpack framing around the text: array, version, kind, str32 header, time,
# two names of up to 32 bytes.
PAYLOAD_FRAMING_MAX: Final = 1 + 1 + 5 + 5 + 9 + 2 * 33
MAX_TEXT_BYTES: Final = 60_000
# Whatever a peer sends, a payload larger than the largest envelope is never decoded.
MAX_PAYLOAD_BYTES: Final = 1 << 20


def _padded_len(n: int, block: int = PAD_BLOCK) -> int:
    return n + 1 + (-(n + 1) % block)


# The one limit fits the default relay body limit even for the first message of a session.
assert _padded_len(MAX_TEXT_BYTES + PAYLOAD_FRAMING_MAX) + ENVELOPE_OVERHEAD <= DEFAULT_MAX_BODY


class EmptyMessage(ClientError):
    """The text is empty or only whitespace; nothing was encrypted."""


class MessageTooLong(ClientError):
    """The text is longer than :data:`MAX_TEXT_BYTES` (or the relay's limit); nothing was encrypted."""


class InvalidPayload(ClientError):
    """A decrypted payload is malformed or was not written by and for the parties the relay named."""


def pad(data: bytes, block: int = PAD_BLOCK) -> bytes:
    """ISO/IEC 7816-4 padding (0x80 then zeros) up to a multiple of ``block``; the AEAD covers it."""
    return data + b"\x80" + bytes(-(len(data) + 1) % block)


def unpad(data: bytes) -> bytes:
    end = len(data.rstrip(b"\x00"))
    if end == 0 or data[end - 1] != 0x80:
        raise InvalidPayload("message padding is malformed")
    return data[: end - 1]


def text_limit(relay_max_body: int | None) -> int:
    """The longest text (UTF-8 bytes) that fits: :data:`MAX_TEXT_BYTES`, or less on a relay whose
    body limit is below the default."""
    if relay_max_body is None or relay_max_body >= DEFAULT_MAX_BODY:
        return MAX_TEXT_BYTES
    room = relay_max_body - ENVELOPE_OVERHEAD
    room -= room % PAD_BLOCK      # the padded payload must fit the room left
    return max(0, min(MAX_TEXT_BYTES, room - 1 - PAYLOAD_FRAMING_MAX))


def check_text(text: str, relay_max_body: int | None = None) -> None:
    """Refuse, before anything is encrypted, a text that is empty, only whitespace or too long."""
    if not isinstance(text, str):
        raise ClientError("message text must be a string")
    if not text.strip():
        raise EmptyMessage("nothing to send: the message is empty or only whitespace")
    size = len(text.encode("utf-8", "surrogatepass"))
    limit = text_limit(relay_max_body)
    if size > limit:
        where = "" if limit == MAX_TEXT_BYTES else " on this relay"
        raise MessageTooLong(f"message too long: {size} bytes; at most {limit} bytes{where} "
                             "(UTF-8) per message")


def build_text_payload(text: str, sent_at_ms: int, written_by: str, written_for: str,
                       relay_max_body: int | None = None) -> bytes:
    """The padded plaintext of a text message (raises EmptyMessage / MessageTooLong first)."""
    check_text(text, relay_max_body)
    return pad(pack([PLAINTEXT_VERSION, "text", text, sent_at_ms, written_by, written_for]))


def build_file_payload(offer: dict[str, Any], sent_at_ms: int, written_by: str, written_for: str) -> bytes:
    """The padded plaintext of a message announcing a file (issue 13; the offer map is built and
    checked by ``client/attachments.py:FileOffer``)."""
    return pad(pack([PLAINTEXT_VERSION, "file", offer, sent_at_ms, written_by, written_for]))


def parse_payload(plaintext: bytes, *, sender: str, me: str) -> tuple[str, Any, int]:
    """``(kind, content, sent_at_ms)`` of a decrypted payload: ``("text", str, ...)``,
    ``("file", map, ...)`` or ``("group", bytes, ...)`` (client/group_wire.py), checked against
    who the relay says wrote it (``sender``) and to whom (``me``). Raises InvalidPayload."""
    if len(plaintext) > MAX_PAYLOAD_BYTES:
        raise InvalidPayload("message is larger than any envelope")
    body = unpad(plaintext)
    try:
        arr = expect_array(unpack(body, what="message", max_size=MAX_PAYLOAD_BYTES), what="message",
                           version=PLAINTEXT_VERSION, length=6)
    except CryptoError as exc:
        raise InvalidPayload(str(exc)) from None
    _, kind, content, sent_at, written_by, written_for = arr
    if not ((kind == "text" and isinstance(content, str)) or (kind == "file" and isinstance(content, dict))
            or (kind == "group" and isinstance(content, bytes))):   # group: docs/groups.md
        raise InvalidPayload("message of an unknown kind")
    if type(sent_at) is not int or not 0 <= sent_at < MAX_TIMESTAMP_MS:
        raise InvalidPayload("message carries an invalid time")
    if written_by != sender or written_for != me:
        raise InvalidPayload(f"the relay delivered it as from {sender} to you, but it was written by "
                             f"{written_by!r} for {written_for!r}; not shown")
    return kind, content, sent_at


def parse_text_payload(plaintext: bytes, *, sender: str, me: str) -> tuple[str, int]:
    """``(text, sent_at_ms)`` of a decrypted text payload (:func:`parse_payload`; any other kind is
    InvalidPayload)."""
    kind, text, sent_at = parse_payload(plaintext, sender=sender, me=me)
    if kind != "text":
        raise InvalidPayload("message of an unknown kind")
    return text, sent_at
