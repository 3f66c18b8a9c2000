"""Mail rules beyond the plain ``send`` hot path: PAKE sends, blocks, multi-recipient sends, and the
wire error for each way a store refuses a message.

Mailbox caps, quotas and blocks are the store's (``MailboxPolicy``, checked in the enqueue's
transaction, so ``send``, ``send_many`` and every backend obey the same rules); this module picks
the policy from the config and names each refusal on the wire.

PAKE sends are rate-limited per (sender, recipient), and only for recipients that exist: a send to
a made-up name is refused before the limiter sees it, so no one can grow the limiter's table with
invented names (issue 9; the limiter also has a hard key cap and is fail-closed).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ...protocol import errors as E
from ...protocol.errors import ProtocolError
from ...protocol.frames import Block, DeliveredMessage, Ok, Results, Send, SendMany, encode_frame
from ...protocol.usernames import require_normalized
from ...store.base import (
    MAX_BLOCKS,
    AccountSuspended,
    BlockListFull,
    Delivery,
    InvalidDelivery,
    MailboxFull,
    MailboxPolicy,
    QuotaExceeded,
    RecipientStatus,
    SenderCapReached,
    StoreError,
    UnknownAccount,
)
from ..limits import pair_key, retry_text

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..connection import Connection

log = logging.getLogger("cipherpost.server")


async def send_pake(conn: Connection, frame: Send, to: str) -> None:
    assert conn.username is not None
    server = conn.server
    if await server.identity_of(to) is None:
        raise ProtocolError(E.UNKNOWN_USER, f"no account named {to!r}")
    decision = await server.limiters.pake.hit(pair_key(conn.username, to))
    if not decision.allowed:
        raise ProtocolError(E.RATE_LIMITED, f"too many password-verification messages to {to!r} (at most "
                            f"{conn.config.pake_per_hour} per hour); {retry_text(decision)}")
    conn.enqueue(frame, to)


# --- refusals ------------------------------------------------------------------------------------

def refusal(exc: StoreError, recipient: str, config: ServerConfig) -> tuple[str, str]:
    """The wire error (code, message) for a store's refusal of one message to ``recipient``.

    Subclasses first: ``SenderCapReached`` and ``QuotaExceeded`` are ``MailboxFull``s, and
    ``AccountSuspended`` is an ``UnknownAccount``."""
    if isinstance(exc, SenderCapReached):
        return E.SENDER_CAP, (f"you have {min(config.max_queue_per_sender, config.max_queue)} messages "
                              f"waiting for {recipient!r} (your share of the mailbox); wait until they "
                              "are read")
    if isinstance(exc, QuotaExceeded):
        return E.QUOTA_EXCEEDED, (f"no room to store this message for {recipient!r}: their storage quota "
                                  "or the relay's disk budget is used up; try later")
    if isinstance(exc, MailboxFull):
        return E.MAILBOX_FULL, (f"the mailbox of {recipient!r} is full ({config.max_queue} messages); "
                                "try later")
    if isinstance(exc, AccountSuspended):
        return E.SUSPENDED, f"the account {recipient!r} is suspended or deleted: it cannot receive messages"
    if isinstance(exc, UnknownAccount):
        return E.UNKNOWN_USER, f"no account named {recipient!r}"
    return E.INTERNAL, "message could not be stored; retry"


def policy_of(config: ServerConfig) -> MailboxPolicy:
    """The caps and quotas the store checks in each enqueue's transaction (contracts 1.2)."""
    return MailboxPolicy(max_queue=config.max_queue,
                         max_queue_per_sender=min(config.max_queue_per_sender, config.max_queue),
                         max_stored_bytes=config.max_stored_bytes, disk_budget_bytes=config.disk_budget_bytes)


# --- block ---------------------------------------------------------------------------------------

async def block(conn: Connection, frame: Block) -> None:
    """Cap ``block``: the relay learns only the pair, and drops the blocked sender's later messages
    to the caller in the enqueue's transaction (they read ``accepted`` to the sender)."""
    assert conn.username is not None
    target = require_normalized(frame.username)
    if target == conn.username:
        raise ProtocolError(E.BAD_FRAME, "block: an account cannot block itself")
    try:
        await conn.server.store.set_block(conn.username, target, frame.on)
    except UnknownAccount:
        raise ProtocolError(E.UNKNOWN_USER, f"no account named {target!r}") from None
    except BlockListFull:
        raise ProtocolError(E.QUOTA_EXCEEDED, f"block list full ({MAX_BLOCKS} accounts); unblock some "
                                              "first") from None
    conn.push_frame(encode_frame(Ok(rid=frame.rid)))


# --- send_many -----------------------------------------------------------------------------------

async def send_many(conn: Connection, frame: SendMany) -> None:
    """Cap ``send_many``: one body stored once for up to ``max_fanout`` recipients, a status per
    recipient, durable for those accepted before the reply. Counted in deliveries, not frames: the
    connection's frame bucket and the sender's hourly delivery budget are charged one unit per
    recipient, and the sender's budget of new recipients one unit per recipient it has not written
    to (with ``send_many``) in the last hour. That "written to" memory is a limiter of one unit per
    (sender, recipient) pair, made only for recipients that exist and bounded like every limiter
    (an evicted pair counts as new again: the safe side)."""
    assert conn.username is not None
    cfg = conn.config
    server = conn.server
    if frame.kind == "pake":
        raise ProtocolError(E.BAD_FRAME, "send_many: a pake message goes to one recipient (send)")
    if len(frame.body) > cfg.max_body:
        raise ProtocolError(E.TOO_LARGE, f"message body of {len(frame.body)} bytes exceeds the limit of "
                                         f"{cfg.max_body}")
    if len(frame.to) > cfg.max_fanout:
        raise ProtocolError(E.TOO_LARGE, f"send_many: {len(frame.to)} recipients; at most {cfg.max_fanout}")
    recipients = [require_normalized(name) for name in frame.to]
    if len(set(recipients)) != len(recipients):
        raise ProtocolError(E.BAD_FRAME, "send_many: a recipient is named twice")
    if not conn.bucket.take(time.monotonic(), len(recipients) - 1):  # the frame itself paid one
        raise ProtocolError(E.RATE_LIMITED, "too many deliveries on this connection; slow down")
    decision = await server.limiters.fanout_deliveries.hit(conn.username, len(recipients))
    if not decision.allowed:
        raise ProtocolError(E.RATE_LIMITED, "too many send_many deliveries from this account "
                            f"({cfg.fanout_deliveries_per_hour} per hour); {retry_text(decision)}")
    limits = server.limiters
    pairs = [pair_key(conn.username, name) for name in recipients]
    new = [p for p in pairs if (await limits.recipient_pairs.peek(p)).allowed]  # peek: no key made
    if new:
        decision = await limits.new_recipients.hit(conn.username, len(new))
        if not decision.allowed:
            raise ProtocolError(E.RATE_LIMITED, f"too many new recipients from this account "
                                f"({cfg.new_recipients_per_hour} per hour); {retry_text(decision)}")
    delivery = Delivery(sender=conn.username, msg_id=frame.id, kind=frame.kind, body=frame.body,
                        ts=time.time_ns() // 1_000_000, recipients=recipients)
    try:
        results = await server.store.enqueue_many(delivery, server.mailbox_policy)
    except InvalidDelivery as exc:
        raise ProtocolError(E.BAD_FRAME, f"send_many: {exc}") from None
    except StoreError as exc:
        log.error("event=enqueue_failed error=%s", type(exc).__name__)
        raise ProtocolError(E.INTERNAL, "message could not be stored; retry") from None
    for pair, r in zip(pairs, results, strict=True):  # remember the pair only for existing accounts
        if r.status is not RecipientStatus.UNKNOWN_USER:
            await limits.recipient_pairs.hit(pair)
    statuses = [r.status.value for r in results]
    conn.push_frame(encode_frame(Results(rid=frame.rid, id=frame.id, status=statuses)))
    for r in results:
        if r.status is RecipientStatus.ACCEPTED:
            server.metrics.messages_accepted += 1
            if r.seq is not None:  # None: the recipient blocks the sender, nothing was stored
                server.route(r.recipient, DeliveredMessage(
                    seq=r.seq, sender=delivery.sender, id=delivery.msg_id, kind=delivery.kind,
                    body=delivery.body, ts=delivery.ts))
        elif r.status is RecipientStatus.DUPLICATE:
            server.metrics.messages_duplicate += 1
