"""``cipherpost server`` and ``cipherpost invite``: run the relay, issue invite tokens.

``register(subparsers)`` adds both subcommands to the main CLI; ``main(argv)`` runs them standalone
(``python -c 'from cipherpost.cli.server_cmd import main; main()' server ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..server import logfmt
from ..server.backends import BUS_ENV, STORE_ENV, make_store
from ..server.config import DATA_ENV, REGISTRATION_MODES, ServerConfig, default_data_dir
from ..store.base import StoreError

log = logging.getLogger("cipherpost.server")

INVITE_TTL_HOURS = 7 * 24
LIMITS_REDIS_ENV = "CIPHERPOST_LIMITS_REDIS"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("server", help="run the relay server",
                              description="Run the cipherpost relay (TLS by default).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--data", type=Path, default=None,
                   help=f"data directory (default ${DATA_ENV} or the platform data dir)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (default: self-signed)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")
    p.add_argument("--registration", choices=REGISTRATION_MODES, default="open",
                   help="who may create accounts (default open)")
    p.add_argument("--insecure-plaintext-dev", action="store_true",
                   help="plain ws:// without TLS, for development; loopback addresses only")
    p.add_argument("--max-connections", type=int, default=10_000,
                   help="open connections, counted from TCP accept (default 10000)")
    p.add_argument("--max-queue", type=int, default=10_000, help="queued messages per recipient")
    p.add_argument("--max-body", type=int, default=64 * 1024, help="largest message body in bytes")
    p.add_argument("--rate", type=float, default=500.0, help="frames per second per connection")
    p.add_argument("--rate-burst", type=int, default=1000,
                   help="frames a connection may send at once above --rate (default 1000)")
    p.add_argument("--auth-timeout", type=float, default=10.0,
                   help="seconds a connection may stay unauthenticated (default 10)")
    p.add_argument("--max-connections-per-ip", type=int, default=64,
                   help="open connections per source address (default 64)")
    p.add_argument("--max-connections-per-account", type=int, default=16,
                   help="authenticated connections per account (default 16)")
    p.add_argument("--max-outbound-bytes", type=int, default=4 * 1024 * 1024,
                   help="bytes queued for one connection before its deliveries wait in the store "
                        "(default 4 MiB)")
    p.add_argument("--bundle-fetches-per-hour", type=int, default=200,
                   help="prekey bundle fetches per requesting account per hour (default 200)")
    p.add_argument("--bundle-fetches-per-target-per-hour", type=int, default=20,
                   help="prekey bundle fetches per (requester, target) per hour (default 20)")
    # connections at accept time (server/admission.py; docs/server.md "Connections")
    p.add_argument("--max-pending-connections", type=int, default=2048,
                   help="connections not yet authenticated, all addresses together (default 2048)")
    p.add_argument("--max-pending-per-prefix", type=int, default=64,
                   help="unauthenticated connections per IPv4 /24 or IPv6 /64 (default 64)")
    p.add_argument("--tls-handshake-timeout", type=float, default=3.0,
                   help="seconds from TCP accept to the end of the TLS handshake (default 3)")
    p.add_argument("--open-files-reserve", type=int, default=256,
                   help="open files kept free for the store and logs (default 256)")
    p.add_argument("--store", default=os.environ.get(STORE_ENV) or None, metavar="URL",
                   help=f"where state lives: sqlite:PATH or postgresql://USER@HOST/DB?schema=NAME "
                        f"(default ${STORE_ENV}, else relay.db in the data directory)")
    p.add_argument("--bus", default=os.environ.get(BUS_ENV) or None, metavar="URL",
                   help=f"wake-ups across instances: redis://HOST:PORT/DB?prefix=NAME (default ${BUS_ENV}, "
                        "else in-process); needs a postgresql:// --store")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="least severe log lines printed (default info)")
    _add_limit_flags(p)
    p.set_defaults(func=run_server)

    i = subparsers.add_parser("invite", help="print a one-time invite token (for --registration invite)")
    i.add_argument("--data", type=Path, default=None,
                   help=f"the server's data directory, as it runs with (default ${DATA_ENV} or the "
                        "platform data dir); it must hold the relay's database")
    i.add_argument("--create", action="store_true",
                   help="create the relay's database there if it has none (before the first start)")
    i.add_argument("--ttl-hours", type=float, default=INVITE_TTL_HOURS, help="validity (default 7 days)")
    i.add_argument("--store", default=os.environ.get(STORE_ENV) or None, metavar="URL",
                   help=f"the server's --store, if not the data directory's relay.db (default ${STORE_ENV})")
    i.set_defaults(func=run_invite)

    m = subparsers.add_parser("migrate-store", help="move a relay's SQLite store to PostgreSQL, verified",
                              description="Copy every account, prekey and queued message from a stopped "
                                          "relay's SQLite file into an empty PostgreSQL schema, verify "
                                          "counts and SHA-256 checksums per table, renew the store epoch.")
    m.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH",
                   help="the relay's store, e.g. sqlite:/var/lib/cipherpost/relay.db (relay stopped)")
    m.add_argument("--to", dest="target", required=True, metavar="postgresql://...",
                   help="an empty PostgreSQL store: postgresql://USER@HOST/DB?schema=NAME")
    m.set_defaults(func=run_migrate_store)


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    """Bounded state, mailbox caps, metrics and logs (issue 9; docs/server.md "Limits")."""
    g = p.add_argument_group("abuse limits, metrics and logs")
    g.add_argument("--max-queue-per-sender", type=int, default=1000,
                   help="messages one sender may have waiting for one recipient (default 1000)")
    g.add_argument("--max-stored-bytes", type=int, default=256 * 1024 * 1024,
                   help="bytes of queued mail and attachment blobs per account (default 256 MiB)")
    g.add_argument("--max-blob-bytes", type=int, default=100 * 1024 * 1024,
                   help="largest attachment blob (padded size) the relay stores (default 100 MiB)")
    g.add_argument("--blob-dir", type=Path, default=None, metavar="DIR",
                   help="where attachment blobs are stored (default DATA/blobs); with several relay "
                        "instances, one shared volume mounted on each")
    g.add_argument("--blob-bytes-per-hour", type=int, default=4 * 1024 ** 3,
                   help="attachment bytes uploaded plus downloaded per account per hour (default 4 GiB)")
    g.add_argument("--disk-budget", type=int, default=None,
                   help="bytes of queued mail the whole relay may store (default: no budget)")
    g.add_argument("--group-bundle-fetches-per-hour", type=int, default=1000,
                   help="bundle fetches for group setup and rotation per account per hour, apart from "
                        "--bundle-fetches-per-hour (default 1000)")
    g.add_argument("--registrations-per-prefix-per-hour", type=int, default=20,
                   help="accounts registered per IPv4 /24 or IPv6 /64 per hour (default 20)")
    g.add_argument("--one-time-prekeys-per-target-per-hour", type=int, default=60,
                   help="one-time prekeys served per account per hour, all requesters together; beyond "
                        "it bundles carry the last-resort key (default 60)")
    g.add_argument("--prekey-uploads-per-hour", type=int, default=2000,
                   help="prekeys one account may upload per hour (default 2000)")
    g.add_argument("--pake-per-hour", type=int, default=10,
                   help="password-verification messages per (sender, recipient) per hour (default 10)")
    g.add_argument("--limits-redis", default=os.environ.get(LIMITS_REDIS_ENV) or None, metavar="URL",
                   help=f"keep rate limits in Redis, shared by relay instances (redis://host:6379/0; "
                        f"default ${LIMITS_REDIS_ENV} or in memory)")
    g.add_argument("--metrics-listen", default="127.0.0.1:9765", metavar="HOST:PORT",
                   help="plain-HTTP listener for /metrics, loopback by default; 'off' for none "
                        "(default 127.0.0.1:9765)")
    g.add_argument("--log-peer-addresses", action="store_true",
                   help="log IP:port with usernames at info level (default: a connection number)")


def _limit_settings(args: argparse.Namespace) -> dict[str, Any]:
    metrics = getattr(args, "metrics_listen", None)
    return dict(
        max_queue_per_sender=args.max_queue_per_sender, max_stored_bytes=args.max_stored_bytes,
        disk_budget_bytes=args.disk_budget, max_blob_bytes=args.max_blob_bytes, blob_dir=args.blob_dir,
        blob_bytes_per_hour=args.blob_bytes_per_hour,
        group_bundle_fetches_per_hour=args.group_bundle_fetches_per_hour,
        registrations_per_prefix_per_hour=args.registrations_per_prefix_per_hour,
        one_time_prekeys_per_target_per_hour=args.one_time_prekeys_per_target_per_hour,
        prekey_uploads_per_account_per_hour=args.prekey_uploads_per_hour, pake_per_hour=args.pake_per_hour,
        limits_redis=args.limits_redis, metrics_listen=None if metrics in (None, "off") else metrics,
        log_peer_addresses=args.log_peer_addresses)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        data_dir=args.data or default_data_dir(), host=args.host, port=args.port, tls_cert=args.tls_cert,
        tls_key=args.tls_key, insecure_plaintext_dev=args.insecure_plaintext_dev,
        registration=args.registration, max_connections=args.max_connections, max_queue=args.max_queue,
        max_body=args.max_body, rate_per_second=args.rate, rate_burst=args.rate_burst,
        auth_timeout_s=args.auth_timeout, max_connections_per_ip=args.max_connections_per_ip,
        max_connections_per_account=args.max_connections_per_account,
        max_outbound_bytes=args.max_outbound_bytes, bundle_fetches_per_hour=args.bundle_fetches_per_hour,
        bundle_fetches_per_target_per_hour=args.bundle_fetches_per_target_per_hour,
        max_pending_connections=args.max_pending_connections,
        max_pending_per_prefix=args.max_pending_per_prefix,
        tls_handshake_timeout_s=args.tls_handshake_timeout, open_files_reserve=args.open_files_reserve,
        store_url=args.store, bus_url=args.bus,
        **_limit_settings(args),
    )


def run_server(args: argparse.Namespace) -> int:
    logfmt.configure(getattr(logging, args.log_level.upper()))
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as exc:
        print(f"cipherpost server: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # address in use, unreadable certificate ...
        print(f"cipherpost server: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:  # database unreachable, schema newer than this code ...
        print(f"cipherpost server: store: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: ServerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before anything is printed: a parent may signal at once
        with contextlib.suppress(NotImplementedError):  # not available on Windows
            loop.add_signal_handler(sig, stop.set)
    from ..server.app import RelayServer  # imported here: client commands need not load the relay

    server = RelayServer(config)
    await server.start()
    print(f"cipherpost server listening on {server.url}", flush=True)
    if server.cert_fingerprint is not None:
        print(f"TLS certificate fingerprint: {server.cert_fingerprint}", flush=True)
    else:
        print("TLS certificate fingerprint: none (insecure plaintext development mode)", flush=True)
    print(f"data directory: {config.data_dir}", flush=True)
    if server.key_fingerprint is not None:  # stays the same when the certificate is renewed with its key
        print(f"TLS public key fingerprint: {server.key_fingerprint}", flush=True)
    listener = server.metrics_listener
    if listener is not None and listener.running:
        print(f"metrics: {listener.url}", flush=True)
    await stop.wait()
    log.info("event=shutdown_requested")
    await server.stop()


def run_invite(args: argparse.Namespace) -> int:
    data_dir: Path = args.data or default_data_dir()
    if not args.create and not (data_dir / "relay.db").is_file():
        # A mistyped --data would otherwise create an empty relay database whose invites no
        # running relay ever sees.
        print(f"cipherpost invite: no relay data in {data_dir} (no relay.db there): give the directory "
              "the server runs with (`cipherpost server` prints it as 'data directory: ...'), or "
              "--create to make the relay's database before its first start",
              file=sys.stderr)
        return 1
    token = secrets.token_urlsafe(18)
    now = time.time_ns() // 1_000_000

    async def add() -> None:
        store = make_store(ServerConfig(data_dir=data_dir, store_url=args.store))
        await store.open()
        try:
            await store.add_invite(hashlib.sha256(token.encode()).digest(), now,
                                   now + int(args.ttl_hours * 3600_000))
        finally:
            await store.close()

    asyncio.run(add())
    print(token, flush=True)  # only the hash is stored on the server
    return 0


def run_migrate_store(args: argparse.Namespace) -> int:
    if not args.source.startswith("sqlite:") or not args.target.startswith(("postgresql://", "postgres://")):
        print("cipherpost migrate-store: --from must be sqlite:PATH and --to a postgresql:// URL",
              file=sys.stderr)
        return 2
    from ..store.transfer import migrate_to_postgres  # needs asyncpg

    try:
        checks = asyncio.run(migrate_to_postgres(Path(args.source.removeprefix("sqlite:")), args.target,
                                                 report=lambda line: print(line, flush=True)))
    except (StoreError, ValueError) as exc:
        print(f"cipherpost migrate-store: {exc}", file=sys.stderr)
        return 1
    total = sum(c.rows for c in checks)
    print(f"migrated {total} rows in {len(checks)} tables, verified; store epoch renewed "
          "(clients republish their prekeys)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cipherpost")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
