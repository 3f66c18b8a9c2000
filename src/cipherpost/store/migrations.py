"""One ordered list of schema migrations for every relay store backend (docs/contracts.md section 4).

``MIGRATIONS[i]`` takes a store from version ``i`` to ``i + 1``. Each :class:`Migration` carries its
SQLite steps and its PostgreSQL steps; a step is SQL text (several statements allowed) or, for
SQLite, a callable that receives the connection (for data that SQL cannot compute, such as
username skeletons). What ran is recorded in a ``schema_version`` table, one row per version.

- SQLite (:func:`migrate_sqlite`): every pending step of every pending version runs in one
  ``BEGIN IMMEDIATE`` transaction, so a crash leaves the store at its old version, whole. The runner
  also sets ``PRAGMA user_version``: version 1 (the first slice, commit 7e818ef) knew only that, and
  refuses any store whose ``user_version`` is not 0 or 1, so old code never misreads a migrated store.
- PostgreSQL (:func:`migrate_postgres`): the caller opens one transaction; the runner takes
  ``pg_advisory_xact_lock(PG_ADVISORY_LOCK_KEY)`` first, so instances starting together run each
  step once (the others wait, then find nothing pending). The lock ends with the transaction.

A store whose version is above :data:`LATEST` was written by a newer cipherpost and is refused
(:class:`~cipherpost.store.base.SchemaTooNew`, both versions in the message): nothing is changed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..protocol.errors import ProtocolError
from ..protocol.usernames import skeleton
from .base import EPOCH_BYTES, SchemaTooNew, StoreError
from .postgres_schema import POSTGRES_V2

log = logging.getLogger("cipherpost.store")

SqliteStep = str | Callable[[sqlite3.Connection], None]

# pg_advisory_xact_lock key of the migration runner ("cipherpo" as a signed 64-bit integer).
PG_ADVISORY_LOCK_KEY = int.from_bytes(b"cipherpo", "big", signed=True)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sqlite: tuple[SqliteStep, ...]
    # PostgreSQL steps of the same version; the PostgreSQL backend writes them (its first version may
    # create the whole schema of that version at once). Empty: nothing to do there.
    postgres: tuple[str, ...] = ()


# Version 1: the schema of the first slice (commit 7e818ef, store/sqlite.py `_SCHEMA`), verbatim.
_V1_SQLITE = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accounts (
    username TEXT PRIMARY KEY,
    identity BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    signed_prekey BLOB,
    kem_last_resort BLOB
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS invites (
    token_hash BLOB PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS one_time_prekeys (
    username TEXT NOT NULL,
    kind INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (username, kind, key_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    msg_id BLOB NOT NULL,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    ts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_recipient ON messages (recipient, seq);
CREATE TABLE IF NOT EXISTS recent_ids (
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    msg_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (recipient, sender, msg_id)
) WITHOUT ROWID;
"""

# Version 2: store v2 (docs/contracts.md 1.1-1.5). Messages get a size and an optional shared body
# (a fan-out stores its body once in `bodies`); dedup is one `sent` row per (sender, msg_id) that
# lists the recipients it was accepted for ("name:seq,..."; seq 0: dropped by a block).
_V2_SQLITE_ACCOUNTS = """
ALTER TABLE accounts ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
ALTER TABLE accounts ADD COLUMN skeleton TEXT;
ALTER TABLE accounts ADD COLUMN recovery_public BLOB;
ALTER TABLE accounts ADD COLUMN login_counter INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN state_changed_ms INTEGER;
ALTER TABLE accounts ADD COLUMN state_by TEXT;
ALTER TABLE accounts ADD COLUMN state_reason TEXT;
"""

_V2_SQLITE = """
CREATE UNIQUE INDEX accounts_by_skeleton ON accounts (skeleton);
CREATE TABLE reserved_names (
    name TEXT PRIMARY KEY,
    skeleton TEXT NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX reserved_by_skeleton ON reserved_names (skeleton);
CREATE TABLE account_events (
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    username TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE blocks (
    owner TEXT NOT NULL,
    blocked TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, blocked)
) WITHOUT ROWID;
CREATE INDEX blocks_by_blocked ON blocks (blocked);
CREATE TABLE bodies (
    id INTEGER PRIMARY KEY,
    body BLOB NOT NULL
);
CREATE TABLE messages_v2 (
    seq INTEGER PRIMARY KEY,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    msg_id BLOB NOT NULL,
    kind TEXT NOT NULL,
    ts INTEGER NOT NULL,
    size INTEGER NOT NULL,
    body BLOB,
    body_id INTEGER,
    CHECK ((body IS NULL) <> (body_id IS NULL))
);
INSERT INTO messages_v2 (seq, recipient, sender, msg_id, kind, ts, size, body, body_id)
    SELECT seq, recipient, sender, msg_id, kind, ts, length(body), body, NULL FROM messages;
DROP TABLE messages;
ALTER TABLE messages_v2 RENAME TO messages;
CREATE INDEX messages_by_recipient ON messages (recipient, seq);
CREATE INDEX messages_by_body ON messages (body_id) WHERE body_id IS NOT NULL;
CREATE TABLE sent (
    sender TEXT NOT NULL,
    msg_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    accepted TEXT NOT NULL,
    PRIMARY KEY (sender, msg_id)
) WITHOUT ROWID;
INSERT INTO sent (sender, msg_id, seq, ts, accepted)
    SELECT sender, msg_id, max(seq), min(ts), group_concat(recipient || ':' || seq, ',')
    FROM recent_ids GROUP BY sender, msg_id;
DROP TABLE recent_ids;
CREATE TABLE usage (
    sender TEXT NOT NULL,
    hour INTEGER NOT NULL,
    messages INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (sender, hour)
) WITHOUT ROWID;
CREATE TABLE epoch (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
"""


def _v2_skeletons(conn: sqlite3.Connection) -> None:
    """Give each existing account its skeleton; the oldest of look-alikes keeps it (the others were
    registered before the rule and keep their names, with no skeleton)."""
    taken: set[str] = set()
    rows = conn.execute("SELECT username FROM accounts ORDER BY created_ms, username").fetchall()
    for (name,) in rows:
        try:
            skel = skeleton(name)
        except ProtocolError:  # not a valid name (the first slice's relay never stored one)
            continue
        if skel in taken:
            log.warning("event=migration_lookalike_kept user=%s", name)
            continue
        taken.add(skel)
        conn.execute("UPDATE accounts SET skeleton=? WHERE username=?", (skel, name))


def _v2_epoch(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO epoch (id, value, created_ms) VALUES (1, ?, ?)",
                 (os.urandom(EPOCH_BYTES), int(time.time() * 1000)))


# Version 3: blob metadata and the blob half of the quota ledger (issue 13, docs/attachments.md).
# The bytes are files (store/blobs.py), never rows: the same tables in PostgreSQL, bytes on a volume.
_V3_SQLITE = """
CREATE TABLE blobs (
    id BLOB PRIMARY KEY,
    owner TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    committed INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX blobs_by_owner ON blobs (owner);
CREATE INDEX blobs_by_created ON blobs (created_ms);
CREATE TABLE blob_readers (
    blob_id BLOB NOT NULL,
    reader TEXT NOT NULL,
    PRIMARY KEY (blob_id, reader)
) WITHOUT ROWID;
"""
_V3_POSTGRES = (
    "CREATE TABLE blobs (id BYTEA PRIMARY KEY, owner TEXT NOT NULL, size BIGINT NOT NULL, "
    "chunk_size INTEGER NOT NULL, created_ms BIGINT NOT NULL, committed BOOLEAN NOT NULL DEFAULT FALSE)",
    "CREATE INDEX blobs_by_owner ON blobs (owner)",
    "CREATE INDEX blobs_by_created ON blobs (created_ms)",
    "CREATE TABLE blob_readers (blob_id BYTEA NOT NULL, reader TEXT NOT NULL, PRIMARY KEY (blob_id, reader))",
)

# Version 4: accounts over their whole life (issue 10, docs/accounts.md): the operator log (who did
# what to which names, when, why; also how an `admin` process reaches a running relay) and the
# default reserved names, which the operator edits with `cipherpost admin reserve|unreserve`.
_V4_OPERATOR_LOG = """
CREATE TABLE operator_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms INTEGER NOT NULL,
    operator TEXT NOT NULL,
    action TEXT NOT NULL,
    names TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""
DEFAULT_RESERVED = (
    "abuse", "admin", "administrator", "cipherpost", "help", "helpdesk", "hostmaster", "info",
    "mod", "moderator", "noreply", "official", "operator", "postmaster", "root", "security",
    "staff", "support", "system", "webmaster",
)


def _v4_reserved(conn: sqlite3.Connection) -> None:
    now_ms = int(time.time() * 1000)
    conn.executemany("INSERT OR IGNORE INTO reserved_names(name, skeleton, created_ms) VALUES (?, ?, ?)",
                     [(name, skeleton(name), now_ms) for name in DEFAULT_RESERVED])


_PG_RESERVED_VALUES = ", ".join(f"('{n}', '{skeleton(n)}', 0)" for n in DEFAULT_RESERVED)  # constants
_PG_RESERVED_INSERT = "INSERT INTO reserved_names(name, skeleton, created_ms) VALUES "
_V4_POSTGRES = (
    "CREATE TABLE operator_log (id BIGSERIAL PRIMARY KEY, ts_ms BIGINT NOT NULL, operator TEXT NOT NULL, "
    "action TEXT NOT NULL, names TEXT NOT NULL, reason TEXT NOT NULL)",
    _PG_RESERVED_INSERT + _PG_RESERVED_VALUES + " ON CONFLICT DO NOTHING",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "first slice (7e818ef)", (_V1_SQLITE,)),
    Migration(2, "store v2: fan-out bodies, caps, blocks, account states, usage, epoch",
              (_V2_SQLITE_ACCOUNTS, _v2_skeletons, _V2_SQLITE, _v2_epoch),
              postgres=POSTGRES_V2),  # PostgreSQL stores start here: the whole v2 schema
    Migration(3, "blobs: attachment metadata and its share of the quota ledger", (_V3_SQLITE,), _V3_POSTGRES),
    Migration(4, "accounts: operator log, default reserved names", (_V4_OPERATOR_LOG, _v4_reserved),
              postgres=_V4_POSTGRES),
)
LATEST = MIGRATIONS[-1].version
assert [m.version for m in MIGRATIONS] == list(range(1, LATEST + 1))

_SCHEMA_VERSION_TABLE = ("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                         "name TEXT NOT NULL, applied_ms BIGINT NOT NULL)")


def pending(current: int, where: str = "the store") -> tuple[Migration, ...]:
    """The migrations to run on a store at version ``current``; refuses one newer than this code."""
    if current > LATEST:
        raise SchemaTooNew(f"{where} has schema version {current}, but this cipherpost knows versions "
                           f"up to {LATEST}: run a newer cipherpost (nothing was changed)")
    return MIGRATIONS[current:]


def sqlite_statements(script: str) -> list[str]:
    """Split SQL text into statements (``executescript`` would commit the open transaction)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError("migration SQL ends with an incomplete statement")
    return statements


def sqlite_version(conn: sqlite3.Connection) -> int:
    """The store's version: ``schema_version`` when present, else ``user_version`` (0 or 1)."""
    has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
                             ).fetchone() is not None
    if has_table:
        return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate_sqlite(conn: sqlite3.Connection, where: str = "the store") -> int:
    """Bring an SQLite store (autocommit connection) to :data:`LATEST` in one ``BEGIN IMMEDIATE``
    transaction; return the version it had. Raises :class:`SchemaTooNew`; any failure rolls back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = sqlite_version(conn)
        todo = pending(current, where)
        if todo:
            conn.execute(_SCHEMA_VERSION_TABLE)
            now_ms = int(time.time() * 1000)
            if current >= 1:  # a first-slice store: record the version it was made at
                conn.execute("INSERT OR IGNORE INTO schema_version VALUES (?, ?, ?)",
                             (current, MIGRATIONS[current - 1].name, now_ms))
            for migration in todo:
                for step in migration.sqlite:
                    if isinstance(step, str):
                        for statement in sqlite_statements(step):
                            conn.execute(statement)
                    else:
                        step(conn)
                conn.execute("INSERT INTO schema_version VALUES (?, ?, ?)",
                             (migration.version, migration.name, now_ms))
            conn.execute(f"PRAGMA user_version={LATEST}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if todo:
        log.info("event=store_migrated from=%d to=%d", current, LATEST)
    return current


async def migrate_postgres(execute: Callable[..., Awaitable[object]],
                           fetchval: Callable[..., Awaitable[object]], where: str = "the store") -> int:
    """Bring a PostgreSQL store to :data:`LATEST`; return the version it had.

    Call it inside one transaction (asyncpg: ``async with conn.transaction(): await
    migrate_postgres(conn.execute, conn.fetchval)``); ``execute(sql, *args)`` and
    ``fetchval(sql, *args)`` use ``$1`` placeholders. The advisory lock serialises instances that
    start together; it is released when that transaction ends.
    """
    await execute("SELECT pg_advisory_xact_lock($1)", PG_ADVISORY_LOCK_KEY)
    await execute(_SCHEMA_VERSION_TABLE)
    current = fetchval_int(await fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
    now_ms = int(time.time() * 1000)
    for migration in pending(current, where):
        for statement in migration.postgres:
            await execute(statement)
        await execute("INSERT INTO schema_version VALUES ($1, $2, $3)", migration.version, migration.name,
                      now_ms)
    return current


def fetchval_int(value: object) -> int:
    if not isinstance(value, int):
        raise StoreError("schema_version holds a non-integer version")
    return value
