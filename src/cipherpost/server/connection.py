"""One client connection: authentication state, request handling, and batched outbound frames.

Receiving: frames are handled in order. ``send`` does not wait for its commit — it hands the
message to the store and goes on with the next frame; the commit callback queues ``accepted``
and routes the message to connected recipients. That lets one connection keep many sends in a
group commit.

Sending: frames and routed messages queue up during an event-loop iteration; then ``flush_now``
writes them (messages as few ``deliver`` frames as fit) synchronously when the transport has no
flow control in force, else it wakes the connection's writer task, which awaits the drain.

Delivery order and exactly-once-per-connection: after ``auth`` the connection is *syncing*: it
pages through its stored queue while live pushes are buffered; then it flushes the buffer,
skipping sequence numbers already sent (seqs only grow, and commits happen in seq order).

Memory per connection is bounded by bytes (``max_outbound_bytes``), not only by count: a live
push that would take the bytes waiting for a peer over the budget is not kept in memory; the
connection goes back to syncing, which pages the message from the store (where every accepted
message already is) once the peer has read what is queued. Sync pages and the sync buffer obey
the same budget. Only control frames (replies, errors) cannot be deferred: a peer that lets more
than the budget of them pile up is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from ..crypto.encoding import pack
from ..crypto.errors import CryptoError, InvalidSignature
from ..crypto.identity import PublicIdentity
from ..protocol import errors as E
from ..protocol.errors import ProtocolError
from ..protocol.frames import (
    MAX_DELIVER_MESSAGES,
    Ack,
    Auth,
    Block,
    DeleteAccount,
    DeliveredMessage,
    Drained,
    Error,
    FetchBundle,
    Hello,
    Limits,
    Ok,
    Ping,
    Pong,
    PrekeyCounts,
    PrekeysLow,
    Recover,
    Register,
    Send,
    SendBatch,
    SendMany,
    SetRecovery,
    UploadPrekeys,
    decode_frame,
    encode_accepted,
    encode_deliver,
    encode_frame,
)
from ..protocol.usernames import require_normalized
from ..store.base import (
    EnqueueResult,
    NewMessage,
    PoolCounts,
    StoreError,
)
from .handlers import CAPS, accounts, batch, blobs, mail, prekeys
from .limits import TokenBucket, address_prefix, retry_text
from .transport import BatchingServerConnection

if TYPE_CHECKING:
    from .app import RelayServer

log = logging.getLogger("cipherpost.server")
_CONNECTION_IDS = itertools.count(1)

SYNC_PAGE = 256
MAX_IN_FLIGHT_SENDS = 1024  # per connection; beyond it the connection's frames wait (backpressure)
MAX_OUTBOUND_FRAMES = 10_000  # a peer that stops reading is disconnected; its mail stays stored
AUTH_TIMEOUT_FLUSH_S = 2.0  # how long the closing error frame may take to go out
DELIVER_OVERHEAD = 64  # msgpack framing bytes per message in a deliver frame, generous


class Connection:
    def __init__(self, server: RelayServer, ws: BatchingServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.config = server.config
        self.store = server.store
        self.metrics = server.metrics
        self.nonce = secrets.token_bytes(32)  # fresh per connection: a signature is valid once
        self.username: str | None = None
        self.auth_failures = 0
        self.closed = False
        self._abort_reason: str | None = None
        self._close_code = 1008  # with _abort_reason
        self.login_counter: int | None = None  # of this login, when it carried one (handlers/accounts.py)
        self.bucket = TokenBucket(self.config.rate_per_second, self.config.rate_burst, time.monotonic())
        self._frames: list[bytes] = []
        self._frame_bytes = 0  # sum of len(self._frames)
        self._messages: list[DeliveredMessage] = []
        self._message_bytes = 0  # sum of _message_size over self._messages
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()
        self._syncing = False
        self._sync_buffer: list[DeliveredMessage] = []
        self._sync_buffer_bytes = 0
        self._sync_overflow = False  # a push was dropped while syncing: page again before finishing
        self._last_seq = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._in_flight = 0
        self._send_slot = asyncio.Event()
        self._flush_queued = False  # registered with server.flush_soon for this loop iteration
        self._writer_busy = False  # the writer task is inside send_frames (possibly draining)
        peer = ws.remote_address
        self.address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        self.prefix = address_prefix(self.address)  # the limits' unit: IPv4 /24, IPv6 /64
        # Logs name a connection by a number unless the operator asks for addresses (--log-peer-addresses):
        # by default they do not tie usernames to IP:port.
        self.peer = (f"{self.address}:{peer[1]}" if self.config.log_peer_addresses and isinstance(peer, tuple)
                     else f"c{next(_CONNECTION_IDS)}")

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self._writer())
        deadline = asyncio.get_running_loop().call_later(  # a timer: no task per connection while idle
            self.config.auth_timeout_s,
            lambda: None if self.username or self.closed else self._spawn(self._auth_deadline()))
        try:
            cfg = self.config
            self._queue_frame(encode_frame(Hello(nonce=self.nonce, server=cfg.server_name,
                                                 caps=[*CAPS, *accounts.CAPS], epoch=self.server.epoch,
                                                 limits=Limits(cfg.max_frame, cfg.max_body))))
            async for data in self.ws:
                self.metrics.frames_received += 1
                await self._handle(data)
                if self._abort_reason is not None or self.closed:
                    break
                while self._in_flight >= MAX_IN_FLIGHT_SENDS:  # stop reading until commits catch up
                    self._send_slot.clear()
                    await self._send_slot.wait()
            if self._abort_reason is not None and not self.closed:
                # let the peer read the error that explains the close, then close with 1008
                if self._frames or self._messages:
                    self._flushed.clear()
                    self._wake.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._flushed.wait(), 5)
                await self.ws.close(self._close_code, self._abort_reason[:120])
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self.server.unroute(self)
            deadline.cancel()
            writer.cancel()
            for task in list(self._tasks):
                task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self.closed:
            log.error("event=task_failed peer=%s error=%s", self.peer, type(task.exception()).__name__)

    # --- outbound ---------------------------------------------------------------------------

    async def _auth_deadline(self) -> None:
        """Close a connection that has not authenticated in ``auth_timeout_s`` (started by the timer
        in ``run``): an idle socket must not hold a connection slot (docs/server.md, limits)."""
        timeout = self.config.auth_timeout_s
        self.send_error(None, E.NOT_AUTHENTICATED, f"no auth or register within {timeout:g} s; closing")
        log.warning("event=connection_aborted peer=%s reason=auth_timeout", self.peer)
        self._flushed.clear()
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flushed.wait(), AUTH_TIMEOUT_FLUSH_S)
        self.closed = True
        await self.ws.close(1008, f"authentication timeout ({timeout:g} s)")

    def _queue_frame(self, frame: bytes) -> None:
        if self.closed:
            return
        self._frames.append(frame)
        self._frame_bytes += len(frame)
        self._flush_soon()
        if len(self._frames) > MAX_OUTBOUND_FRAMES or self._frame_bytes > self.config.max_outbound_bytes:
            self._abort_now(f"outbound queue over {self.config.max_outbound_bytes} bytes or "
                            f"{MAX_OUTBOUND_FRAMES} frames (peer not reading)")

    def send_error(self, rid: int | None, code: str, message: str) -> None:
        self.metrics.errors[code] += 1
        self._queue_frame(encode_frame(Error(rid=rid, code=code, message=message)))

    def _abort(self, reason: str) -> None:
        """Close with 1008 once the frames queued so far are sent (see ``run``)."""
        log.warning("event=connection_aborted peer=%s reason=%s", self.peer, reason.replace(" ", "_"))
        self._abort_reason = reason

    def _abort_now(self, reason: str) -> None:
        log.warning("event=connection_aborted peer=%s reason=%s", self.peer, reason.replace(" ", "_"))
        self.closed = True
        self._spawn(self.ws.close(1008, reason[:120]))

    def close_now(self, code: int, reason: str) -> None:
        """Close at once with ``code`` (handlers/accounts.py: displaced, recovered, deleted)."""
        self.closed = True
        self._spawn(self.ws.close(code, reason[:120]))

    def close_after_flush(self, code: int, reason: str) -> None:
        """Close with ``code`` once the frames queued so far are sent (see ``run``)."""
        self._close_code = code
        self._abort_reason = reason

    def push(self, message: DeliveredMessage) -> None:
        """Route one committed message to this (authenticated) connection.

        The message is already stored, so when keeping it in memory would exceed the byte budget it
        is dropped here and paged from the store later (``_sync``): nothing accepted is lost."""
        if self.closed:
            return
        size = _message_size(message)
        budget = self.config.max_outbound_bytes
        if self._syncing:
            if self._sync_overflow:
                return
            if (self._sync_buffer_bytes + self._message_bytes + self._transport_backlog() + size > budget
                    or len(self._sync_buffer) >= MAX_OUTBOUND_FRAMES):
                self._sync_buffer.clear()  # all stored: the next sync page has them
                self._sync_buffer_bytes = 0
                self._sync_overflow = True
                self.metrics.deliveries_deferred += 1
                return
            self._sync_buffer.append(message)
            self._sync_buffer_bytes += size
        elif message.seq > self._last_seq:
            if self.server.gap_checked and message.seq != self._last_seq + 1:
                self.wake(None)  # a lower seq committed but not seen here yet: page both, in order
                return
            if (self._message_bytes + self._transport_backlog() + size > budget
                    or len(self._messages) >= MAX_OUTBOUND_FRAMES):
                # The peer is not keeping up: stop holding its messages in memory; resume from the
                # store once what is queued has been written.
                self.metrics.deliveries_deferred += 1
                log.info("event=delivery_deferred user=%s peer=%s", self.username, self.peer)
                self._syncing = True
                self._sync_overflow = True
                self._spawn(self._sync(self._last_seq))
                return
            self._last_seq = message.seq
            self._messages.append(message)
            self._message_bytes += size
            self._flush_soon()

    def wake(self, seq: int | None) -> None:
        """Mail up to ``seq`` (None: unknown) is in the store but was not pushed here (server/bus.py):
        page it from the store, in seq order, as after a deferral."""
        if self.closed or self.username is None or (seq is not None and seq <= self._last_seq):
            return
        if self._syncing:
            self._sync_overflow = True  # the running sync pages once more before it ends
            return
        self._syncing = True
        self._spawn(self._sync(self._last_seq))

    def _transport_backlog(self) -> int:
        """Bytes written to the transport and not yet sent to the peer (TLS and socket buffers)."""
        try:
            return int(self.ws.transport.get_write_buffer_size())
        except (AttributeError, RuntimeError):  # transport already gone
            return 0

    def push_frame(self, frame: bytes) -> None:
        self._queue_frame(frame)

    def _flush_soon(self) -> None:
        if not self._flush_queued:
            self._flush_queued = True
            self.server.flush_soon(self)

    def flush_now(self) -> None:
        """Write what is queued, synchronously if the transport allows, else via the writer task.

        Called once per event-loop iteration for every connection that got frames in it (see
        ``RelayServer.flush_soon``): all ``accepted`` and ``deliver`` frames of a group commit go
        out without a task switch per connection.
        """
        self._flush_queued = False
        if self.closed:
            return
        if self._writer_busy or not self.ws.can_send_now():
            self._wake.set()  # the writer task handles flow control, closing and errors
            return
        out, _ = self._take_outbound()
        if not out:
            return
        try:
            self.ws.send_frames_now(out)
        except Exception as exc:  # the transport failed under us: end this connection only
            log.warning("event=write_failed peer=%s error=%s", self.peer, type(exc).__name__)
            self._abort_now("write failed")
            return
        self._flushed.set()

    def _take_outbound(self) -> tuple[list[bytes], int]:
        """Every queued frame, plus the routed messages as few ``deliver`` frames as the frame size
        limit allows; and how many messages those carry."""
        max_payload = self.config.max_frame - 256
        out, self._frames = self._frames, []
        self._frame_bytes = 0
        self._message_bytes = 0
        delivered = 0
        while self._messages:
            pending = self._messages
            n, size = 0, 0
            while n < len(pending) and n < MAX_DELIVER_MESSAGES:
                size += len(pending[n].body) + DELIVER_OVERHEAD
                if n and size > max_payload:
                    break
                n += 1
            out.append(encode_deliver(pending[:n]))
            del pending[:n]
            delivered += n
        return out, delivered

    async def _writer(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                out, _ = self._take_outbound()
                if out:
                    self._writer_busy = True
                    try:
                        await self.ws.send_frames(out)
                    finally:
                        self._writer_busy = False
                if not self._frames and not self._messages:
                    self._flushed.set()
        except ConnectionClosed:
            self.closed = True

    # --- inbound ----------------------------------------------------------------------------

    async def _handle(self, data: bytes | str) -> None:
        if not isinstance(data, bytes):
            self.send_error(None, E.BAD_FRAME, "text WebSocket frames are not accepted; send binary "
                                               "msgpack frames")
            return
        try:
            frame = decode_frame(data, max_size=self.config.max_frame)
        except ProtocolError as exc:
            self.send_error(exc.rid, exc.code, exc.message)
            return
        rid: int | None = getattr(frame, "rid", None)
        if not self.bucket.take(time.monotonic()):
            self.send_error(rid, E.RATE_LIMITED, "too many frames on this connection; slow down")
            return
        try:
            handler = _HANDLERS.get(type(frame))
            if handler is None:
                raise ProtocolError(E.UNKNOWN_TYPE, f"{frame.t!r} is a server frame, not a request")
            if self.username is None and type(frame) not in _UNAUTHENTICATED:
                raise ProtocolError(E.NOT_AUTHENTICATED, f"{frame.t}: authenticate first (auth or register)")
            pending = handler(self, frame)
            if pending is not None:  # send, ack and ping are handled synchronously: no coroutine each
                await pending
        except ProtocolError as exc:
            self.send_error(rid, exc.code, exc.message)
        except Exception as exc:  # a bug must not kill the connection or leak a traceback to the peer
            log.error("event=internal_error peer=%s frame=%s error=%s", self.peer, frame.t,
                      type(exc).__name__, exc_info=True)
            self.send_error(rid, E.INTERNAL, "internal server error")

    def _ping(self, frame: Ping) -> None:
        self._queue_frame(encode_frame(Pong(rid=frame.rid)))

    def _check_proof(self, label: str, identity: PublicIdentity, username: str, sig: bytes) -> bool:
        # docs/wire.md "Connection start": sign pack([nonce, channel, username]) under label.
        payload = pack([self.nonce, self.server.channel_binding, username])
        try:
            identity.verify(label, payload, sig)
        except CryptoError:
            return False
        return True

    async def _auth_failed(self, message: str, code: str = E.AUTH_FAILED) -> ProtocolError:
        """Count a failed proof or an auth for an unknown user, on this connection and on its
        address prefix (a new connection does not start from zero)."""
        self.auth_failures += 1
        self.metrics.auth_failure += 1
        if self.auth_failures >= self.config.max_auth_failures:
            self._abort("too many failed authentication attempts")
        elif not (await self.server.limiters.auth_failures.hit(self.prefix)).allowed:
            self._abort("too many failed authentication attempts from this network")
        return ProtocolError(code, message)

    async def _register(self, frame: Register) -> None:
        if self.username is not None:
            raise ProtocolError(E.ALREADY_AUTHENTICATED, f"already authenticated as {self.username}")
        mode = self.config.registration
        if mode == "closed":
            raise ProtocolError(E.REGISTRATION_CLOSED, "this server does not accept new accounts")
        username = require_normalized(frame.username)
        accounts.check_recovery_public(frame.recovery_public)
        try:
            identity = PublicIdentity.decode(frame.identity)
        except InvalidSignature:
            raise ProtocolError(E.BAD_SIGNATURE, "identity binding signature does not verify") from None
        except CryptoError as exc:
            raise ProtocolError(E.BAD_FRAME, f"register: bad identity ({exc})") from None
        invite_hash = None
        if mode == "invite":
            if not frame.invite:
                raise ProtocolError(E.BAD_INVITE, "this server requires an invite token to register")
            invite_hash = hashlib.sha256(frame.invite.encode("utf-8")).digest()
        allowed = await self.server.limiters.registrations.peek(self.prefix)
        if not allowed.allowed:
            raise ProtocolError(E.RATE_LIMITED, "too many accounts registered from this network "
                                f"({self.config.registrations_per_prefix_per_hour} per hour); "
                                f"{retry_text(allowed)}")
        if not self._check_proof("register", identity, username, frame.sig):
            raise await self._auth_failed("register: proof of possession does not verify (wrong key, "
                                          "nonce or server certificate)")
        await accounts.create_account(self, username, frame.identity, _now_ms(), invite_hash,
                                      frame.recovery_public)
        await self.server.limiters.registrations.hit(self.prefix)  # counted once created
        self.metrics.registrations += 1
        self.server.remember_identity(username, identity)
        log.info("event=registered user=%s identity=%s peer=%s", username, identity.short_id(), self.peer)
        self._queue_frame(encode_frame(Ok(rid=frame.rid, username=username)))
        self._authenticated(username)

    async def _auth(self, frame: Auth) -> None:
        if self.username is not None:
            raise ProtocolError(E.ALREADY_AUTHENTICATED, f"already authenticated as {self.username}")
        username = require_normalized(frame.username)
        identity, info = await accounts.login_identity(self, username)  # state, current identity
        if not self._check_proof("auth", identity, username, frame.sig):
            raise await self._auth_failed("signature does not verify for this account, nonce and "
                                          "server certificate")
        await accounts.check_counter(self, username, info, frame.counter)
        counts = await self.store.prekey_counts(username)
        accounts.displace_older(self, username, frame.counter)  # before admit counts connections
        # the last await: admit's local count follows its own last await (concurrent logins)
        per_account = self.config.max_connections_per_account
        if not await self.server.admit(username, self):  # this instance and the others (server/bus.py)
            self._abort(f"too many connections for account {username!r}")
            raise ProtocolError(E.RATE_LIMITED, f"account {username!r} already has {per_account} open "
                                                "connections (the limit); close one and retry")
        self.metrics.auth_success += 1
        log.info("event=authenticated user=%s peer=%s", username, self.peer)
        self._queue_frame(encode_frame(Ok(rid=frame.rid, username=username, prekeys=_counts(counts))))
        self._authenticated(username)
        low = self.config.prekeys_low_threshold
        if counts.one_time < low or counts.kem < low:
            self._queue_frame(encode_frame(PrekeysLow(one_time=counts.one_time, kem=counts.kem)))

    async def count_auth_failure(self, message: str, code: str = E.AUTH_FAILED) -> ProtocolError:
        return await self._auth_failed(message, code)  # for handlers/

    def authenticated_as(self, username: str) -> None:  # for handlers/
        self._authenticated(username)

    def _authenticated(self, username: str) -> None:
        self.username = username
        self._syncing = True
        self.server.admitted(self)  # no longer pending at the accept gate (server/admission.py)
        self.server.route_to(username, self)
        self._spawn(self._sync(0, tell_drained=True))  # queued messages are pushed right after auth

    async def _sync(self, after: int, *, tell_drained: bool = False) -> None:
        """Page the stored queue after seq ``after`` to the peer, one page (at most
        ``max_outbound_bytes``) in memory at a time, then hand over to live pushes; with
        ``tell_drained`` (the sync after auth), end with a ``drained`` frame once the last page
        has been written."""
        assert self.username is not None
        await self.server.bus.watch(self.username)  # before the first query: no wake-up falls between
        budget = self.config.max_outbound_bytes
        while not self.closed:
            # backpressure: the previous page (or the live pushes queued before a deferral) is
            # written and the transport has drained before the next page is read
            self._flushed.clear()
            self._wake.set()
            await self._flushed.wait()
            try:
                await self.ws.drain()
            except ConnectionClosed:
                return
            # Everything committed so far is visible to this query, so what was pushed (or dropped)
            # before it need not be kept: the buffer only bridges the time after the last query.
            self._sync_buffer.clear()
            self._sync_buffer_bytes = 0
            self._sync_overflow = False
            page = await self.store.pending(self.username, after, SYNC_PAGE)
            if not page:
                if self._sync_overflow:
                    continue
                break
            room = budget - self._sync_buffer_bytes - self._message_bytes - self._transport_backlog()
            size = 0
            for n, m in enumerate(page):
                size += len(m.body) + DELIVER_OVERHEAD
                if n and size > room:  # at least one message per page, so the sync always advances
                    page = page[:n]
                    break
            self._messages.extend(DeliveredMessage(seq=m.seq, sender=m.sender, id=m.msg_id, kind=m.kind,
                                                   body=m.body, ts=m.ts) for m in page)
            self._message_bytes += sum(len(m.body) + DELIVER_OVERHEAD for m in page)
            after = self._last_seq = page[-1].seq
        self._syncing = False
        buffered, self._sync_buffer = self._sync_buffer, []
        self._sync_buffer_bytes = 0
        for message in buffered:
            self.push(message)
        if tell_drained and not self.closed:
            # Frames are written before routed messages in one flush (`_take_outbound`), so wait
            # until the messages queued above are out: `drained` must follow the last of them.
            self._flushed.clear()
            self._wake.set()
            await self._flushed.wait()
            self.push_frame(encode_frame(Drained()))

    def _send(self, frame: Send) -> Coroutine[Any, Any, None] | None:
        assert self.username is not None
        to = frame.to if frame.to in self.server.valid_names else require_normalized(frame.to)
        if len(frame.body) > self.config.max_body:
            raise ProtocolError(E.TOO_LARGE, f"message body of {len(frame.body)} bytes exceeds the limit of "
                                             f"{self.config.max_body}")
        if frame.kind == "pake":  # rate-limited per existing recipient: awaits a lookup first
            return mail.send_pake(self, frame, to)
        self.enqueue(frame, to)
        return None

    def enqueue(self, frame: Send, to: str) -> None:
        assert self.username is not None
        message = NewMessage(sender=self.username, recipient=to, msg_id=frame.id, kind=frame.kind,
                             body=frame.body, ts=_now_ms())
        self._in_flight += 1
        self.store.enqueue_then(message, self.server.mailbox_policy,
                                partial(self._enqueued, frame.rid, message))

    def store_message(self, message: NewMessage, reply: Callable[..., None], index: int) -> None:
        """A plain send's store, backpressure and routing, for a handler that replies itself
        (handlers/batch.py): after the commit, ``reply(index, message, result, exc)``."""
        self._in_flight += 1
        self.store.enqueue_then(message, self.server.mailbox_policy,
                                partial(self._enqueued, partial(reply, index), message))

    def _enqueued(self, rid: int | Callable[..., None], message: NewMessage, result: EnqueueResult | None,
                  exc: StoreError | None) -> None:
        """Runs after the commit: reply ``accepted`` and push the message to its recipient."""
        self._in_flight -= 1
        if self._in_flight < MAX_IN_FLIGHT_SENDS:
            self._send_slot.set()
        if not isinstance(rid, int):  # a handler's own reply (store_message)
            rid(message, result, exc)
        elif exc is not None:
            code, text = mail.refusal(exc, message.recipient, self.config)
            if code == E.INTERNAL:
                log.error("event=enqueue_failed error=%s", type(exc).__name__)
            self.send_error(rid, code, text)
        else:
            self._queue_frame(encode_accepted(rid, message.msg_id))
        if result is None:
            return
        self.server.valid_names.add(message.recipient)
        if result.duplicate:
            self.metrics.messages_duplicate += 1
            return
        if result.dropped:  # the recipient blocks the sender: reads as accepted, delivers nothing
            return
        self.metrics.messages_accepted += 1
        self.server.route(message.recipient, DeliveredMessage(
            seq=result.seq, sender=message.sender, id=message.msg_id, kind=message.kind, body=message.body,
            ts=message.ts))

    def _ack(self, frame: Ack) -> None:
        assert self.username is not None
        if frame.seqs:
            self.store.ack_later(self.username, frame.seqs)


def _message_size(message: DeliveredMessage) -> int:
    return len(message.body) + DELIVER_OVERHEAD


def _counts(counts: PoolCounts) -> PrekeyCounts:
    return PrekeyCounts(one_time=counts.one_time, kem=counts.kem)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_HANDLERS: dict[type, Callable[[Connection, Any], Any]] = {
    Register: Connection._register, Auth: Connection._auth, UploadPrekeys: prekeys.upload_prekeys,
    FetchBundle: prekeys.fetch_bundle, Send: Connection._send, Ack: Connection._ack,
    Ping: Connection._ping, Block: mail.block, SendMany: mail.send_many, **blobs.HANDLERS,
    SetRecovery: accounts.set_recovery, Recover: accounts.recover, DeleteAccount: accounts.delete_account,
    SendBatch: batch.send_batch,
}
_UNAUTHENTICATED = frozenset({Register, Auth, Ping, Recover})
