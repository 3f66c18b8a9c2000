"""Burst sends (issue 8, "Client speed"): many messages, one profile commit, few frames.

``send_many`` encrypts every message first (sessions kept in memory), then stores the advanced
ratchet states, the history rows and the outbox rows in **one** transaction (the ordering rule atop
``client/client.py``: state, history and outbox together, before anything is transmitted), then
flushes the outbox. ``flush_batched`` transmits the outbox in ``send`` frames of up to
``MAX_BATCH_ENVELOPES`` envelopes and at most the relay's ``max_frame`` bytes (cap ``batch``,
docs/wire.md) when the relay announced it, one
frame in flight, and records each frame's statuses in one transaction.

What "in order" means: for each recipient, the relay accepts that recipient's messages in the order
they were sent (the outbox's order), and so the recipient receives them in that order. When the
relay refuses one for a moment (``mailbox_full``, ``sender_cap``, ``quota_exceeded``,
``suspended``, ``internal``), it stays in the outbox, and so does every later message to the same
recipient: nothing more goes to that recipient in this flush; the next flush starts again from that
message, in order. Messages to other recipients go on. A permanent refusal (``unknown_user``,
``bad_frame``, ``too_large``) fails that message (history status ``failed: CODE``) and drops it
from the outbox, as a single ``send`` does. Within one frame, the envelopes after a refused one to
the same recipient are refused too (the relay checks them against the same counters, in frame
order, in the same group commit); the one case where the relay could accept a later one is an ack
by the recipient landing between the two inside that commit — then that later message arrives
first (it is recorded as sent; the refused one is retried).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..crypto.session import Session, encrypt
from ..protocol.frames import DEFAULT_MAX_FRAME, MAX_BATCH_ENVELOPES
from ..protocol.usernames import normalize_username
from .errors import ClientError, ServerError
from .plaintext import build_text_payload
from .profile import OutboxItem

if TYPE_CHECKING:
    from .client import Client

PERMANENT_REFUSALS = frozenset({"unknown_user", "bad_frame", "too_large"})  # as Client.flush_outbox
FRAME_OVERHEAD = 64      # bytes of a send frame beyond its envelopes (msgpack keys, rid), rounded up
ENVELOPE_OVERHEAD = 48   # bytes of one envelope beyond its body and name (keys, 16-byte id, kind)


async def send_many(client: Client, items: Sequence[tuple[str, str]]) -> list[bytes]:
    """Encrypt and queue each ``(name, text)`` in order, all in one profile transaction, then
    transmit; the message ids. Every text is checked before anything is encrypted (a refused call
    changes nothing)."""
    from .client import now_ms  # the facade's clock (tests move it)

    conn = client._conn
    max_body = conn.limits.get("max_body") if conn is not None else None
    planned = []
    for name, text in items:
        name = normalize_username(name)
        if name == client.username:
            raise ClientError("you cannot send messages to yourself")
        planned.append((name, text, build_text_payload(text, now_ms(), client.username, name, max_body)))
    if not planned:
        return []
    rows: list[tuple[str, str, bytes, bytes]] = []
    async with client._state_lock:
        sessions: dict[str, tuple[Session, bool]] = {}
        for name, _, _ in planned:
            if name not in sessions:
                sessions[name] = await client._sending_session(name)
        for name, text, payload in planned:
            session, with_psk = sessions[name]
            envelope, session = encrypt(session, payload)
            sessions[name] = (session, with_psk)
            rows.append((name, text, os.urandom(16), envelope))
        now = now_ms()
        db = client.db
        with db.transaction():
            for name, (session, with_psk) in sessions.items():
                db.save_session(session.session_id, name, session.peer.encode(), session.serialize(), now,
                                with_psk=with_psk)
            for name, text, msg_id, envelope in rows:
                db.add_message(name, "out", msg_id, text, sent_at=now, received_at=None, status="queued")
                db.add_outbox(msg_id, name, "msg", envelope, now)
    client._emit("encrypt_many", count=len(rows), recipients=len(sessions))
    await client.flush_outbox()
    return [msg_id for _, _, msg_id, _ in rows]


async def flush_batched(client: Client) -> int:
    """Transmit the outbox in ``batch`` frames (the caller holds the outbox lock and checked the
    cap); how many the relay accepted. After the rest went, raises the first refusal (as the
    one-at-a-time path does), permanent ones first."""
    conn = client._require_conn()
    # A frame over the relay's max_frame would close the connection (1009): fill frames by bytes too.
    budget = int(conn.limits.get("max_frame") or DEFAULT_MAX_FRAME) - FRAME_OVERHEAD
    flush = _Flush()
    try:
        await _flush_all(client, conn, budget, flush)
    finally:  # One commit for the whole flush: a crash before it resends, and the relay reads duplicate.
        if flush.outcomes:
            with client.db.transaction():
                client.db.mark_sent(flush.outcomes)
            client._emit("outbox_committed", count=len(flush.outcomes))
    if flush.failed or flush.held:
        raise (flush.failed + list(flush.held.values()))[0]
    return flush.sent


class _Flush:
    """What one flush learnt: outcomes to commit, recipients held, refusals to report."""

    __slots__ = ("failed", "held", "outcomes", "sent")

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, bytes, str]] = []   # (contact, msg_id, history status)
        self.held: dict[str, ServerError] = {}   # recipient -> why its queue waits (module docstring)
        self.failed: list[ServerError] = []
        self.sent = 0


async def _flush_all(client: Client, conn: Any, budget: int, flush: _Flush) -> None:
    held = flush.held
    frame: list[OutboxItem] = []
    size = 0
    for item in client.db.outbox():
        if item.contact in held:
            continue
        cost = len(item.envelope) + len(item.contact.encode()) + ENVELOPE_OVERHEAD
        if frame and size + cost > budget:
            await _flush_frame(client, conn, frame, flush)
            frame, size = [], 0
        if item.kind != "msg":  # a PAKE message goes alone (the relay rate-limits it per pair)
            await _flush_frame(client, conn, frame, flush)
            frame, size = [], 0
            if item.contact not in held:
                await _flush_frame(client, conn, [item], flush)
            continue
        frame.append(item)
        size += cost
        if len(frame) == MAX_BATCH_ENVELOPES:
            await _flush_frame(client, conn, frame, flush)
            frame, size = [], 0
    await _flush_frame(client, conn, frame, flush)


async def _flush_frame(client: Client, conn: Any, items: list[OutboxItem], flush: _Flush) -> None:
    held, failed = flush.held, flush.failed
    items = [i for i in items if i.contact not in held]  # held while this frame was being filled
    if not items:
        return
    if len(items) == 1 and items[0].kind != "msg":
        item = items[0]
        try:
            await conn.request({"t": "send", "to": item.contact, "id": item.msg_id, "kind": item.kind,
                                "body": item.envelope})
            statuses = ["accepted"]
        except ServerError as exc:
            if exc.code not in PERMANENT_REFUSALS:
                held[item.contact] = exc
                return
            failed.append(exc)
            statuses = [exc.code]
    else:
        reply = await conn.request({"t": "send", "envelopes": [
            {"to": i.contact, "id": i.msg_id, "kind": i.kind, "body": i.envelope} for i in items]})
        statuses = reply.get("status")
        if not isinstance(statuses, list) or len(statuses) != len(items):
            raise ClientError("the relay's accepted_many reply does not list one status per envelope")
    sent = 0
    for item, status in zip(items, statuses, strict=True):
        if status in ("accepted", "duplicate"):
            flush.outcomes.append((item.contact, item.msg_id, "sent"))
            sent += 1
        elif status in PERMANENT_REFUSALS:
            flush.outcomes.append((item.contact, item.msg_id, f"failed: {status}"))
            if item.kind == "msg":
                failed.append(ServerError(str(status), f"the relay refused a message to {item.contact} "
                                          f"({status}); it is marked failed"))
        elif item.contact not in held:
            held[item.contact] = ServerError(
                str(status), f"the relay refused a message to {item.contact} for now ({status}); it "
                "stays queued and is retried in order")
    flush.sent += sent
    client._emit("accepted_many", count=sent, envelopes=len(items))
