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
  WAL flush for the batch), up to ``MAX_BATCH``. Each sender's sends go to one worker (by hash),
  so they commit in the order the sender made them, as on SQLite.
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
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # optional dependency (the [scale] extra): this module is imported only for postgresql://

from ..protocol.errors import ProtocolError
from ..protocol.usernames import require_normalized, skeleton
from .base import (
    EPOCH_BYTES,
    MAX_BLOCKS,
    MAX_FANOUT,
    AccountDeleted,
    AccountInfo,
    AccountState,
    AccountSuspended,
    BlockListFull,
    BundleParts,
    Delivery,
    EnqueueCallback,
    EnqueueManyCallback,
    EnqueueResult,
    InvalidDelivery,
    InvalidInvite,
    InvalidName,
    MailboxFull,
    MailboxPolicy,
    NameConfusable,
    NameReserved,
    NewMessage,
    NoPrekeys,
    OperatorAction,
    PoolCounts,
    PrekeyPoolFull,
    QuotaExceeded,
    RecipientResult,
    RecipientStatus,
    SenderCapReached,
    StoredMessage,
    StoreError,
    StoreStats,
    UnknownAccount,
    UsageRow,
    UsernameTaken,
)
from .migrations import PG_ADVISORY_LOCK_KEY, migrate_postgres
from .postgres_blobs import PostgresBlobs

T = TypeVar("T")
log = logging.getLogger("cipherpost.store")

MAX_BATCH = 512  # deliveries per cp_enqueue call
WORKERS = 4  # concurrent cp_enqueue calls (each a group commit)
EXTRA_CONNECTIONS = 8  # pool connections for everything else (sync pages, prekeys, accounts)
USAGE_KEEP_MS = 90 * 24 * 3600 * 1000  # usage rows older than this are pruned
_X25519 = 0
_KEM = 1
_STATUSES = (RecipientStatus.ACCEPTED, RecipientStatus.DUPLICATE, RecipientStatus.UNKNOWN_USER,
             RecipientStatus.SUSPENDED, RecipientStatus.MAILBOX_FULL, RecipientStatus.SENDER_CAP,
             RecipientStatus.QUOTA_EXCEEDED)  # cp_enqueue's status codes, by index
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


class _Send:
    """One delivery waiting for a worker; ``single`` ones answer with EnqueueResult or an error."""

    __slots__ = ("callback", "delivery", "policy", "single")

    def __init__(self, delivery: Delivery, policy: MailboxPolicy, single: bool,
                 callback: Callable[[Any, StoreError | None], None]) -> None:
        self.delivery = delivery
        self.policy = policy
        self.single = single
        self.callback = callback


class _Lane:
    """One worker's queue: the sends of the senders hashed to it, and acks."""

    __slots__ = ("acks", "busy", "idle", "ready", "sends")

    def __init__(self) -> None:
        self.sends: list[_Send] = []
        self.acks: list[tuple[str, Sequence[int]]] = []
        self.ready = asyncio.Event()
        self.idle = asyncio.Event()
        self.busy = False


def _policy(policy: MailboxPolicy | int) -> MailboxPolicy:
    return MailboxPolicy.queue_only(policy) if isinstance(policy, int) else policy


def _single_result(recipient: str, status: RecipientStatus, seq: int | None) -> EnqueueResult:
    """A single-recipient send's result, or the error its status stands for (raised)."""
    if status is RecipientStatus.ACCEPTED:
        return EnqueueResult(seq=seq or 0, duplicate=False, dropped=seq is None)
    if status is RecipientStatus.DUPLICATE:
        return EnqueueResult(seq=seq or 0, duplicate=True, dropped=seq is None)
    raise {RecipientStatus.UNKNOWN_USER: UnknownAccount, RecipientStatus.SUSPENDED: AccountSuspended,
           RecipientStatus.MAILBOX_FULL: MailboxFull, RecipientStatus.SENDER_CAP: SenderCapReached,
           RecipientStatus.QUOTA_EXCEEDED: QuotaExceeded}[status](recipient)


def _check_name(name: str) -> str:
    try:
        return require_normalized(name)
    except ProtocolError:
        raise InvalidName(f"{name!r} is not a valid username") from None


class PostgresRelayStore(PostgresBlobs):
    """The scale-out store: one PostgreSQL schema shared by every relay instance."""

    def __init__(self, url: str, *, schema: str | None = None, workers: int = WORKERS) -> None:
        self._dsn, url_schema = parse_store_url(url)
        self.schema = schema or url_schema
        if not _SCHEMA_NAME.fullmatch(self.schema):
            raise ValueError(f"schema name {self.schema!r}: use lower-case letters, digits and '_'")
        self._workers = workers
        self._pool: Any = None
        self._lanes: list[_Lane] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.batches = 0
        self.batched_ops = 0

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self._migrate()
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self._workers + EXTRA_CONNECTIONS,
                server_settings={"search_path": self.schema,
                                 "application_name": f"cipherpost-relay:{self.schema}"})
        except _CONNECTION_ERRORS as exc:
            raise StoreUnavailable(f"cannot reach PostgreSQL ({type(exc).__name__})") from None
        self._lanes = [_Lane() for _ in range(self._workers)]
        self._tasks = [asyncio.create_task(self._worker(lane)) for lane in self._lanes]

    async def _migrate(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            async with conn.transaction():
                # the runner's lock, taken before CREATE SCHEMA too (which races); it is re-entrant
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PG_ADVISORY_LOCK_KEY)
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
                await migrate_postgres(conn.execute, conn.fetchval, f"PostgreSQL schema {self.schema!r}")
                await conn.execute("INSERT INTO epoch VALUES (1, $1, $2) ON CONFLICT DO NOTHING",
                                   os.urandom(EPOCH_BYTES), _now_ms())
        finally:
            await conn.close()

    async def close(self) -> None:
        if self._pool is None or self._closed:
            return
        self._closed = True
        for lane in self._lanes:  # finish what was already submitted
            while lane.sends or lane.acks or lane.busy:
                lane.ready.set()
                lane.idle.clear()
                await lane.idle.wait()
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

    def _submit(self, op: _Send) -> None:
        if not self._lanes or self._closed:
            raise StoreError("store is not open")
        # One lane per sender: its sends commit in the order it made them (as on SQLite).
        lane = self._lanes[hash(op.delivery.sender) % len(self._lanes)]
        lane.sends.append(op)
        lane.ready.set()

    def enqueue_many_then(self, delivery: Delivery, policy: MailboxPolicy,
                          callback: EnqueueManyCallback) -> None:
        recipients = delivery.recipients
        if not recipients or len(recipients) > MAX_FANOUT or len(set(recipients)) != len(recipients):
            raise InvalidDelivery(f"a delivery needs 1 to {MAX_FANOUT} distinct recipients")
        self._submit(_Send(delivery, policy, False, callback))

    async def enqueue_many(self, delivery: Delivery, policy: MailboxPolicy) -> list[RecipientResult]:
        future: asyncio.Future[list[RecipientResult]] = asyncio.get_running_loop().create_future()
        self.enqueue_many_then(delivery, policy, partial(_resolve, future))
        return await future

    def enqueue(self, message: NewMessage, policy: MailboxPolicy | int) -> asyncio.Future[EnqueueResult]:
        future: asyncio.Future[EnqueueResult] = asyncio.get_running_loop().create_future()
        self.enqueue_then(message, policy, partial(_resolve, future))
        return future

    def enqueue_then(self, message: NewMessage, policy: MailboxPolicy | int,
                     callback: EnqueueCallback) -> None:
        m = message
        delivery = Delivery(sender=m.sender, msg_id=m.msg_id, kind=m.kind, body=m.body, ts=m.ts,
                            recipients=(m.recipient,))
        self._submit(_Send(delivery, _policy(policy), True, callback))

    def ack_later(self, recipient: str, seqs: Sequence[int]) -> None:
        if not self._lanes or self._closed:
            raise StoreError("store is not open")
        lane = self._lanes[hash(recipient) % len(self._lanes)]
        lane.acks.append((recipient, seqs))
        lane.ready.set()

    async def ack(self, recipient: str, seqs: Sequence[int]) -> int:
        seq_list = list(seqs)
        return int(await self._call(lambda c: c.fetchval(
            "SELECT cp_remove($1, $2, false)", [recipient] * len(seq_list), seq_list)))

    async def _worker(self, lane: _Lane) -> None:
        while True:
            if not lane.sends and not lane.acks:
                lane.ready.clear()
                lane.idle.set()
                await lane.ready.wait()
                continue
            sends, lane.sends = lane.sends[:MAX_BATCH], lane.sends[MAX_BATCH:]
            acks, lane.acks = lane.acks, []
            lane.busy = True
            try:
                if acks:
                    await self._run_acks(acks)
                if sends:
                    await self._run_sends(sends)
            except Exception as exc:  # a worker must survive anything; each op was completed
                log.error("event=store_worker_failed error=%s", type(exc).__name__, exc_info=True)
            finally:
                lane.busy = False

    async def _run_acks(self, acks: list[tuple[str, Sequence[int]]]) -> None:
        recipients = [r for r, seqs in acks for _ in seqs]
        seqs = [s for _, ss in acks for s in ss]
        try:
            await self._call(lambda c: c.fetchval("SELECT cp_remove($1, $2, false)", recipients, seqs))
        except StoreError as exc:  # the client acks again after its next sync
            log.error("event=store_ack_failed error=%s", type(exc).__name__)

    async def _run_sends(self, sends: list[_Send]) -> None:
        self.batches += 1
        self.batched_ops += len(sends)
        try:
            rows = await self._call(partial(_enqueue_call, sends))
        except StoreError as exc:
            for op in sends:
                _callback(op.callback, None, exc)
            return
        except Exception as exc:  # a database error (not the connection): isolate the bad send
            if len(sends) == 1:
                log.error("event=store_enqueue_failed error=%s", type(exc).__name__)
                _callback(sends[0].callback, None, StoreError(f"database error ({type(exc).__name__})"))
                return
            log.error("event=store_batch_failed ops=%d error=%s; retrying one by one", len(sends),
                      type(exc).__name__)
            for one in sends:
                await self._run_sends([one])
            return
        results: list[list[RecipientResult]] = [[] for _ in sends]
        for didx, _ridx, status, seq in rows:  # per delivery, in the order of its recipients
            done = results[didx - 1]
            recipient = sends[didx - 1].delivery.recipients[len(done)]
            done.append(RecipientResult(recipient, _STATUSES[status], seq))
        for op, result in zip(sends, results, strict=True):
            if not op.single:
                _callback(op.callback, result, None)
                continue
            try:
                single = _single_result(result[0].recipient, result[0].status, result[0].seq)
            except StoreError as exc:
                _callback(op.callback, None, exc)
            else:
                _callback(op.callback, single, None)

    # --- accounts ---------------------------------------------------------------------------

    async def create_account(self, username: str, identity: bytes, now_ms: int,
                             invite_hash: bytes | None = None, recovery_public: bytes | None = None) -> None:
        name = _check_name(username)
        skel = skeleton(name)

        async def op(conn: Any) -> None:
            async with conn.transaction():
                if invite_hash is not None:
                    used = await conn.fetchval("DELETE FROM invites WHERE token_hash=$1 AND expires_ms >= $2 "
                                               "RETURNING 1", invite_hash, now_ms)
                    if used is None:
                        raise InvalidInvite("invite token is unknown, used or expired")
                state = await conn.fetchval("SELECT state FROM accounts WHERE username=$1", name)
                if state is not None:
                    raise (NameReserved if state == AccountState.DELETED.value else UsernameTaken)(name)
                if await conn.fetchval("SELECT 1 FROM reserved_names WHERE name=$1 OR skeleton=$2 LIMIT 1",
                                       name, skel) is not None:
                    raise NameReserved(name)
                similar = await conn.fetchrow("SELECT username, state FROM accounts WHERE skeleton=$1", skel)
                if similar is not None:
                    if similar[1] == AccountState.DELETED.value:
                        raise NameReserved(name)
                    raise NameConfusable(name, similar[0])
                try:
                    async with conn.transaction():  # a savepoint: a racing registration wins cleanly
                        await conn.execute(
                            "INSERT INTO accounts(username, identity, created_ms, skeleton, recovery_public) "
                            "VALUES ($1, $2, $3, $4, $5)", name, identity, now_ms, skel, recovery_public)
                except asyncpg.UniqueViolationError:
                    raise UsernameTaken(name) from None  # the transaction rolls back: the invite stays
                await conn.execute("INSERT INTO mailbox_heads(recipient) VALUES ($1) ON CONFLICT DO NOTHING",
                                   name)
        await self._call(op)

    async def get_identity(self, username: str) -> bytes | None:
        value = await self._call(lambda c: c.fetchval(
            "SELECT identity FROM accounts WHERE username=$1 AND state='active'", username))
        return None if value is None else bytes(value)

    _ACCOUNT_COLUMNS = ("username, identity, state, created_ms, recovery_public, login_counter, "
                        "state_changed_ms, state_by, state_reason")

    @staticmethod
    def _account(row: Any) -> AccountInfo:
        return AccountInfo(username=row[0], identity=bytes(row[1]), state=AccountState(row[2]),
                           created_ms=row[3], recovery_public=None if row[4] is None else bytes(row[4]),
                           login_counter=row[5], state_changed_ms=row[6], state_by=row[7],
                           state_reason=row[8])

    async def get_account(self, username: str) -> AccountInfo | None:
        row = await self._call(lambda c: c.fetchrow(
            f"SELECT {self._ACCOUNT_COLUMNS} FROM accounts WHERE username=$1", username))  # noqa: S608
        return None if row is None else self._account(row)

    async def list_accounts(self) -> list[AccountInfo]:
        rows = await self._call(lambda c: c.fetch(
            f"SELECT {self._ACCOUNT_COLUMNS} FROM accounts ORDER BY username"))  # noqa: S608
        return [self._account(r) for r in rows]

    async def set_state(self, username: str, state: AccountState, by: str, reason: str) -> None:
        if state is AccountState.DELETED:
            raise ValueError("use delete_account to delete an account")
        now = _now_ms()

        async def op(conn: Any) -> None:
            async with conn.transaction():
                current = await conn.fetchval("SELECT state FROM accounts WHERE username=$1 FOR UPDATE",
                                              username)
                if current is None:
                    raise UnknownAccount(username)
                if current == AccountState.DELETED.value:
                    raise AccountDeleted(username)
                await conn.execute("UPDATE accounts SET state=$2, state_changed_ms=$3, state_by=$4, "
                                   "state_reason=$5 WHERE username=$1",
                                   username, state.value, now, by, reason)
                await conn.execute("INSERT INTO account_events(ts, username, action, actor, reason) "
                                   "VALUES ($1, $2, $3, $4, $5)", now, username, state.value, by, reason)
        await self._call(op)

    async def delete_account(self, username: str, by: str, reason: str) -> None:
        now = _now_ms()

        async def op(conn: Any) -> None:
            async with conn.transaction():
                # The head first (as every send and ack does), then the account row.
                await conn.execute("SELECT 1 FROM mailbox_heads WHERE recipient=$1 FOR UPDATE", username)
                current = await conn.fetchval("SELECT state FROM accounts WHERE username=$1 FOR UPDATE",
                                              username)
                if current is None:
                    raise UnknownAccount(username)
                if current == AccountState.DELETED.value:
                    return
                await conn.fetchval("SELECT cp_remove($1, NULL, true)", [username])
                await conn.execute("DELETE FROM one_time_prekeys WHERE username=$1", username)
                await conn.execute("DELETE FROM blocks WHERE owner=$1 OR blocked=$1", username)
                await conn.execute(
                    "UPDATE accounts SET state='deleted', identity='', signed_prekey=NULL, "
                    "kem_last_resort=NULL, recovery_public=NULL, state_changed_ms=$2, state_by=$3, "
                    "state_reason=$4 WHERE username=$1",
                    username, now, by, reason)
                await conn.execute("INSERT INTO account_events(ts, username, action, actor, reason) "
                                   "VALUES ($1, $2, 'deleted', $3, $4)", now, username, by, reason)
        await self._call(op)

    async def _update_live_account(self, username: str, sql: str, *args: Any) -> None:
        async def op(conn: Any) -> None:
            async with conn.transaction():
                current = await conn.fetchval("SELECT state FROM accounts WHERE username=$1 FOR UPDATE",
                                              username)
                if current is None:
                    raise UnknownAccount(username)
                if current == AccountState.DELETED.value:
                    raise AccountDeleted(username)
                await conn.execute(sql, username, *args)
        await self._call(op)

    async def rebind_identity(self, username: str, identity: bytes, recovery_public: bytes | None) -> None:
        async def op(conn: Any) -> None:
            async with conn.transaction():
                current = await conn.fetchval("SELECT state FROM accounts WHERE username=$1 FOR UPDATE",
                                              username)
                if current is None:
                    raise UnknownAccount(username)
                if current == AccountState.DELETED.value:
                    raise AccountDeleted(username)
                await conn.execute("UPDATE accounts SET identity=$2, recovery_public=$3, login_counter=0, "
                                   "signed_prekey=NULL, kem_last_resort=NULL WHERE username=$1",
                                   username, identity, recovery_public)
                await conn.execute("DELETE FROM one_time_prekeys WHERE username=$1", username)
        await self._call(op)

    async def set_recovery_public(self, username: str, recovery_public: bytes) -> None:
        await self._update_live_account(username, "UPDATE accounts SET recovery_public=$2 WHERE username=$1",
                                        recovery_public)

    async def bump_login(self, username: str, counter: int) -> bool:
        async def op(conn: Any) -> bool:
            done = await conn.fetchval("UPDATE accounts SET login_counter=$2 WHERE username=$1 "
                                       "AND login_counter <= $2 RETURNING 1", username, counter)
            if done is not None:
                return True
            if await conn.fetchval("SELECT 1 FROM accounts WHERE username=$1", username) is None:
                raise UnknownAccount(username)
            return False
        return await self._call(op)

    async def reserve(self, names: Sequence[str]) -> None:
        rows = [(n, skeleton(n), _now_ms()) for n in (_check_name(x) for x in names)]
        await self._call(lambda c: c.executemany(
            "INSERT INTO reserved_names(name, skeleton, created_ms) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING",
            rows))

    async def unreserve(self, names: Sequence[str]) -> None:
        await self._call(lambda c: c.execute("DELETE FROM reserved_names WHERE name = ANY($1)", list(names)))

    async def reserved(self) -> list[str]:
        rows = await self._call(lambda c: c.fetch("SELECT name FROM reserved_names ORDER BY name"))
        return [r[0] for r in rows]

    async def add_invite(self, token_hash: bytes, now_ms: int, expires_ms: int) -> None:
        await self._call(lambda c: c.execute("INSERT INTO invites(token_hash, created_ms, expires_ms) "
                                             "VALUES ($1, $2, $3)", token_hash, now_ms, expires_ms))

    # --- operator log (migration 4) ---------------------------------------------------------

    async def log_operator_action(self, operator: str, action: str, names: Sequence[str], reason: str,
                                  now_ms: int) -> None:
        await self._call(lambda c: c.execute(
            "INSERT INTO operator_log(ts_ms, operator, action, names, reason) VALUES ($1, $2, $3, $4, $5)",
            now_ms, operator, action, json.dumps(list(names)), reason))

    async def operator_log(self, after_id: int, limit: int) -> list[OperatorAction]:
        rows = await self._call(lambda c: c.fetch(
            "SELECT id, ts_ms, operator, action, names, reason FROM operator_log WHERE id > $1 "
            "ORDER BY id LIMIT $2", after_id, limit))
        return [OperatorAction(id=r[0], ts_ms=r[1], operator=r[2], action=r[3], names=tuple(json.loads(r[4])),
                               reason=r[5]) for r in rows]

    # --- prekeys ----------------------------------------------------------------------------

    @staticmethod
    async def _counts(conn: Any, username: str) -> PoolCounts:
        rows = await conn.fetch("SELECT kind, count(*) FROM one_time_prekeys WHERE username=$1 GROUP BY kind",
                                username)
        have = {r[0]: r[1] for r in rows}
        return PoolCounts(one_time=have.get(_X25519, 0), kem=have.get(_KEM, 0))

    async def put_prekeys(self, username: str, *, signed_prekey: bytes | None,
                          one_time: Sequence[tuple[int, bytes]], kem_one_time: Sequence[tuple[int, bytes]],
                          kem_last_resort: bytes | None, max_pool: int,
                          replace_pools: bool = False) -> PoolCounts:
        rows = ([(username, _X25519, k, d) for k, d in one_time]
                + [(username, _KEM, k, d) for k, d in kem_one_time])
        n_one_time, n_kem = len(one_time), len(kem_one_time)

        async def op(conn: Any) -> PoolCounts:
            async with conn.transaction():
                locked = await conn.fetchval("SELECT 1 FROM accounts WHERE username=$1 AND state='active' "
                                             "FOR UPDATE", username)
                if locked is None:
                    raise UnknownAccount(username)
                if replace_pools:
                    await conn.execute("DELETE FROM one_time_prekeys WHERE username=$1", username)
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

    async def take_bundle(self, username: str, *, one_time: bool = True) -> BundleParts:
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
                                          "WHERE username=$1 AND state='active' FOR UPDATE", username)
                if row is None:
                    raise UnknownAccount(username)
                identity, signed, last_resort = row
                if signed is None:
                    raise NoPrekeys(username)
                # one_time=False (the relay's per-target drain bound) spends no one-time key
                otpk = await take(conn, _X25519) if one_time else None
                kem = await take(conn, _KEM) if one_time or last_resort is None else None
                if kem is None:
                    if last_resort is None:
                        raise NoPrekeys(username)  # the transaction rolls back the one-time key
                    kem = bytes(last_resort)
                return BundleParts(identity=bytes(identity), signed_prekey=bytes(signed), kem_prekey=kem,
                                   one_time_prekey=otpk, remaining=await self._counts(conn, username))
        return await self._call(op)

    # --- mailboxes --------------------------------------------------------------------------

    async def pending(self, recipient: str, after_seq: int, limit: int) -> list[StoredMessage]:
        rows = await self._call(lambda c: c.fetch(
            "SELECT m.seq, m.sender, m.msg_id, m.kind, coalesce(m.body, b.body), m.ts FROM messages m "
            "LEFT JOIN bodies b ON b.id = m.body_id WHERE m.recipient=$1 AND m.seq>$2 "
            "ORDER BY m.seq LIMIT $3",
            recipient, after_seq, limit))
        return [StoredMessage(seq=r[0], recipient=recipient, sender=r[1], msg_id=bytes(r[2]), kind=r[3],
                              body=bytes(r[4]), ts=r[5]) for r in rows]

    async def set_block(self, owner: str, blocked: str, blocked_on: bool) -> None:
        async def op(conn: Any) -> None:
            async with conn.transaction():
                found = await conn.fetch("SELECT username FROM accounts WHERE username = ANY($1) "
                                         "ORDER BY username FOR SHARE", [owner, blocked])
                names = {r[0] for r in found}
                for name in (owner, blocked):
                    if name not in names:
                        raise UnknownAccount(name)
                if not blocked_on:
                    await conn.execute("DELETE FROM blocks WHERE owner=$1 AND blocked=$2", owner, blocked)
                    return
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('cp-block:' || $1))", owner)
                if await conn.fetchval("SELECT 1 FROM blocks WHERE owner=$1 AND blocked=$2", owner, blocked):
                    return
                if await conn.fetchval("SELECT count(*) FROM blocks WHERE owner=$1", owner) >= MAX_BLOCKS:
                    raise BlockListFull(owner)
                await conn.execute("INSERT INTO blocks(owner, blocked, created_ms) VALUES ($1, $2, $3)",
                                   owner, blocked, _now_ms())
        await self._call(op)

    async def blocked(self, owner: str) -> list[str]:
        rows = await self._call(lambda c: c.fetch(
            "SELECT blocked FROM blocks WHERE owner=$1 ORDER BY blocked", owner))
        return [r[0] for r in rows]

    # --- operators and upkeep ---------------------------------------------------------------

    async def usage(self, since_ms: int) -> list[UsageRow]:
        rows = await self._call(lambda c: c.fetch(
            "WITH sent_rows AS (SELECT sender, sum(messages) AS m, sum(bytes) AS b FROM usage "
            "WHERE hour >= $1 GROUP BY sender), "
            "stored AS (SELECT sender, sum(bytes) AS s FROM mailbox_senders GROUP BY sender) "
            "SELECT coalesce(x.sender, y.sender), coalesce(x.m, 0), coalesce(x.b, 0), coalesce(y.s, 0) "
            "FROM sent_rows x FULL JOIN stored y ON x.sender = y.sender "
            "ORDER BY 2 DESC, 3 DESC, 4 DESC, 1", since_ms // 3_600_000))
        return [UsageRow(sender=r[0], messages=int(r[1]), bytes_sent=int(r[2]), bytes_stored=int(r[3]))
                for r in rows]

    async def epoch(self) -> bytes:
        return bytes(await self._call(lambda c: c.fetchval("SELECT value FROM epoch WHERE id=1")))

    async def renew_epoch(self) -> bytes:
        value = os.urandom(EPOCH_BYTES)
        await self._call(lambda c: c.execute("UPDATE epoch SET value=$1, created_ms=$2 WHERE id=1", value,
                                             _now_ms()))
        return value

    async def prune(self, now_ms: int, dedup_window_ms: int) -> None:
        async def op(conn: Any) -> None:
            await conn.execute("DELETE FROM sent WHERE ts < $1", now_ms - dedup_window_ms)
            await conn.execute("DELETE FROM invites WHERE expires_ms < $1", now_ms)
            await conn.execute("DELETE FROM usage WHERE hour < $1", (now_ms - USAGE_KEEP_MS) // 3_600_000)
        await self._call(op)

    async def stats(self) -> StoreStats:
        async def op(conn: Any) -> StoreStats:
            row = await conn.fetchrow("SELECT (SELECT count(*) FROM accounts WHERE state <> 'deleted'), "
                                      "(SELECT coalesce(sum(queued), 0) FROM mailbox_heads)")
            return StoreStats(accounts=int(row[0]), queued_messages=int(row[1]))
        return await self._call(op)


async def _enqueue_call(sends: list[_Send], conn: Any) -> list[Any]:
    first: list[int] = []
    count: list[int] = []
    recipients: list[str] = []
    for op in sends:
        first.append(len(recipients) + 1)
        count.append(len(op.delivery.recipients))
        recipients.extend(op.delivery.recipients)
    ds = [op.delivery for op in sends]
    ps = [op.policy for op in sends]
    rows: list[Any] = await conn.fetch(
        "SELECT didx, ridx, status, seq FROM cp_enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        [d.sender for d in ds], [d.msg_id for d in ds], [d.kind for d in ds], [d.body for d in ds],
        [d.ts for d in ds], first, count, recipients, [p.max_queue for p in ps],
        [p.max_queue_per_sender for p in ps], [p.max_stored_bytes for p in ps],
        [p.disk_budget_bytes for p in ps])
    return rows


def _callback(callback: Callable[[Any, StoreError | None], None], result: Any,
              error: StoreError | None) -> None:
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


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
