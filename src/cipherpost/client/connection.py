"""One authenticated WebSocket connection to a relay: TLS pinning, hello/auth, request/reply.

A thin asyncio shell around the wire format of docs/wire.md. Pushes from the server (``deliver``,
``prekeys_low``) are handed to a callback; replies are matched to requests by ``rid``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgpack
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from ..crypto.encoding import is_one_msgpack_value, pack
from ..crypto.identity import IdentityKeyPair
from ..crypto.pins import check_pin, spki_sha256
from ..protocol.addresses import is_loopback
from ..protocol.errors import ProtocolError
from ..protocol.frames import EPOCH_LEN, decode_frame, frame_to_map
from .errors import BadReply, ConnectionFailed, ServerError, ServerPinMismatch

PROTOCOL_VERSION = 1
MAX_INCOMING_FRAME = 4 << 20
REQUEST_TIMEOUT = 30.0
PLAIN_CHANNEL = bytes(32)
MAX_QUEUED_PUSHES = 256

PushHandler = Callable[[dict[str, Any]], Awaitable[None]]

# The one reply type each request may get (besides ``error``); anything else is a lying or broken
# relay, and the request fails at once instead of taking a wrong frame for success.
EXPECTED_REPLY: dict[str, str] = {
    "register": "ok", "auth": "ok", "upload_prekeys": "ok", "fetch_bundle": "bundle", "send": "accepted",
    "ping": "pong", "block": "ok", "set_recovery": "ok", "recover": "ok", "delete_account": "ok",
    "blob_begin": "blob_state", "blob_put": "blob_state", "blob_held": "blob_state",
    "blob_commit": "blob_state", "blob_get": "blob_data", "blob_release": "ok",
    "send_many": "results",   # group messages (client/groups.py)
}


def format_fingerprint(digest: bytes) -> str:
    return "SHA256:" + digest.hex()


def parse_fingerprint(text: str) -> bytes:
    """Accept ``SHA256:<64 hex>`` (colons and spaces ignored), as the server prints it."""
    body = text.strip()
    if body.upper().startswith("SHA256:"):
        body = body[7:]
    body = body.replace(":", "").replace(" ", "").lower()
    try:
        digest = bytes.fromhex(body)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError("a server fingerprint looks like SHA256:<64 hex digits>")
    return digest


def check_server_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("wss", "ws") or not parts.hostname:
        raise ValueError(f"server address must look like wss://HOST:PORT, not {url!r}")


@dataclass
class ServerInfo:
    fingerprint: bytes
    limits: dict[str, int]


class Connection:
    """Use :meth:`open`; then :meth:`register` or :meth:`authenticate`; then :meth:`request`."""

    def __init__(self, ws: ClientConnection, channel: bytes, nonce: bytes, limits: dict[str, int],
                 caps: frozenset[str] = frozenset()):
        self._ws = ws
        self.channel = channel  # SHA-256 of the certificate: bound into login signatures
        self.spki = channel  # SHA-256 of its public key: what the profile pins (set by open)
        self.pinned_by_certificate = False  # the pin was an old certificate pin (upgrade it)
        self._nonce = nonce
        self.limits = limits
        self.caps = caps   # what the relay announced in its hello (docs/contracts.md section 5)
        self.epoch: bytes | None = None  # hello.epoch (cap "epoch", contracts 1.5): client/epoch.py
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pending_type: dict[int, str] = {}
        self._push: PushHandler | None = None
        # Pushes are handled by their own task, in order: a handler may itself wait for a reply,
        # which only the reader can deliver, so the reader must never wait for a handler.
        self._pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_QUEUED_PUSHES)
        self._reader: asyncio.Task[None] | None = None
        self._push_worker: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_reason = ""

    @classmethod
    async def open(cls, url: str, pinned: bytes | None, *, timeout: float = 10.0) -> Connection:
        """Connect, check the certificate against ``pinned`` (if any), read the server hello."""
        check_server_url(url)
        parts = urlsplit(url)
        if parts.scheme == "ws":
            # Plain WebSocket only for a loopback development relay, and never for a profile that
            # was pinned to a TLS certificate (that would silently drop TLS and the pin).
            if not is_loopback(parts.hostname or ""):
                raise ConnectionFailed("plain ws:// is only allowed to a loopback address; use wss://")
            if pinned is not None and pinned != PLAIN_CHANNEL:
                raise ServerPinMismatch("this profile is pinned to a TLS certificate; refusing plain ws://")
        context: ssl.SSLContext | None = None
        if parts.scheme == "wss":
            # Self-signed relays are the default: trust comes from the pinned SHA-256 fingerprint
            # (checked below, before anything is sent), not from a CA.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ws = await ws_connect(url, ssl=context, max_size=MAX_INCOMING_FRAME, open_timeout=timeout,
                                  ping_interval=20, ping_timeout=20, compression=None)
        except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
            raise ConnectionFailed(f"cannot reach {url}: {exc or type(exc).__name__}") from None
        if context is not None:
            ssl_object = ws.transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            if not der:
                await ws.close()
                raise ConnectionFailed("the server presented no TLS certificate")
            channel = hashlib.sha256(der).digest()
            spki = spki_sha256(der)  # the pin: crypto/pins.py
            matches, by_certificate = (True, False) if pinned is None else check_pin(pinned, der)
            if not matches:
                assert pinned is not None
                await ws.close()
                raise ServerPinMismatch(
                    f"the server's TLS certificate changed to one with another key: expected "
                    f"{format_fingerprint(pinned)}, got {format_fingerprint(spki)} (public key "
                    f"fingerprints). Refusing to connect: this can be an attack. If the "
                    f"operator really replaced the key, check the new fingerprint with them and "
                    f"re-pin with `cipherpost init ... --server-fingerprint`.")
        else:
            channel = spki = PLAIN_CHANNEL
            by_certificate = False
        try:
            async with asyncio.timeout(timeout):
                hello = _decode(await ws.recv())
        except (TimeoutError, websockets.exceptions.WebSocketException) as exc:
            await ws.close()
            raise ConnectionFailed(f"no hello from {url}: {exc or type(exc).__name__}") from None
        if hello.get("t") == "error":
            await ws.close()
            raise ServerError(str(hello.get("code")), str(hello.get("message")))
        nonce = hello.get("nonce")
        if hello.get("t") != "hello" or not isinstance(nonce, bytes) or len(nonce) != 32:
            await ws.close()
            raise ConnectionFailed(f"{url} does not speak the cipherpost protocol")
        limits = hello.get("limits") if isinstance(hello.get("limits"), dict) else {}
        caps = hello.get("caps")
        announced = frozenset(c for c in caps if isinstance(c, str)) if isinstance(caps, list) else None
        conn = cls(ws, channel, nonce, dict(limits or {}), announced or frozenset())
        conn.spki, conn.pinned_by_certificate = spki, by_certificate
        epoch = hello.get("epoch")
        conn.epoch = epoch if isinstance(epoch, bytes) and len(epoch) == EPOCH_LEN else None
        conn._reader = asyncio.create_task(conn._read_loop())
        conn._push_worker = asyncio.create_task(conn._push_loop())
        return conn

    def on_push(self, handler: PushHandler) -> None:
        self._push = handler

    def _proof(self, identity: IdentityKeyPair, label: str, username: str) -> bytes:
        return identity.sign(label, pack([self._nonce, self.channel, username]))

    def bound_payload(self, *items: bytes | str) -> bytes:
        """``pack([nonce, channel, *items])``: what a request signed for this connection covers."""
        return pack([self._nonce, self.channel, *items])

    async def register(self, identity: IdentityKeyPair, username: str, invite: str | None,
                       recovery_public: bytes | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {
            "t": "register", "username": username, "identity": identity.public.encode(),
            "sig": self._proof(identity, "register", username), "invite": invite}
        if recovery_public is not None:
            frame["recovery_public"] = recovery_public
        return await self.request(frame)

    async def authenticate(self, identity: IdentityKeyPair, username: str,
                           counter: int | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"t": "auth", "username": username,
                                 "sig": self._proof(identity, "auth", username)}
        if counter is not None:
            frame["counter"] = counter
        return await self.request(frame)

    async def request(self, frame: dict[str, Any], *, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """Send a request and wait for its reply; error frames raise :class:`ServerError`, a reply of
        the wrong type (or an ``accepted`` for another message id) or one that cannot be decoded
        raises :class:`BadReply` as soon as it arrives."""
        rid = next(self._rids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        self._pending_type[rid] = frame["t"]
        try:
            await self.send({**frame, "rid": rid})
            async with asyncio.timeout(timeout):
                reply = await future
        except TimeoutError:
            raise ConnectionFailed(
                f"no reply from the server to {frame['t']} within {timeout:.0f}s") from None
        finally:
            self._pending.pop(rid, None)
            self._pending_type.pop(rid, None)
        if reply.get("t") == "error":
            raise ServerError(str(reply.get("code")), str(reply.get("message")))
        check_reply(frame, reply)
        return reply

    async def send(self, frame: dict[str, Any]) -> None:
        if self.closed.is_set():
            raise ConnectionFailed(f"connection closed: {self.close_reason}")
        try:
            await self._ws.send(pack({"v": PROTOCOL_VERSION, **frame}))
        except websockets.exceptions.WebSocketException as exc:
            raise ConnectionFailed(f"connection lost: {exc}") from None

    async def _read_loop(self) -> None:
        try:
            async for raw in self._ws:
                if not isinstance(raw, bytes):
                    continue
                try:
                    frame = _decode(raw)
                except ConnectionFailed as exc:
                    # A reply we cannot decode fails its request now (not after the timeout); a
                    # push we cannot decode is dropped (nothing in it was acked: it comes back).
                    self._fail_undecodable(raw, exc)
                    continue
                rid = frame.get("rid")
                if isinstance(rid, int) and rid in self._pending:
                    if not self._pending[rid].done():
                        self._pending[rid].set_result(frame)
                elif frame.get("t") == "error" and rid is None:
                    self.close_reason = f"{frame.get('code')}: {frame.get('message')}"
                else:
                    try:
                        self._pushes.put_nowait(frame)
                    except asyncio.QueueFull:
                        # A relay flooding pushes faster than we handle them: drop the connection
                        # (nothing unhandled was acked; it is redelivered after the reconnect).
                        self.close_reason = "the server sent more than we can handle"
                        await self._ws.close()
                        break
        except websockets.exceptions.WebSocketException as exc:
            self.close_reason = str(exc)
        finally:
            if not self.close_reason:
                self.close_reason = "closed by the server"
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionFailed(f"connection lost: {self.close_reason}"))

    def _fail_undecodable(self, raw: bytes | str, exc: ConnectionFailed) -> None:
        rid = _lenient_rid(raw)
        future = self._pending.get(rid) if rid is not None else None
        if future is not None and not future.done():
            what = self._pending_type.get(rid or 0, "a request")
            future.set_exception(BadReply(f"the server's reply to {what} could not be decoded: {exc}"))

    async def _push_loop(self) -> None:
        while True:
            frame = await self._pushes.get()
            if self._push is not None:
                try:
                    await self._push(frame)
                except Exception as exc:  # never leave a connection without a reader
                    # Nothing was acked for a push that failed: the server redelivers it after the
                    # reconnect this close causes.
                    self.close_reason = f"handling a server push failed: {type(exc).__name__}"
                    await self._ws.close()
                    return

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()
        for task in (self._reader, self._push_worker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self.closed.set()


def check_reply(request: dict[str, Any], reply: dict[str, Any]) -> None:
    """Refuse a non-error reply that does not answer ``request`` (its type, and for ``send`` the
    same message id): a relay must not be able to make a message count as accepted by sending
    any frame at all."""
    batch = request["t"] == "send" and "envelopes" in request   # cap batch: one reply for all
    expected = "accepted_many" if batch else EXPECTED_REPLY.get(request["t"])
    if expected is not None and reply.get("t") != expected:
        raise BadReply(f"the server answered {request['t']} with {str(reply.get('t'))[:32]!r} instead of "
                       f"{expected!r}")
    if batch:
        ids = [e.get("id") for e in request["envelopes"]]
        status = reply.get("status")
        if reply.get("ids") != ids or not isinstance(status, list) or len(status) != len(ids):
            raise BadReply("the server's 'accepted_many' does not list the envelopes sent, one status each")
    elif request["t"] in ("send", "send_many") and reply.get("id") != request.get("id"):
        raise BadReply(f"the server's {expected!r} names another message id than the one sent")


def _lenient_rid(raw: bytes | str) -> int | None:
    """The ``rid`` of a frame that failed strict decoding, if one can still be read from it."""
    if not isinstance(raw, bytes) or not is_one_msgpack_value(raw):   # no allocation blow-up first
        return None
    try:
        m = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # any msgpack failure: there is no rid to find
        return None
    rid = m.get("rid") if isinstance(m, dict) else None
    return rid if type(rid) is int else None


def _decode(raw: bytes | str) -> dict[str, Any]:
    """Validate a server frame with the same strict decoder the relay uses for ours."""
    if isinstance(raw, str):
        raise ConnectionFailed("unexpected text frame from the server")
    try:
        frame = decode_frame(raw, max_size=MAX_INCOMING_FRAME)
    except ProtocolError as exc:
        raise ConnectionFailed(f"malformed frame from the server ({exc.code})") from None
    return frame_to_map(frame)


async def probe_fingerprint(url: str) -> bytes:
    """The SHA-256 of the relay's certificate, to show the user before pinning it (the profile then
    pins the certificate's public key: crypto/pins.py)."""
    conn = await Connection.open(url, None)
    try:
        return conn.channel
    finally:
        await conn.close()
