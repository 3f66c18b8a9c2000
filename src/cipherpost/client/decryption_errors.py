"""Decryption-error reports: asking a sender to send a message again, in a new session.

Modelled on Signal's ``DecryptionErrorMessage`` (signalapp/libsignal ``rust/protocol/src/protocol.rs``:
a plaintext report naming the failed message's ratchet key and timestamp, after which the sender
archives that session and resends). Here, docs/protocol.md "Decryption errors":

- The receiver of a message it cannot decrypt sends, through the relay, a ``kind="derr"`` message
  whose body is ``pack([1, msg_id, session_id | None])``, in the clear: the session is what broke, so
  there is nothing to encrypt it with, and it carries no content. At most once per message (a
  redelivered failure has its notice already), at most :data:`ASKS_PER_SENDER_PER_HOUR` per sender
  and :data:`ASKS_PER_HOUR` in all; never in answer to a ``derr``.
- The sender acts only on a report that names one of its own messages *to that contact*, sent within
  :data:`RESEND_WINDOW_MS`, not yet resent and not itself a resend, in a session it still holds with
  that contact, at most :data:`RESENDS_PER_CONTACT_PER_HOUR`. It then forgets that session (the next
  message starts a new PQXDH session with the contact's *pinned* key: a changed key still stops it)
  and sends the text again under a new message id.

A report is not authenticated, so the relay can forge one; all it gains is a new session and one
resend, to the same contact, of a message the relay already carried, within the bounds above.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Final

from ..crypto.encoding import pack, unpack
from ..crypto.errors import CryptoError
from .errors import ClientError

if TYPE_CHECKING:
    from .client import Client

DERR_VERSION: Final = 1
ASKS_PER_SENDER_PER_HOUR: Final = 3
ASKS_PER_HOUR: Final = 20
RESENDS_PER_CONTACT_PER_HOUR: Final = 5
RESEND_WINDOW_MS: Final = 24 * 3600 * 1000
HOUR_MS: Final = 3600 * 1000
MAX_REMEMBERED_RESENDS: Final = 1000


def now_ms() -> int:
    return int(time.time() * 1000)


def encode_report(msg_id: bytes, session_id: bytes | None) -> bytes:
    return pack([DERR_VERSION, msg_id, session_id])


def decode_report(body: bytes) -> tuple[bytes, bytes | None] | None:
    """``(msg_id, session_id)`` of a report, or None if it is malformed."""
    try:
        a = unpack(body, what="decryption error", max_size=256)
    except CryptoError:
        return None
    if not (isinstance(a, list) and len(a) == 3 and a[0] == DERR_VERSION and isinstance(a[1], bytes)
            and len(a[1]) == 16 and (a[2] is None or (isinstance(a[2], bytes) and len(a[2]) == 16))):
        return None
    return a[1], a[2]


class Retries:
    """Both halves: asking (receiver side) and resending (sender side)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    # ------------------------------------------------------------------ receiver: ask
    def should_ask(self, sender: str, msg_id: bytes) -> bool:
        """Whether to report this failure to ``sender`` (records it; call inside the batch)."""
        db = self._c.db
        if db.has_message(sender, "event", msg_id):
            return False   # reported before (a redelivery): at most once per message
        now = now_ms()
        asked: dict[str, list[int]] = {
            k: [t for t in v if now - t < HOUR_MS] for k, v in (db.get_meta("derr_asked") or {}).items()}
        asked = {k: v for k, v in asked.items() if v}
        if len(asked.get(sender, [])) >= ASKS_PER_SENDER_PER_HOUR:
            return False
        if sum(len(v) for v in asked.values()) >= ASKS_PER_HOUR:
            return False
        asked.setdefault(sender, []).append(now)
        db.set_meta("derr_asked", asked)
        return True

    async def after_batch(self, to_ask: list[tuple[str, bytes, bytes | None]],
                          reports: list[tuple[str, bytes]]) -> None:
        """Send the reports decided in a committed batch; act on the reports it brought. Awaited
        by the receive path (not spawned), so a short-lived ``recv`` still gets them out."""
        if to_ask:
            await self._ask(to_ask)
        for sender, body in reports:
            await self._on_report(sender, body)

    async def _ask(self, to_ask: list[tuple[str, bytes, bytes | None]]) -> None:
        conn = self._c._conn
        if conn is None:
            return
        for sender, msg_id, session_id in to_ask:
            try:
                await conn.request({"t": "send", "to": sender, "id": os.urandom(16), "kind": "derr",
                                    "body": encode_report(msg_id, session_id)})
            except ClientError as exc:   # best effort: an older relay refuses the kind, a link drops
                self._c._emit("derr_not_sent", to=sender, reason=str(exc))
                continue
            self._c._emit("derr_sent", to=sender, msg_id=msg_id.hex())

    # ------------------------------------------------------------------ sender: resend
    async def _on_report(self, sender: str, body: bytes) -> None:
        c = self._c
        report = decode_report(body)
        if report is None:
            c._emit("derr_ignored", sender=sender, reason="malformed")
            return
        msg_id, session_id = report
        text = self._resendable(sender, msg_id, session_id)
        if text is None:
            return
        try:
            new_id = await c.send(sender, text)
        except ClientError as exc:
            c._emit("derr_ignored", sender=sender, reason=f"resend failed: {exc}")
            return
        with c.db.transaction():
            resends = [*(c.db.get_meta("derr_resends") or []), new_id][-MAX_REMEMBERED_RESENDS:]
            c.db.set_meta("derr_resends", resends)
        c._emit("resent", to=sender, msg_id=msg_id.hex(), new_id=new_id.hex())

    def _resendable(self, sender: str, msg_id: bytes, session_id: bytes | None) -> str | None:
        """The text to send again (after forgetting the broken session), or None with the reason emitted."""
        c = self._c
        db = c.db

        def no(reason: str) -> str | None:
            c._emit("derr_ignored", sender=sender, reason=reason)
            return None

        original = db.message(sender, "out", msg_id)
        if original is None:
            return no("names no message of ours to them")
        if original.status == "resent" or msg_id in (db.get_meta("derr_resends") or []):
            return no("already resent, or itself a resend")
        if original.sent_at is None or now_ms() - original.sent_at > RESEND_WINDOW_MS:
            return no("too old to resend")
        stored = db.get_session(session_id) if session_id is not None else None
        if session_id is None or stored is None or stored[0] != sender:
            return no("names no session we hold with them")
        now = now_ms()
        recent = {k: [t for t in v if now - t < HOUR_MS]
                  for k, v in (db.get_meta("derr_resent_at") or {}).items()}
        if len(recent.get(sender, [])) >= RESENDS_PER_CONTACT_PER_HOUR:
            return no("too many resends to this contact this hour")
        recent.setdefault(sender, []).append(now)
        with db.transaction():
            db.set_meta("derr_resent_at", {k: v for k, v in recent.items() if v})
            db.set_status([original.row], "resent")
            db.delete_session(session_id, sender)   # the next message starts a new session
        return original.text
