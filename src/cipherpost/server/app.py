"""The relay server: binds the WebSocket listener, owns the store, routes messages to connections.

``RelayServer(config)``; ``await start()`` binds and returns once listening (``.port``,
``.cert_fingerprint``, ``.channel_binding``); ``await stop()`` shuts down gracefully: stop
listening, close every connection (1001), then let the store commit everything already submitted.
HTTP ``GET /healthz`` is answered on the same port (``process_request``); ``GET /metrics`` only on
the separate metrics listener (``--metrics-listen``, loopback by default: ``server/metrics.py``).

Connections are counted and capped from TCP accept, before TLS, by ``admission.GatedListener``
(the listening socket handed to ``serve``); ``admitted(conn)`` moves a connection from pending to
established when it authenticates. Idle TLS connections share one read buffer (``tlsbuffer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterable
from functools import partial
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from ..crypto.errors import CryptoError
from ..crypto.identity import PublicIdentity
from ..crypto.pins import spki_sha256
from ..protocol.frames import DeliveredMessage
from ..store.base import RelayStore
from ..store.blobs import FileBlobStore
from ..store.sqlite import SqliteRelayStore
from . import tls, tlsbuffer
from .admission import (
    Admission,
    AdmissionLimits,
    GatedListener,
    gated_listener,
    raise_open_file_limit,
    tcp_progressed,
)
from .backends import describe, make_bus, make_store
from .bus import Bus
from .config import ServerConfig
from .connection import Connection
from .handlers import accounts, mail
from .handlers.blobs import BlobService
from .limits import build_limiters
from .metrics import Metrics, MetricsListener
from .operator_watch import OperatorWatch
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
        self.epoch: bytes | None = None  # the store epoch sent in hello (read in start())
        # Scale-out (server/bus.py): wake-ups for users connected to other instances. Only the SQLite
        # store completes commits in seq order on one writer thread; with any other store a pushed
        # seq that is not the next one makes the connection page from the store instead.
        self.bus: Bus = bus or make_bus(config)
        self.gap_checked = not isinstance(self.store, SqliteRelayStore)
        self.metrics = Metrics()
        self.mailbox_policy = mail.policy_of(config)  # checked by the store in each enqueue
        self.limiters = build_limiters(config)  # PAKE, bundle fetches, registrations... (limits.py)
        blob_dir = config.blob_dir or config.data_dir / "blobs"
        self.blob_service = BlobService(self.store, FileBlobStore(blob_dir),  # issue 13
                                        self.limiters.blob_bytes, config.max_blob_bytes)
        self.metrics_listener: MetricsListener | None = None
        self.operator_watch = OperatorWatch(self)  # admin actions reach live connections
        self.admission = Admission(AdmissionLimits(config.max_connections, config.max_pending_connections,
                                                   config.max_pending_per_prefix,
                                                   config.max_connections + config.open_files_reserve // 2))
        self._listener: GatedListener | None = None
        self._evictions: set[asyncio.Task[Any]] = set()
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
        self._watch_task: asyncio.Task[None] | None = None
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
            tlsbuffer.install()  # one TLS read buffer per event loop, not 256 KiB per connection
        self.admission = Admission(self._admission_limits(), progressed=tcp_progressed)
        await self.store.open()
        # contracts 1.5: read once; a restore or migration changes it, and means a restart
        self.epoch = await self.store.epoch()
        await self.store.prune(_now_ms(), cfg.dedup_window_s * 1000)
        await self.operator_watch.skip_history()
        await self.bus.start(self.wake, self._routes.keys, self._on_control)
        self._listener = gated_listener(cfg.host, cfg.port, self.admission, on_refused=self._refused)
        try:
            self._server = await serve(
                self._handle, None, None, sock=self._listener, ssl=ssl_context,
                process_request=self._process_request,
                ssl_handshake_timeout=cfg.tls_handshake_timeout_s if ssl_context else None,
                open_timeout=max(cfg.tls_handshake_timeout_s, 3.0),
                # Frames up to twice max_frame are read so that an oversized one gets a typed too_large
                # error; beyond that websockets closes the connection (1009) without reading it.
                max_size=2 * cfg.max_frame, compression=None, server_header=None,
                ping_interval=30, ping_timeout=30, close_timeout=5,
                create_connection=BatchingServerConnection.with_fragments_limit(cfg.max_frame),
            )
        except BaseException:
            self._listener.close()
            raise
        self.port = self._listener.getsockname()[1]
        scheme = "ws" if cfg.insecure_plaintext_dev else "wss"
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self.url = f"{scheme}://{host}:{self.port}"
        self._prune_task = asyncio.create_task(self._prune_loop())
        self._watch_task = asyncio.create_task(self.operator_watch.run())
        if cfg.metrics_listen is not None:
            self.metrics_listener = MetricsListener(self.metrics, self.store, cfg.metrics_listen)
            await self.metrics_listener.start()
        log.info("event=listening url=%s data=%s registration=%s fingerprint=%s store=%s bus=%s", self.url,
                 cfg.data_dir, cfg.registration, self.cert_fingerprint or "none", describe(cfg.store_url),
                 describe(cfg.bus_url))

    def _admission_limits(self) -> AdmissionLimits:
        """Raise the open-file limit to fit ``max_connections``; if the hard limit forbids it, cap
        connections below the limit (so accept never fails with EMFILE) and say how to fix it."""
        cfg = self.config
        reserve = cfg.open_files_reserve
        files = raise_open_file_limit(cfg.max_connections + reserve)
        fits = cfg.max_connections if files is None else max(1, files.soft - reserve)
        if files is not None and files.raised_from is not None:
            log.info("event=open_file_limit_raised soft=%d from=%d hard=%d", files.soft, files.raised_from,
                     files.hard)
        if fits < cfg.max_connections:
            assert files is not None
            log.warning("event=open_file_limit_low soft=%d hard=%d max_connections=%d fits=%d "
                        "message=\"the open-file limit fits only %d connections (it must be at least "
                        "max_connections + %d reserved); raise the hard limit to at least %d (ulimit -Hn, "
                        "systemd LimitNOFILE=, /etc/security/limits.conf) or lower --max-connections\"",
                        files.soft, files.hard, cfg.max_connections, fits, fits, reserve,
                        cfg.max_connections + reserve)
        fd_limit = cfg.max_connections + reserve // 2 if files is None else files.soft - reserve // 2
        return AdmissionLimits(max_connections=min(cfg.max_connections, fits),
                               max_pending=cfg.max_pending_connections,
                               max_pending_per_prefix=cfg.max_pending_per_prefix,
                               fd_limit=max(1, fd_limit))

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        for task in (self._prune_task, self._watch_task):
            if task is not None:
                task.cancel()
        if self.metrics_listener is not None:
            await self.metrics_listener.stop()
        server.close(close_connections=True)
        await server.wait_closed()
        await self.blob_service.blobs.close()
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
                await self.blob_service.expire(_now_ms())
                self.limiters.prune()

    # --- HTTP side: health and metrics --------------------------------------------------------

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/metrics":  # served on the metrics listener only (a presence oracle here)
            return connection.respond(HTTPStatus.NOT_FOUND, "not found: /metrics is served on the "
                                                            "metrics listener (--metrics-listen)\n")
        # max_connections and the pending caps apply at accept (server/admission.py); the per-address
        # cap is checked here so that the client reads why (HTTP 429). Counted from accept.
        per_ip = self.config.max_connections_per_ip
        if self.admission.connections_from(_source_ip(connection)) > per_ip:
            self.metrics.connections_refused += 1
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS,
                                      f"too many connections from this address (limit {per_ip})\n")
        return None

    # --- connections and routing --------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, BatchingServerConnection)
        self.metrics.connections_total += 1
        self.metrics.connections_open += 1
        ws.forget_handshake()
        conn = Connection(self, ws)
        log.debug("event=connected peer=%s", conn.peer)
        try:
            await conn.run()
        finally:
            self.metrics.connections_open -= 1
            log.debug("event=disconnected peer=%s user=%s", conn.peer, conn.username or "-")

    def _refused(self) -> None:
        self.metrics.connections_refused += 1  # reset at accept (server/admission.py)

    def admitted(self, conn: Connection) -> None:
        """``conn`` authenticated: its slot is no longer pending. If the relay is full and its
        address prefix holds more than its share, it may be evicted: with a close frame (1013)."""
        if self._listener is None:
            return
        sock = conn.ws.transport.get_extra_info("socket")
        slot = None if sock is None else self._listener.slot_of(sock.fileno(), conn.ws.remote_address)
        if slot is not None:
            self.admission.authenticated(slot)
            slot.closer = partial(self._evict, conn)

    def _evict(self, conn: Connection) -> None:
        log.info("event=connection_evicted user=%s peer=%s reason=prefix_over_share", conn.username,
                 conn.peer)
        task = asyncio.get_running_loop().create_task(
            conn.ws.close(1013, "relay full and your network holds more than its share; retry later"))
        self._evictions.add(task)
        task.add_done_callback(self._evictions.discard)

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
        else:  # displaced, recovered, deleted: another instance ended these connections
            accounts.on_control(self, what, username)

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

    def forget_identity(self, username: str) -> None:
        self._identities.pop(username, None)

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
