"""The relay server: binds the WebSocket listener, owns the store, routes messages to connections.

``RelayServer(config)``; ``await start()`` binds and returns once listening (``.port``,
``.cert_fingerprint``, ``.channel_binding``); ``await stop()`` shuts down gracefully: stop
listening, close every connection (1001), then let the store commit everything already submitted.
HTTP ``GET /healthz`` is answered on the same port (``process_request``); ``GET /metrics`` only on
the separate metrics listener (``--metrics-listen``, loopback by default: ``server/metrics.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterable
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from ..crypto.errors import CryptoError
from ..crypto.identity import PublicIdentity
from ..crypto.pins import spki_sha256
from ..protocol.frames import DeliveredMessage
from ..store.base import RelayStore
from ..store.sqlite import SqliteRelayStore
from . import tls
from .backends import describe, make_bus, make_store
from .bus import Bus
from .config import ServerConfig
from .connection import Connection
from .handlers import mail
from .limits import build_limiters
from .metrics import Metrics, MetricsListener
from .transport import BatchingServerConnection

log = logging.getLogger("cipherpost.server")

PRUNE_INTERVAL_S = 3600.0
IDENTITY_CACHE_MAX = 100_000
PLAINTEXT_CHANNEL = bytes(32)  # docs/wire.md: channel binding in loopback-only ws:// mode


class RelayServer:
    def __init__(self, config: ServerConfig, *, store: RelayStore | None = None,
                 bus: Bus | None = None) -> None:
        config.validate()
        self.config = config
        self.store: RelayStore = store or make_store(config)
        # Scale-out (server/bus.py): wake-ups for users connected to other instances. Only the SQLite
        # store completes commits in seq order on one writer thread; with any other store a pushed
        # seq that is not the next one makes the connection page from the store instead.
        self.bus: Bus = bus or make_bus(config)
        self.gap_checked = not isinstance(self.store, SqliteRelayStore)
        self.metrics = Metrics()
        self.mailbox_policy = mail.policy_of(config)  # checked by the store in each enqueue
        self.limiters = build_limiters(config)  # PAKE, bundle fetches, registrations... (limits.py)
        self.metrics_listener: MetricsListener | None = None
        self._per_ip: dict[str, int] = {}  # open connections per source address
        self.valid_names: set[str] = set()  # recipients known to be in normal form (skip re-checking)
        self.port: int = config.port
        self.cert_fingerprint: str | None = None  # "SHA256:<hex>"; None in plaintext dev mode
        self.key_fingerprint: str | None = None  # SHA-256 of the certificate's public key (SPKI)
        self.channel_binding: bytes = PLAINTEXT_CHANNEL
        self.url = ""
        self._routes: dict[str, set[Connection]] = {}
        self._identities: dict[str, PublicIdentity] = {}
        self._server: Server | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._dirty: list[Connection] = []  # connections with frames queued in this loop iteration
        self._flush_scheduled = False

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ssl_context = None
        if not cfg.insecure_plaintext_dev:
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                cert_path, key_path = cfg.tls_cert, cfg.tls_key
            else:
                cert_path, key_path = tls.ensure_self_signed(cfg.data_dir, cfg.host)
            der = tls.certificate_der(cert_path)
            self.channel_binding = hashlib.sha256(der).digest()
            self.cert_fingerprint = tls.fingerprint_text(der)
            self.key_fingerprint = "SHA256:" + spki_sha256(der).hex()  # what clients pin (crypto/pins.py)
            ssl_context = tls.server_context(cert_path, key_path)
        await self.store.open()
        await self.store.prune(_now_ms(), cfg.dedup_window_s * 1000)
        await self.bus.start(self.wake, self._routes.keys, self._on_control)
        self._server = await serve(
            self._handle, cfg.host, cfg.port, ssl=ssl_context, process_request=self._process_request,
            # Frames up to twice max_frame are read so that an oversized one gets a typed too_large
            # error; beyond that websockets closes the connection (1009) without reading it.
            max_size=2 * cfg.max_frame, compression=None, server_header=None,
            ping_interval=30, ping_timeout=30, close_timeout=5, create_connection=BatchingServerConnection,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        scheme = "ws" if cfg.insecure_plaintext_dev else "wss"
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self.url = f"{scheme}://{host}:{self.port}"
        self._prune_task = asyncio.create_task(self._prune_loop())
        if cfg.metrics_listen is not None:
            self.metrics_listener = MetricsListener(self.metrics, self.store, cfg.metrics_listen)
            await self.metrics_listener.start()
        log.info("event=listening url=%s data=%s registration=%s fingerprint=%s store=%s bus=%s", self.url,
                 cfg.data_dir, cfg.registration, self.cert_fingerprint or "none", describe(cfg.store_url),
                 describe(cfg.bus_url))

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        if self._prune_task is not None:
            self._prune_task.cancel()
        if self.metrics_listener is not None:
            await self.metrics_listener.stop()
        server.close(close_connections=True)
        await server.wait_closed()
        await self.bus.stop()
        await self.store.close()  # commits everything already submitted
        await self.limiters.close()
        self._stopped.set()
        log.info("event=stopped")

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_S)
            with contextlib.suppress(Exception):
                await self.store.prune(_now_ms(), self.config.dedup_window_s * 1000)
                self.limiters.prune()

    # --- HTTP side: health and metrics --------------------------------------------------------

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/metrics":  # served on the metrics listener only (a presence oracle here)
            return connection.respond(HTTPStatus.NOT_FOUND, "not found: /metrics is served on the "
                                                            "metrics listener (--metrics-listen)\n")
        if self.metrics.connections_open >= self.config.max_connections:
            self.metrics.connections_refused += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        per_ip = self.config.max_connections_per_ip
        if self._per_ip.get(_source_ip(connection), 0) >= per_ip:
            self.metrics.connections_refused += 1
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS,
                                      f"too many connections from this address (limit {per_ip})\n")
        return None

    # --- connections and routing --------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, BatchingServerConnection)
        self.metrics.connections_total += 1
        self.metrics.connections_open += 1
        ip = _source_ip(ws)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        conn = Connection(self, ws)
        log.debug("event=connected peer=%s", conn.peer)
        try:
            await conn.run()
        finally:
            self.metrics.connections_open -= 1
            left = self._per_ip[ip] - 1
            if left:
                self._per_ip[ip] = left
            else:
                del self._per_ip[ip]
            log.debug("event=disconnected peer=%s user=%s", conn.peer, conn.username or "-")

    def route_to(self, username: str, conn: Connection) -> None:
        self._routes.setdefault(username, set()).add(conn)

    def unroute(self, conn: Connection) -> None:
        if conn.username is None:
            return
        conns = self._routes.get(conn.username)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._routes[conn.username]
                self.bus.unwatch(conn.username)
        self.bus.release(conn.username, conn)

    def route(self, recipient: str, message: DeliveredMessage) -> None:
        for conn in self._routes.get(recipient, ()):
            conn.push(message)
        self.bus.publish(recipient, message)  # recipients connected to other instances

    async def admit(self, username: str, conn: Connection) -> bool:
        """Whether ``conn`` may be one more authenticated connection of ``username``: counted across
        instances by the bus, then here (no await after this check: concurrent logins on this
        instance cannot both pass it)."""
        limit = self.config.max_connections_per_account
        if not await self.bus.claim(username, conn, limit):
            return False
        if sum(1 for c in self._routes.get(username, ()) if not c.closed) >= limit:
            self.bus.release(username, conn)
            return False
        return True

    def identity_changed(self, username: str) -> None:
        """``username``'s identity was changed or the account disabled: forget it here and on the
        other instances (the next login reads the store)."""
        self._identities.pop(username, None)
        self.bus.identity_changed(username)

    def _on_control(self, what: str, username: str) -> None:
        if what == "identity":
            self._identities.pop(username, None)

    def wake(self, username: str, seq: int | None, message: DeliveredMessage | None) -> None:
        """A wake-up from the bus: mail up to ``seq`` (None: unknown) committed by another instance;
        pushed when it came along (``push`` pages from the store instead if it is not the next seq)."""
        for conn in self._routes.get(username, ()):
            if message is not None:
                conn.push(message)
            else:
                conn.wake(seq)

    def flush_soon(self, conn: Connection) -> None:
        """Have ``conn.flush_now()`` run once, after every callback ready in this loop iteration
        (e.g. all completions of a group commit) has queued its frames."""
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush_now()

    def notify(self, username: str, frame: bytes) -> None:
        for conn in self._routes.get(username, ()):
            conn.push_frame(frame)

    def connections_of(self, username: str) -> Iterable[Connection]:
        return tuple(self._routes.get(username, ()))

    # --- identities -------------------------------------------------------------------------

    def remember_identity(self, username: str, identity: PublicIdentity) -> None:
        if len(self._identities) >= IDENTITY_CACHE_MAX:
            self._identities.clear()
        self._identities[username] = identity

    async def identity_of(self, username: str) -> PublicIdentity | None:
        identity = self._identities.get(username)
        if identity is not None:
            return identity
        encoded = await self.store.get_identity(username)
        if encoded is None:
            return None
        try:
            identity = PublicIdentity.decode(encoded)
        except CryptoError:
            log.error("event=stored_identity_invalid user=%s", username)
            return None
        self.remember_identity(username, identity)
        return identity


def _source_ip(connection: ServerConnection) -> str:
    peer = connection.remote_address
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


__all__ = ["RelayServer", "ServerConfig"]
