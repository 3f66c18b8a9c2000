"""Move a relay from its SQLite file to PostgreSQL (``cipherpost migrate-store``), verified.

1. The source is opened with an exclusive lock held to the end: a relay that has the file open
   (running) makes this refuse (:class:`SourceInUse`), and no relay can start on it meanwhile.
   The source is first brought to the current schema version by the one migration runner.
2. The target schema is created or migrated (``PostgresRelayStore.open``) and must hold no
   account and no message (:class:`TargetNotEmpty`).
3. Every table is copied in one PostgreSQL transaction; the per-recipient heads and counters are
   computed from the copied mail. Each recipient's next seq starts above every seq the SQLite
   store ever handed out, so seqs keep growing for clients.
4. Before COMMIT, every table is read back in that transaction and compared with the source by row
   count and SHA-256 over its rows in one canonical order; any difference rolls everything back.
5. The store epoch is renewed (contracts 1.5): clients republish their prekeys.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import EPOCH_BYTES, StoreError
from .migrations import LATEST, migrate_sqlite
from .postgres import PostgresRelayStore, parse_store_url


class SourceInUse(StoreError):
    """The SQLite store is open in another process (a relay running on it)."""


class TargetNotEmpty(StoreError):
    """The PostgreSQL schema already holds accounts or mail."""


class VerificationFailed(StoreError):
    """What was written differs from the source; nothing was committed."""


@dataclass(frozen=True, slots=True)
class TableCheck:
    table: str
    rows: int
    sha256: str  # over the canonical rows, the same on both sides


Row = tuple[Any, ...]

_MESSAGES = ("SELECT m.recipient, m.seq, m.sender, m.msg_id, m.kind, m.ts, m.size, coalesce(m.body, b.body) "
             "FROM messages m LEFT JOIN bodies b ON b.id = m.body_id")
# What is compared, per table: the same canonical rows read from SQLite and from PostgreSQL.
_SQLITE_VIEWS: dict[str, str] = {
    "accounts": "SELECT username, identity, created_ms, signed_prekey, kem_last_resort, state, skeleton, "
                "recovery_public, login_counter, state_changed_ms, state_by, state_reason FROM accounts",
    "invites": "SELECT token_hash, created_ms, expires_ms FROM invites",
    "one_time_prekeys": "SELECT username, kind, key_id, data FROM one_time_prekeys",
    "reserved_names": "SELECT name, skeleton, created_ms FROM reserved_names",
    "account_events": "SELECT id, ts, username, action, actor, reason FROM account_events",
    "operator_log": "SELECT id, ts_ms, operator, action, names, reason FROM operator_log",
    "blocks": "SELECT owner, blocked, created_ms FROM blocks",
    "messages": _MESSAGES,
    "sent": "SELECT sender, msg_id, ts, accepted FROM sent",
    "usage": "SELECT sender, hour, messages, bytes FROM usage",
    # attachments (issue 13): the rows only; the blob files stay where they are (DATA/blobs, or the
    # shared volume given to every instance with --blob-dir)
    "blobs": "SELECT id, owner, size, chunk_size, created_ms, CAST(committed AS INTEGER) FROM blobs",
    "blob_readers": "SELECT blob_id, reader FROM blob_readers",
}
_POSTGRES_VIEWS: dict[str, str] = {
    **{k: v for k, v in _SQLITE_VIEWS.items() if k not in ("messages", "sent", "blobs")},
    "messages": _MESSAGES,
    "sent": "SELECT sender, msg_id, ts, recipients, seqs FROM sent",
    "blobs": "SELECT id, owner, size, chunk_size, created_ms, committed::int FROM blobs",
}


def _value(v: Any) -> Any:
    return bytes(v) if isinstance(v, memoryview | bytearray) else v


def _canonical(table: str, rows: Iterable[Row]) -> list[Row]:
    out = [tuple(_value(v) for v in row) for row in rows]
    if table == "sent":  # SQLite: "name:seq,..."; PostgreSQL: two arrays
        out = [(s, i, ts, tuple(sorted(_accepted(rest)))) for s, i, ts, *rest in out]
    return sorted(out, key=repr)


def _accepted(rest: list[Any]) -> list[tuple[str, int]]:
    if len(rest) == 2:
        return list(zip(rest[0], rest[1], strict=True))
    text = rest[0] or ""
    pairs = []
    for item in text.split(","):
        if item:
            name, _, seq = item.rpartition(":")
            pairs.append((name, int(seq)))
    return pairs


def _check(table: str, rows: list[Row]) -> TableCheck:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(repr(row).encode())
        digest.update(b"\n")
    return TableCheck(table, len(rows), digest.hexdigest())


def _open_source(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise StoreError(f"{path} does not exist")
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")  # held until close (exclusive locking mode)
        conn.execute("COMMIT")
    except sqlite3.OperationalError:
        conn.close()
        raise SourceInUse(f"{path} is in use (is a relay running on it?): stop it, then migrate") from None
    return conn


def _read_source(conn: sqlite3.Connection) -> tuple[dict[str, list[Row]], int, list[Row]]:
    """Canonical rows per table, the next seq, and the raw message rows."""
    tables = {t: _canonical(t, conn.execute(sql).fetchall()) for t, sql in _SQLITE_VIEWS.items()}
    row = conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
    top = conn.execute("SELECT max(coalesce((SELECT max(seq) FROM messages), 0), "
                       "coalesce((SELECT max(seq) FROM sent), 0))").fetchone()[0]
    next_seq = max(row[0] if row else 1, top + 1)
    return tables, next_seq, tables["messages"]


async def migrate_to_postgres(source: Path, target_url: str,
                              report: Callable[[str], None] = lambda line: None) -> list[TableCheck]:
    """Copy the SQLite store at ``source`` into the PostgreSQL store at ``target_url``; see the
    module docstring. Returns the verified tables."""
    import asyncpg

    conn = _open_source(source)
    try:
        old_version = migrate_sqlite(conn, str(source))
        if old_version < LATEST:
            report(f"source schema brought from version {old_version} to the current one")
        tables, next_seq, messages = _read_source(conn)
        store = PostgresRelayStore(target_url)
        await store.open()  # creates or migrates the schema
        await store.close()
        dsn, schema = parse_store_url(target_url)
        pg = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            async with pg.transaction():
                await pg.execute("LOCK TABLE accounts, messages IN EXCLUSIVE MODE")
                used = await pg.fetchval("SELECT (SELECT count(*) FROM accounts) "
                                         "+ (SELECT count(*) FROM messages)")
                if used:
                    raise TargetNotEmpty(f"schema {schema!r} already holds accounts or mail: migrate into an "
                                         "empty one")
                await _copy(pg, tables, messages, next_seq)
                checks = []
                for table, sql in _POSTGRES_VIEWS.items():
                    written = _canonical(table, await pg.fetch(sql))
                    want, got = _check(table, tables[table]), _check(table, written)
                    if want != got:
                        raise VerificationFailed(
                            f"{table}: source has {want.rows} rows ({want.sha256[:16]}), target {got.rows} "
                            f"({got.sha256[:16]}); nothing committed")
                    checks.append(got)
                    report(f"{table}: {got.rows} rows, sha256 {got.sha256[:16]} ok")
        finally:
            await pg.close()
    finally:
        conn.close()
    return checks


async def _copy(pg: Any, tables: dict[str, list[Row]], messages: list[Row], next_seq: int) -> None:
    async def copy(table: str, columns: list[str], rows: list[Row]) -> None:
        if rows:
            await pg.copy_records_to_table(table, records=rows, columns=columns)

    await copy("accounts", ["username", "identity", "created_ms", "signed_prekey", "kem_last_resort", "state",
                            "skeleton", "recovery_public", "login_counter", "state_changed_ms", "state_by",
                            "state_reason"], tables["accounts"])
    await copy("invites", ["token_hash", "created_ms", "expires_ms"], tables["invites"])
    await copy("one_time_prekeys", ["username", "kind", "key_id", "data"], tables["one_time_prekeys"])
    # The target's migration seeded the default reserved names; the source's list (defaults as the
    # operator edited them) replaces it.
    await pg.execute("DELETE FROM reserved_names")
    await copy("reserved_names", ["name", "skeleton", "created_ms"], tables["reserved_names"])
    await copy("operator_log", ["id", "ts_ms", "operator", "action", "names", "reason"],
               tables["operator_log"])
    if tables["operator_log"]:
        await pg.execute("SELECT setval(pg_get_serial_sequence('operator_log', 'id'), "
                         "(SELECT max(id) FROM operator_log))")
    await copy("account_events", ["id", "ts", "username", "action", "actor", "reason"],
               tables["account_events"])
    if tables["account_events"]:
        await pg.execute("SELECT setval(pg_get_serial_sequence('account_events', 'id'), "
                         "(SELECT max(id) FROM account_events))")
    await copy("blocks", ["owner", "blocked", "created_ms"], tables["blocks"])
    await copy("usage", ["sender", "hour", "messages", "bytes"], tables["usage"])
    await copy("sent", ["sender", "msg_id", "ts", "recipients", "seqs"],
               [(s, i, ts, [r for r, _ in acc], [q for _, q in acc]) for s, i, ts, acc in tables["sent"]])
    # Mail: a body shared by several recipients becomes one bodies row again.
    shared: dict[tuple[str, bytes, bytes], list[Row]] = {}
    for m in messages:  # (sender, msg_id, body): one envelope fanned out
        shared.setdefault((m[2], m[3], m[7]), []).append(m)
    inline: list[Row] = []
    with_body: list[Row] = []
    disk = 0
    for copies in shared.values():
        body = copies[0][7]
        disk += len(body)
        if len(copies) == 1:
            inline.extend((*c[:7], body) for c in copies)
            continue
        body_id = await pg.fetchval("INSERT INTO bodies(body, refs) VALUES ($1, $2) RETURNING id", body,
                                    len(copies))
        with_body.extend((*c[:7], body_id) for c in copies)
    columns = ["recipient", "seq", "sender", "msg_id", "kind", "ts", "size"]
    await copy("messages", [*columns, "body"], inline)
    await copy("messages", [*columns, "body_id"], with_body)
    await pg.execute("INSERT INTO mailbox_heads(recipient, next_seq) SELECT username, $1 FROM accounts "
                     "ON CONFLICT (recipient) DO UPDATE SET next_seq = excluded.next_seq", next_seq)
    await pg.execute("UPDATE mailbox_heads h SET queued = g.n, bytes = g.b FROM (SELECT recipient, "
                     "count(*) AS n, sum(size) AS b FROM messages GROUP BY recipient) g "
                     "WHERE h.recipient = g.recipient")
    await pg.execute("INSERT INTO mailbox_senders(recipient, sender, queued, bytes) "
                     "SELECT recipient, sender, count(*), sum(size) FROM messages GROUP BY recipient, sender")
    # blob rows, and their bytes in the owners' ledger and the disk counter (one ledger, as in SQLite)
    await copy("blobs", ["id", "owner", "size", "chunk_size", "created_ms", "committed"],
               [(*b[:5], bool(b[5])) for b in tables["blobs"]])
    await copy("blob_readers", ["blob_id", "reader"], tables["blob_readers"])
    await pg.execute("UPDATE mailbox_heads h SET bytes = h.bytes + g.b FROM (SELECT owner, sum(size) AS b "
                     "FROM blobs GROUP BY owner) g WHERE h.recipient = g.owner")
    disk += sum(b[2] for b in tables["blobs"])
    await pg.execute("UPDATE disk_usage SET bytes = CASE WHEN shard = 0 THEN $1::BIGINT ELSE 0 END", disk)
    await pg.execute("UPDATE epoch SET value = $1, created_ms = $2 WHERE id = 1", os.urandom(EPOCH_BYTES),
                     time.time_ns() // 1_000_000)
