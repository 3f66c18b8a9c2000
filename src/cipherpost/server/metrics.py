"""Prometheus-style counters of the relay (text exposition format 0.0.4), served on their own
listener.

What an anonymous caller learns (issue 9): ``/metrics`` is not served on the public port. It has
its own plain-HTTP listener (``--metrics-listen HOST:PORT``, ``127.0.0.1:9765`` from the CLI), bound
to loopback unless the operator names another address. Nothing in it is per user, and no counter
moves only when a given recipient is online (the old ``messages_delivered`` did: a sender could
watch it to learn whether the recipient was connected). A scrape costs no database query: the
two gauges read from the store (accounts, queued messages) are refreshed at most once per
``STATS_REFRESH_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import metrics_address

if TYPE_CHECKING:
    from ..store.base import RelayStore, StoreStats

log = logging.getLogger("cipherpost.server")

STATS_REFRESH_S = 60.0  # the store's count(*) gauges are at most this old
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
MAX_SCRAPERS = 16  # concurrent connections to the metrics listener


@dataclass
class Metrics:
    connections_total: int = 0
    connections_open: int = 0
    connections_refused: int = 0
    frames_received: int = 0
    messages_accepted: int = 0
    messages_duplicate: int = 0
    auth_success: int = 0
    auth_failure: int = 0
    registrations: int = 0
    bundles_served: int = 0
    bundles_last_resort: int = 0
    deliveries_deferred: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def render(self, *, queued: int, accounts: int, store_batches: int | None = None,
               store_ops: int | None = None) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: int, labels: str = "") -> None:
            if not any(line.startswith(f"# TYPE {name} ") for line in lines):
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name}{labels} {value}")

        metric("cipherpost_connections_total", "counter", "WebSocket connections accepted.",
               self.connections_total)
        metric("cipherpost_connections_open", "gauge", "WebSocket connections open now.",
               self.connections_open)
        metric("cipherpost_connections_refused_total", "counter", "Connections refused (limit).",
               self.connections_refused)
        metric("cipherpost_frames_received_total", "counter", "Frames received.", self.frames_received)
        metric("cipherpost_messages_accepted_total", "counter", "Messages stored and accepted.",
               self.messages_accepted)
        metric("cipherpost_messages_duplicate_total", "counter", "Retried sends answered without a new copy.",
               self.messages_duplicate)
        metric("cipherpost_messages_queued", "gauge",
               f"Messages stored and not yet acked (refreshed every {STATS_REFRESH_S:g} s).", queued)
        metric("cipherpost_accounts", "gauge",
               f"Registered accounts (refreshed every {STATS_REFRESH_S:g} s).", accounts)
        metric("cipherpost_auth_success_total", "counter", "Successful authentications.", self.auth_success)
        metric("cipherpost_auth_failure_total", "counter", "Failed authentications (unknown users too).",
               self.auth_failure)
        metric("cipherpost_registrations_total", "counter", "Accounts registered.", self.registrations)
        metric("cipherpost_bundles_served_total", "counter", "Prekey bundles served.", self.bundles_served)
        metric("cipherpost_bundles_last_resort_total", "counter",
               "Bundles served without one-time prekeys (the target's drain bound was reached).",
               self.bundles_last_resort)
        metric("cipherpost_deliveries_deferred_total", "counter",
               "Live deliveries left in the store because the peer was behind (paged later).",
               self.deliveries_deferred)
        if store_batches is not None and store_ops is not None:
            metric("cipherpost_store_commits_total", "counter", "Store transactions (group commits).",
                   store_batches)
            metric("cipherpost_store_operations_total", "counter", "Store operations.", store_ops)
        lines.append("# HELP cipherpost_errors_total Error frames sent, by code.")
        lines.append("# TYPE cipherpost_errors_total counter")
        for code, n in sorted(self.errors.items()):
            lines.append(f'cipherpost_errors_total{{code="{code}"}} {n}')
        return "\n".join(lines) + "\n"


class MetricsListener:
    """``GET /metrics`` and ``GET /healthz`` over plain HTTP/1.1 on ``listen`` (``HOST:PORT``)."""

    def __init__(self, metrics: Metrics, store: RelayStore, listen: str) -> None:
        self.metrics = metrics
        self.store = store
        self.host, self.port = metrics_address(listen)
        self._server: asyncio.Server | None = None
        self._stats: StoreStats | None = None
        self._stats_at = -STATS_REFRESH_S
        self._slots = asyncio.Semaphore(MAX_SCRAPERS)

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:  # the relay still serves users; the operator reads why in the log
            log.warning("event=metrics_listener_failed listen=%s:%d error=%s", self.host, self.port,
                        exc.strerror or type(exc).__name__)
            return
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("event=metrics_listening url=%s", self.url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def render(self) -> str:
        now = time.monotonic()
        if self._stats is None or now - self._stats_at >= STATS_REFRESH_S:
            self._stats = await self.store.stats()
            self._stats_at = now
        return self.metrics.render(queued=self._stats.queued_messages, accounts=self._stats.accounts,
                                   store_batches=getattr(self.store, "batches", None),
                                   store_ops=getattr(self.store, "batched_ops", None))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.close()
            return
        async with self._slots:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
                parts = head.split(b"\r\n", 1)[0].split(b" ")
                path = parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""
                if parts[0] != b"GET":
                    status, body, ctype = "405 Method Not Allowed", "GET only\n", "text/plain"
                elif path == b"/metrics":
                    status, body = "200 OK", await self.render()
                    ctype = "text/plain; version=0.0.4; charset=utf-8"
                elif path == b"/healthz":
                    status, body, ctype = "200 OK", "ok\n", "text/plain"
                else:
                    status, body, ctype = "404 Not Found", "not found\n", "text/plain"
                data = body.encode()
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                             "Connection: close\r\n\r\n".encode() + data)
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                pass
            finally:
                writer.close()
