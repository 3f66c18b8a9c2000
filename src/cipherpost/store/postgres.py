"""PostgreSQL backend of :class:`~cipherpost.store.base.RelayStore`, shared by many relay instances.

``PostgresRelayStore("postgresql://user@host/db?schema=NAME")``: every table lives in one schema
(default ``cipherpost``), created and migrated on :meth:`open` under a transaction-level advisory
lock, so that instances starting together run each migration once. asyncpg (not psycopg 3): its
binary protocol and prepared-statement cache cost the relay the least CPU per message, and it is
asyncio-native, which the relay is.

How each rule of the contract in ``store/base.py`` holds with several writers:

- Durable before ``accepted``: a send is one call of the SQL function ``cp_enqueue`` (one round
  trip, its own transaction); its callback runs after that statement, i.e. the commit, returned.
  Sends that queue up while a worker is busy go into the next call together (a group commit: one
  WAL flush for the batch), up to ``MAX_BATCH``.
- Per-recipient sequence order: ``mailbox_heads`` keeps one row per recipient with its next seq.
  ``cp_enqueue`` locks the heads of a batch *in sorted recipient order* (so overlapping batches
  cannot deadlock), takes the next seq, and holds the lock until its commit: a recipient's seqs
  therefore commit in order and without gaps, which the relay's push (``seq <= last`` is dropped)
  and sync (``seq > after``) rely on. A PostgreSQL sequence would hand out numbers before commit.
- Idempotent ids: ``recent_ids`` rows keyed by ``(sender, msg_id, recipient)``, checked under the
  recipient's head lock; kept for the dedup window (``prune``).
- ``take_bundle`` locks the account row (``FOR UPDATE``) before it takes one key of each kind:
  concurrent fetches of one account queue up, and one never falls back to the last-resort KEM key
  because another transaction had the last one-time key locked (as ``SKIP LOCKED`` would).
- A lost connection: a send whose statement was sent but whose reply never came may or may not
  have committed. It fails with :class:`OutcomeUnknown` (the relay answers an error; the client's
  retry is deduplicated). An unreachable database fails sends with :class:`StoreUnavailable`;
  asyncpg's pool reconnects when the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # optional dependency (the [scale] extra): this module is imported only for postgresql://

from .base import (
    BundleParts,
    EnqueueResult,
    InvalidInvite,
    MailboxFull,
    NewMessage,
    NoPrekeys,
    PoolCounts,
    PrekeyPoolFull,
    StoredMessage,
    StoreError,
    StoreStats,
    UnknownAccount,
    UsernameTaken,
)

T = TypeVar("T")
log = logging.getLogger("cipherpost.store")

MAX_BATCH = 512  # sends per cp_enqueue call
WORKERS = 4  # concurrent cp_enqueue calls (each a group commit)
EXTRA_CONNECTIONS = 8  # pool connections for everything else (sync pages, prekeys, accounts)
MIGRATION_LOCK = 0x63707374  # pg_advisory_xact_lock(MIGRATION_LOCK, hashtext(schema)): "cpst"
_X25519 = 0
_KEM = 1
_ENQ_ACCEPTED, _ENQ_DUPLICATE, _ENQ_UNKNOWN, _ENQ_FULL = 0, 1, 2, 3
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# A broken or refused connection (pg_terminate_backend, restart, network): not the statement's fault.
_CONNECTION_ERRORS = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                      asyncpg.exceptions.OperatorInterventionError,
                      asyncpg.exceptions.TooManyConnectionsError)


class StoreUnavailable(StoreError):
    """The database cannot be reached (or refused the connection); nothing was written."""


class OutcomeUnknown(StoreUnavailable):
    """The connection broke after the statement was sent: it may or may not have committed. A retry
    with the same message id is safe (deduplicated)."""


# Versioned schema, applied in order under the advisory lock; the version is recorded in
# schema_version. Each entry: (version, name, SQL).
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "relay tables", """
CREATE TABLE accounts (
    username TEXT PRIMARY KEY,
    identity BYTEA NOT NULL,
    created_ms BIGINT NOT NULL,
    signed_prekey BYTEA,
    kem_last_resort BYTEA
);
CREATE TABLE invites (
    token_hash BYTEA PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE TABLE one_time_prekeys (
    username TEXT NOT NULL,
    kind SMALLINT NOT NULL,
    key_id BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (username, kind, key_id)
);
CREATE TABLE mailbox_heads (
    recipient TEXT PRIMARY KEY,
    next_seq BIGINT NOT NULL DEFAULT 1,
    queued INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE messages (
    recipient TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sender TEXT NOT NULL,
    msg_id BYTEA NOT NULL,
    kind TEXT NOT NULL,
    body BYTEA NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (recipient, seq)
);
CREATE TABLE recent_ids (
    sender TEXT NOT NULL,
    msg_id BYTEA NOT NULL,
    recipient TEXT NOT NULL,
    seq BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (sender, msg_id, recipient)
);
CREATE INDEX recent_ids_by_ts ON recent_ids (ts);

-- One round trip per batch of sends; see the module docstring for the locking order.
CREATE FUNCTION cp_enqueue(p_senders TEXT[], p_recipients TEXT[], p_ids BYTEA[], p_kinds TEXT[],
                           p_bodies BYTEA[], p_ts BIGINT[], p_max_queue INTEGER[])
RETURNS TABLE (idx INTEGER, status SMALLINT, seq BIGINT) LANGUAGE plpgsql AS $$
DECLARE
    i INTEGER;
    head RECORD;
    found_seq BIGINT;
BEGIN
    FOR i IN SELECT t.ord FROM unnest(p_recipients) WITH ORDINALITY AS t(r, ord) ORDER BY t.r, t.ord
    LOOP
        idx := i;
        SELECT h.next_seq, h.queued INTO head FROM mailbox_heads h
            WHERE h.recipient = p_recipients[i] FOR UPDATE;
        IF NOT FOUND THEN
            status := 2; seq := NULL; RETURN NEXT; CONTINUE;
        END IF;
        SELECT r.seq INTO found_seq FROM recent_ids r
            WHERE r.sender = p_senders[i] AND r.msg_id = p_ids[i] AND r.recipient = p_recipients[i];
        IF FOUND THEN
            status := 1; seq := found_seq; RETURN NEXT; CONTINUE;
        END IF;
        IF head.queued >= p_max_queue[i] THEN
            status := 3; seq := NULL; RETURN NEXT; CONTINUE;
        END IF;
        UPDATE mailbox_heads SET next_seq = head.next_seq + 1, queued = head.queued + 1
            WHERE recipient = p_recipients[i];
        INSERT INTO messages (recipient, seq, sender, msg_id, kind, body, ts)
            VALUES (p_recipients[i], head.next_seq, p_senders[i], p_ids[i], p_kinds[i], p_bodies[i], p_ts[i]);
        INSERT INTO recent_ids (sender, msg_id, recipient, seq, ts)
            VALUES (p_senders[i], p_ids[i], p_recipients[i], head.next_seq, p_ts[i]);
        status := 0; seq := head.next_seq; RETURN NEXT;
    END LOOP;
END $$;

-- Acks: delete, then lower the queued counts (heads locked in sorted order, as in cp_enqueue).
CREATE FUNCTION cp_ack(p_recipients TEXT[], p_seqs BIGINT[]) RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    total INTEGER := 0;
    d RECORD;
BEGIN
    FOR d IN
        WITH gone AS (
            DELETE FROM messages m USING unnest(p_recipients, p_seqs) AS a(r, s)
            WHERE m.recipient = a.r AND m.seq = a.s RETURNING m.recipient)
        SELECT recipient, count(*)::INTEGER AS n FROM gone GROUP BY recipient ORDER BY recipient
    LOOP
        UPDATE mailbox_heads SET queued = queued - d.n WHERE recipient = d.recipient;
        total := total + d.n;
    END LOOP;
    RETURN total;
END $$;
"""),
)


def parse_store_url(url: str) -> tuple[str, str]:
    """``postgresql://...?schema=NAME`` -> (DSN for asyncpg without ``schema``, schema name)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql:// URL: {parts.scheme or url!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), "cipherpost")
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"schema name {schema!r}: use lower-case letters, digits and '_' (at most 63)")
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), schema


EnqueueCallback = Callable[[EnqueueResult | None, StoreError | None], None]


class PostgresRelayStore:
    """The scale-out store: one PostgreSQL schema shared by every relay instance."""

    def __init__(self, url: str, *, schema: str | None = None, workers: int = WORKERS) -> None:
        self._dsn, url_schema = parse_store_url(url)
        self.schema = schema or url_schema
        if not _SCHEMA_NAME.fullmatch(self.schema):
            raise ValueError(f"schema name {self.schema!r}: use lower-case letters, digits and '_'")
        self._workers = workers
        self._pool: Any = None
        self._sends: list[tuple[NewMessage, int, EnqueueCallback]] = []
        self._acks: list[tuple[str, Sequence[int]]] = []
        self._ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._busy = 0
        self._idle: asyncio.Event | None = None
        self._closed = False
        self.batches = 0
        self.batched_ops = 0

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self._migrate()
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self._workers + EXTRA_CONNECTIONS,
                server_settings={"search_path": self.schema, "application_name": "cipherpost-relay"})
        except _CONNECTION_ERRORS as exc:
            raise StoreUnavailable(f"cannot reach PostgreSQL ({type(exc).__name__})") from None
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self._workers)]

    async def _migrate(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            async with conn.transaction():
                # Instances starting together queue here; each migration runs once.
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", MIGRATION_LOCK,
                                   self.schema)
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                                   "name TEXT NOT NULL, applied_ms BIGINT NOT NULL)")
                current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
                newest = MIGRATIONS[-1][0]
                if current > newest:
                    raise StoreError(f"store schema version {current} is newer than this relay's "
                                     f"({newest}); upgrade cipherpost")
                for version, name, sql in MIGRATIONS:
                    if version > current:
                        await conn.execute(sql)
                        await conn.execute("INSERT INTO schema_version VALUES ($1, $2, "
                                           "(extract(epoch FROM now()) * 1000)::BIGINT)", version, name)
                        log.info("event=store_migrated schema=%s version=%d name=%s", self.schema,
                                 version, name.replace(" ", "_"))
        finally:
            await conn.close()

    async def close(self) -> None:
        if self._pool is None or self._closed:
            return
        self._closed = True
        assert self._idle is not None and self._ready is not None
        while self._sends or self._acks or self._busy:  # finish what was already submitted
            self._ready.set()
            self._idle.clear()
            await self._idle.wait()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pool, self._pool = self._pool, None
        await pool.close()

    async def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(connection)`` with a pooled connection; connection failures become typed errors."""
        if self._pool is None:
            raise StoreError("store is not open")
        sent = False
        try:
            async with self._pool.acquire() as conn:
                sent = True
                return await fn(conn)
        except StoreError:
            raise
        except _CONNECTION_ERRORS as exc:
            kind = OutcomeUnknown if sent else StoreUnavailable
            raise kind(f"database connection failed ({type(exc).__name__})") from None

    # --- sends and acks: batched by the workers ---------------------------------------------

    def enqueue(self, message: NewMessage, max_queue: int) -> asyncio.Future[EnqueueResult]:
        future: asyncio.Future[EnqueueResult] = asyncio.get_running_loop().create_future()
        self.enqueue_then(message, max_queue, partial(_resolve, future))
        return future

    def enqueue_then(self, message: NewMessage, max_queue: int, callback: EnqueueCallback) -> None:
        if self._ready is None or self._closed:
            raise StoreError("store is not open")
        self._sends.append((message, max_queue, callback))
        self._ready.set()

    def ack_later(self, recipient: str, seqs: Sequence[int]) -> None:
        if self._ready is None or self._closed:
            raise StoreError("store is not open")
        self._acks.append((recipient, seqs))
        self._ready.set()

    async def ack(self, recipient: str, seqs: Sequence[int]) -> int:
        seq_list = list(seqs)
        return int(await self._call(lambda c: c.fetchval("SELECT cp_ack($1, $2)", [recipient] * len(seq_list),
                                                         seq_list)))

    async def _worker(self) -> None:
        assert self._ready is not None and self._idle is not None
        while True:
            if not self._sends and not self._acks:
                self._ready.clear()
                if not self._busy:
                    self._idle.set()
                await self._ready.wait()
                continue
            sends, self._sends = self._sends[:MAX_BATCH], self._sends[MAX_BATCH:]
            acks, self._acks = self._acks, []
            self._busy += 1
            try:
                if acks:
                    await self._run_acks(acks)
                if sends:
                    await self._run_sends(sends)
            except Exception as exc:  # a worker must survive anything; each op was completed
                log.error("event=store_worker_failed error=%s", type(exc).__name__, exc_info=True)
            finally:
                self._busy -= 1
                if not self._busy and not self._sends and not self._acks:
                    self._idle.set()

    async def _run_acks(self, acks: list[tuple[str, Sequence[int]]]) -> None:
        recipients = [r for r, seqs in acks for _ in seqs]
        seqs = [s for _, ss in acks for s in ss]
        try:
            await self._call(lambda c: c.fetchval("SELECT cp_ack($1, $2)", recipients, seqs))
        except StoreError as exc:  # the client acks again after its next sync
            log.error("event=store_ack_failed error=%s", type(exc).__name__)

    async def _run_sends(self, sends: list[tuple[NewMessage, int, EnqueueCallback]]) -> None:
        self.batches += 1
        self.batched_ops += len(sends)
        try:
            rows = await self._call(partial(_enqueue_call, [m for m, _, _ in sends],
                                            [q for _, q, _ in sends]))
        except StoreError as exc:
            for _, _, callback in sends:
                _callback(callback, None, exc)
            return
        except Exception as exc:  # a database error (not the connection): isolate the bad send
            if len(sends) == 1:
                log.error("event=store_enqueue_failed error=%s", type(exc).__name__)
                _callback(sends[0][2], None, StoreError(f"database error ({type(exc).__name__})"))
                return
            log.error("event=store_batch_failed ops=%d error=%s; retrying one by one", len(sends),
                      type(exc).__name__)
            for one in sends:
                await self._run_sends([one])
            return
        for idx, status, seq in rows:
            message, _, callback = sends[idx - 1]
            if status == _ENQ_ACCEPTED:
                _callback(callback, EnqueueResult(seq=seq, duplicate=False), None)
            elif status == _ENQ_DUPLICATE:
                _callback(callback, EnqueueResult(seq=seq, duplicate=True), None)
            elif status == _ENQ_UNKNOWN:
                _callback(callback, None, UnknownAccount(message.recipient))
            else:
                _callback(callback, None, MailboxFull(message.recipient))

    # --- accounts ---------------------------------------------------------------------------

    async def create_account(self, username: str, identity: bytes, now_ms: int,
                             invite_hash: bytes | None = None) -> None:
        async def op(conn: Any) -> None:
            async with conn.transaction():
                if invite_hash is not None:
                    used = await conn.fetchval("DELETE FROM invites WHERE token_hash=$1 AND expires_ms >= $2 "
                                               "RETURNING 1", invite_hash, now_ms)
                    if used is None:
                        raise InvalidInvite("invite token is unknown, used or expired")
                made = await conn.fetchval("INSERT INTO accounts(username, identity, created_ms) "
                                           "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING 1",
                                           username, identity, now_ms)
                if made is None:
                    raise UsernameTaken(username)  # the transaction rolls back: the invite stays
                await conn.execute("INSERT INTO mailbox_heads(recipient) VALUES ($1) ON CONFLICT DO NOTHING",
                                   username)
        await self._call(op)

    async def get_identity(self, username: str) -> bytes | None:
        value = await self._call(lambda c: c.fetchval("SELECT identity FROM accounts WHERE username=$1",
                                                      username))
        return None if value is None else bytes(value)

    async def add_invite(self, token_hash: bytes, now_ms: int, expires_ms: int) -> None:
        await self._call(lambda c: c.execute("INSERT INTO invites(token_hash, created_ms, expires_ms) "
                                             "VALUES ($1, $2, $3)", token_hash, now_ms, expires_ms))

    # --- prekeys ----------------------------------------------------------------------------

    @staticmethod
    async def _counts(conn: Any, username: str) -> PoolCounts:
        rows = await conn.fetch("SELECT kind, count(*) FROM one_time_prekeys WHERE username=$1 GROUP BY kind",
                                username)
        have = {r[0]: r[1] for r in rows}
        return PoolCounts(one_time=have.get(_X25519, 0), kem=have.get(_KEM, 0))

    async def put_prekeys(self, username: str, *, signed_prekey: bytes | None,
                          one_time: Sequence[tuple[int, bytes]], kem_one_time: Sequence[tuple[int, bytes]],
                          kem_last_resort: bytes | None, max_pool: int) -> PoolCounts:
        rows = ([(username, _X25519, k, d) for k, d in one_time]
                + [(username, _KEM, k, d) for k, d in kem_one_time])
        n_one_time, n_kem = len(one_time), len(kem_one_time)

        async def op(conn: Any) -> PoolCounts:
            async with conn.transaction():
                locked = await conn.fetchval("SELECT 1 FROM accounts WHERE username=$1 FOR UPDATE", username)
                if locked is None:
                    raise UnknownAccount(username)
                have = await self._counts(conn, username)
                if have.one_time + n_one_time > max_pool or have.kem + n_kem > max_pool:
                    raise PrekeyPoolFull(f"a one-time prekey pool would exceed {max_pool} keys")
                await conn.execute("UPDATE accounts SET signed_prekey=coalesce($2, signed_prekey), "
                                   "kem_last_resort=coalesce($3, kem_last_resort) WHERE username=$1",
                                   username, signed_prekey, kem_last_resort)
                if rows:
                    await conn.executemany("INSERT INTO one_time_prekeys(username, kind, key_id, data) "
                                           "VALUES ($1, $2, $3, $4) ON CONFLICT (username, kind, key_id) "
                                           "DO UPDATE SET data=excluded.data", rows)
                return await self._counts(conn, username)
        return await self._call(op)

    async def prekey_counts(self, username: str) -> PoolCounts:
        return await self._call(lambda c: self._counts(c, username))

    async def take_bundle(self, username: str) -> BundleParts:
        async def take(conn: Any, kind: int) -> bytes | None:
            data = await conn.fetchval(
                "DELETE FROM one_time_prekeys WHERE (username, kind, key_id) = "
                "(SELECT username, kind, key_id FROM one_time_prekeys WHERE username=$1 AND kind=$2 "
                "ORDER BY key_id LIMIT 1) RETURNING data",
                username, kind)
            return None if data is None else bytes(data)

        async def op(conn: Any) -> BundleParts:
            async with conn.transaction():
                # The account row is the lock: concurrent fetches of this account take turns here.
                row = await conn.fetchrow("SELECT identity, signed_prekey, kem_last_resort FROM accounts "
                                          "WHERE username=$1 FOR UPDATE", username)
                if row is None:
                    raise UnknownAccount(username)
                identity, signed, last_resort = row
                if signed is None:
                    raise NoPrekeys(username)
                one_time = await take(conn, _X25519)
                kem = await take(conn, _KEM)
                if kem is None:
                    if last_resort is None:
                        raise NoPrekeys(username)  # the transaction rolls back the one-time key
                    kem = bytes(last_resort)
                return BundleParts(identity=bytes(identity), signed_prekey=bytes(signed), kem_prekey=kem,
                                   one_time_prekey=one_time, remaining=await self._counts(conn, username))
        return await self._call(op)

    # --- mailboxes --------------------------------------------------------------------------

    async def pending(self, recipient: str, after_seq: int, limit: int) -> list[StoredMessage]:
        rows = await self._call(lambda c: c.fetch(
            "SELECT seq, sender, msg_id, kind, body, ts FROM messages WHERE recipient=$1 AND seq>$2 "
            "ORDER BY seq LIMIT $3", recipient, after_seq, limit))
        return [StoredMessage(seq=r[0], recipient=recipient, sender=r[1], msg_id=bytes(r[2]), kind=r[3],
                              body=bytes(r[4]), ts=r[5]) for r in rows]

    async def prune(self, now_ms: int, dedup_window_ms: int) -> None:
        async def op(conn: Any) -> None:
            await conn.execute("DELETE FROM recent_ids WHERE ts < $1", now_ms - dedup_window_ms)
            await conn.execute("DELETE FROM invites WHERE expires_ms < $1", now_ms)
        await self._call(op)

    async def stats(self) -> StoreStats:
        async def op(conn: Any) -> StoreStats:
            row = await conn.fetchrow("SELECT (SELECT count(*) FROM accounts), "
                                      "(SELECT coalesce(sum(queued), 0) FROM mailbox_heads)")
            return StoreStats(accounts=int(row[0]), queued_messages=int(row[1]))
        return await self._call(op)


async def _enqueue_call(messages: list[NewMessage], max_queues: list[int], conn: Any) -> list[Any]:
    rows: list[Any] = await conn.fetch(
        "SELECT idx, status, seq FROM cp_enqueue($1, $2, $3, $4, $5, $6, $7)",
        [m.sender for m in messages], [m.recipient for m in messages], [m.msg_id for m in messages],
        [m.kind for m in messages], [m.body for m in messages], [m.ts for m in messages], max_queues)
    return rows


def _callback(callback: EnqueueCallback, result: EnqueueResult | None, error: StoreError | None) -> None:
    try:
        callback(result, error)
    except Exception as exc:  # one failing callback must not leave the others uncompleted
        log.error("event=store_callback_failed error=%s", type(exc).__name__, exc_info=True)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
