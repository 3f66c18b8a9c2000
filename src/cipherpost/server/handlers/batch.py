"""Cap ``batch``: several envelopes in one ``send`` frame, one ``accepted_many`` reply (issue 11).

Each envelope is stored exactly as a plain ``send`` would store it (``Connection.store_message``:
the same store call, caps, quotas, blocks and dedup on ``(sender, id)``), in frame order, so the
store's single writer (SQLite) or per-recipient head lock (PostgreSQL) gives each recipient the
envelopes in the order of the frame. The reply waits for every envelope's commit (durable before
accepted: the group commit already puts the whole frame in one or two transactions) and lists one
status per envelope; a refused envelope (a full mailbox, an unknown name) refuses only itself.

Limits count deliveries, not frames: the connection's token bucket is charged one token per
envelope (the frame paid one in ``Connection._handle``), and each envelope counts toward the
connection's in-flight sends (backpressure) like a plain ``send``. Checks that would refuse the
frame (a bad name, a body over ``max_body``, a PAKE message, the bucket) run before anything is
stored, so a refused frame stores nothing.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ...protocol import errors as E
from ...protocol.errors import ProtocolError
from ...protocol.frames import AcceptedMany, SendBatch, encode_frame
from ...protocol.usernames import require_normalized
from ...store.base import EnqueueResult, NewMessage, StoreError
from .mail import refusal

if TYPE_CHECKING:
    from ..connection import Connection


def send_batch(conn: Connection, frame: SendBatch) -> None:
    assert conn.username is not None
    max_body = conn.config.max_body
    valid = conn.server.valid_names
    targets = []
    for env in frame.envelopes:
        if env.kind != "msg":  # PAKE messages are rate-limited per pair after a lookup: send alone
            raise ProtocolError(E.BAD_FRAME, "send: a pake message goes alone, not in envelopes")
        if len(env.body) > max_body:
            raise ProtocolError(E.TOO_LARGE, f"message body of {len(env.body)} bytes exceeds the limit of "
                                             f"{max_body}")
        targets.append(env.to if env.to in valid else require_normalized(env.to))
    if len(frame.envelopes) > 1 and not conn.bucket.take(time.monotonic(), len(frame.envelopes) - 1):
        raise ProtocolError(E.RATE_LIMITED, "too many messages on this connection; slow down")
    reply = _Reply(conn, frame)
    now_ms = time.time_ns() // 1_000_000
    sender = conn.username
    for i, (env, to) in enumerate(zip(frame.envelopes, targets, strict=True)):
        conn.store_message(NewMessage(sender=sender, recipient=to, msg_id=env.id, kind=env.kind,
                                      body=env.body, ts=now_ms), reply, i)


class _Reply:
    """Collects one status per envelope as the commits call back; replies once all are in."""

    __slots__ = ("conn", "frame", "left", "status")

    def __init__(self, conn: Connection, frame: SendBatch) -> None:
        self.conn = conn
        self.frame = frame
        self.status: list[str] = [E.INTERNAL] * len(frame.envelopes)
        self.left = len(frame.envelopes)

    def __call__(self, index: int, message: NewMessage, result: EnqueueResult | None,
                 exc: StoreError | None) -> None:
        if exc is not None:
            self.status[index] = refusal(exc, message.recipient, self.conn.config)[0]
        else:
            assert result is not None
            self.status[index] = "duplicate" if result.duplicate else "accepted"
        self.left -= 1
        if self.left == 0:
            frame = self.frame
            self.conn.push_frame(encode_frame(AcceptedMany(
                rid=frame.rid, ids=[e.id for e in frame.envelopes], status=self.status)))
