"""Relay configuration: one dataclass, validated once, shared by the CLI, the tests and the benchmark."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..protocol.addresses import is_loopback
from ..protocol.frames import DEFAULT_MAX_BODY, DEFAULT_MAX_FRAME

REGISTRATION_MODES = ("open", "closed", "invite")
DATA_ENV = "CIPHERPOST_DATA"


def default_data_dir() -> Path:
    """``$CIPHERPOST_DATA`` if set, else the platform's user data dir (platformdirs) + ``server``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("cipherpost", appauthor=False)) / "server"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8765
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_plaintext_dev: bool = False  # ws:// on loopback only, for development
    registration: str = "open"
    max_connections: int = 10_000  # all TCP connections, counted from accept (server/admission.py)
    max_frame: int = DEFAULT_MAX_FRAME
    max_body: int = DEFAULT_MAX_BODY
    max_queue: int = 10_000  # messages waiting per recipient
    max_prekey_pool: int = 1000  # one-time prekeys per kind per account
    prekeys_low_threshold: int = 10
    rate_per_second: float = 500.0  # frames per connection, token bucket
    rate_burst: int = 1000
    pake_per_hour: int = 10  # "pake" sends per (sender, recipient)
    max_auth_failures: int = 10  # per connection, then it is closed
    auth_timeout_s: float = 10.0  # a connection that has not authenticated by then is closed
    max_connections_per_ip: int = 64  # open WebSocket connections per source address
    max_connections_per_account: int = 16  # authenticated connections per account
    max_outbound_bytes: int = 4 * 1024 * 1024  # queued for one connection; beyond it deliveries wait
    bundle_fetches_per_hour: int = 200  # fetch_bundle per requesting account
    bundle_fetches_per_target_per_hour: int = 20  # fetch_bundle per (requester, target)
    group_bundle_fetches_per_hour: int = 1000  # fetch_bundle with group:true per requester (= max_fanout)
    recovery_attempts_per_account_per_hour: int = 5  # a recovery code is a password-equivalent
    recovery_attempts_per_prefix_per_hour: int = 20  # per /24 (IPv4) or /64 (IPv6) source network
    operator_poll_s: float = 2.0  # how often the operator log is read (admin actions on live connections)
    dedup_window_s: int = 14 * 24 * 3600  # how long a message id is remembered for idempotency
    sqlite_synchronous: str = "FULL"
    store_url: str | None = None  # None: SQLite in data_dir; "sqlite:PATH"; "postgresql://...?schema=NAME"
    bus_url: str | None = None  # None: in-process; "redis://host:port/db?prefix=NAME" (scale-out)
    server_name: str = "cipherpost-relay/0.1"
    # --- connections at accept time (server/admission.py, docs/server.md "Connections") ---
    max_pending_connections: int = 2048  # not yet authenticated, all addresses together
    max_pending_per_prefix: int = 64  # per IPv4 /24 or IPv6 /64; also each prefix's share when full
    tls_handshake_timeout_s: float = 3.0  # from accept to the end of the TLS handshake
    open_files_reserve: int = 256  # open files kept for the store, logs and certificates
    # --- bounded state, mailboxes, metrics and logs (issue 9; docs/server.md "Limits") ---------
    one_time_prekeys_per_target_per_hour: int = 60  # all requesters together; then last-resort keys
    registrations_per_prefix_per_hour: int = 20  # per IPv4 /24 or IPv6 /64
    auth_failures_per_prefix_per_hour: int = 200  # failed auth/register proofs per prefix
    prekey_uploads_per_account_per_hour: int = 2000  # prekeys uploaded (signature checks, writes)
    fanout_deliveries_per_hour: int = 20_000  # send_many deliveries (recipients) per sender
    new_recipients_per_hour: int = 1000  # send_many recipients the sender did not write to last hour
    max_fanout: int = 1000  # recipients of one send_many
    limiter_max_keys: int = 100_000  # per in-memory limiter
    limits_redis: str | None = None  # redis://... : limiters shared by several instances
    limits_redis_prefix: str = "cipherpost:limit:"
    max_queue_per_sender: int = 1000  # per (sender, recipient); min'd with max_queue
    max_stored_bytes: int = 256 * 1024 * 1024  # queued mail (and blobs) per recipient account
    disk_budget_bytes: int | None = None  # the whole store; None: no budget
    metrics_listen: str | None = None  # "HOST:PORT" of the /metrics listener; None: none
    max_blob_bytes: int = 100 * 1024 * 1024  # largest attachment blob (padded size), issue 13
    blob_dir: Path | None = None  # blob files; None: data_dir / "blobs" (N instances: a shared volume)
    blob_bytes_per_hour: int = 4 * 1024 ** 3  # blob bytes uploaded + downloaded per account
    log_peer_addresses: bool = False  # info logs tie usernames to IP:port only when set

    def validate(self) -> None:
        """Raise ValueError with a message fit for the operator."""
        if self.registration not in REGISTRATION_MODES:
            raise ValueError(f"--registration must be one of {', '.join(REGISTRATION_MODES)}")
        if self.insecure_plaintext_dev and not is_loopback(self.host):
            raise ValueError(
                f"--insecure-plaintext-dev refuses to listen on {self.host}: plain ws:// is allowed only "
                "on a loopback address (127.0.0.1, ::1, localhost)"
            )
        if self.insecure_plaintext_dev and (self.tls_cert or self.tls_key):
            raise ValueError("--insecure-plaintext-dev cannot be combined with --tls-cert/--tls-key")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if not 0 <= self.port <= 65535:
            raise ValueError("--port must be in 0-65535")
        if self.max_body >= self.max_frame:
            raise ValueError("max_body must be smaller than max_frame")
        for name in ("max_connections", "max_frame", "max_body", "max_queue", "max_prekey_pool",
                     "rate_burst", "max_connections_per_ip", "max_connections_per_account",
                     "bundle_fetches_per_hour", "bundle_fetches_per_target_per_hour",
                     "recovery_attempts_per_account_per_hour", "recovery_attempts_per_prefix_per_hour",
                     "max_pending_connections", "max_pending_per_prefix", "open_files_reserve"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_outbound_bytes < 2 * self.max_frame:
            raise ValueError(f"max_outbound_bytes must be at least twice max_frame ({2 * self.max_frame})")
        for name in ("one_time_prekeys_per_target_per_hour", "registrations_per_prefix_per_hour",
                     "auth_failures_per_prefix_per_hour", "prekey_uploads_per_account_per_hour",
                     "fanout_deliveries_per_hour", "new_recipients_per_hour", "max_fanout",
                     "group_bundle_fetches_per_hour",
                     "limiter_max_keys", "max_queue_per_sender", "max_stored_bytes", "max_blob_bytes",
                     "blob_bytes_per_hour"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.disk_budget_bytes is not None and self.disk_budget_bytes < 1:
            raise ValueError("disk_budget_bytes must be positive")
        if self.metrics_listen is not None:
            metrics_address(self.metrics_listen)
        if self.auth_timeout_s <= 0:
            raise ValueError("auth_timeout_s must be positive")
        if self.operator_poll_s <= 0:
            raise ValueError("operator_poll_s must be positive")
        if self.tls_handshake_timeout_s <= 0:
            raise ValueError("tls_handshake_timeout_s must be positive")
        if self.rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        self._validate_backends()

    def _validate_backends(self) -> None:
        store, bus = self.store_url, self.bus_url
        if store is not None and not store.startswith(("sqlite:", "postgresql://", "postgres://")):
            raise ValueError("--store must be sqlite:PATH or a postgresql:// URL")
        if bus is not None and not bus.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("--bus must be a redis:// or rediss:// URL")
        if bus is not None and (store is None or store.startswith("sqlite:")):
            raise ValueError("--bus redis://... joins several instances: it needs a shared "
                             "--store postgresql://... (a SQLite file belongs to one process)")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "relay.db"


def metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) of the metrics listener; ValueError with an operator message."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-listen must be HOST:PORT (e.g. 127.0.0.1:9765), not {text!r}")
    return host, int(port)
