"""SQLite backend of :class:`~cipherpost.store.base.RelayStore`: WAL, one writer thread, group commit.

Every operation is a function run on one dedicated thread that owns the only connection. The
thread takes *all* operations that queued up while it was busy, runs them in one transaction,
commits once (``synchronous=FULL``: the WAL is fsynced), and only then completes their futures, in
one callback on the event loop. So a burst of N sends costs one fsync, not N, and nothing is
reported as stored before it is on disk. Operations check everything before writing, so a refused
operation (``MailboxFull`` ...) leaves the shared transaction intact; an unexpected database error
rolls the batch back and re-runs each operation in a transaction of its own.

In-memory caches (next sequence number, queue lengths, known accounts) are owned by the writer
thread and are valid because this process is the only writer of messages and accounts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from .base import (
    AccountInfo,
    AccountState,
    BundleParts,
    Delivery,
    EnqueueManyCallback,
    EnqueueResult,
    InvalidInvite,
    MailboxFull,
    MailboxPolicy,
    NewMessage,
    NoPrekeys,
    OperatorAction,
    PoolCounts,
    PrekeyPoolFull,
    RecipientResult,
    StoredMessage,
    StoreError,
    StoreStats,
    UnknownAccount,
    UsageRow,
    UsernameTaken,
)

T = TypeVar("T")
log = logging.getLogger("cipherpost.store")

_SCHEMA_VERSION = 1
_X25519 = 0
_KEM = 1
_MAX_BATCH = 1024

_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS operator_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms INTEGER NOT NULL,
    operator TEXT NOT NULL,
    action TEXT NOT NULL,
    names TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS recent_ids (
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    msg_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (recipient, sender, msg_id)
) WITHOUT ROWID;
"""


class _Op:
    __slots__ = ("error", "fn", "future", "result")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.future = future
        self.result: Any = None
        self.error: BaseException | None = None


EnqueueCallback = Callable[[EnqueueResult | None, StoreError | None], None]


def _max_queue(policy: MailboxPolicy | int) -> int:
    return policy if isinstance(policy, int) else policy.max_queue


class _EnqueueOp:
    """A send; consecutive ones in a batch are checked and inserted together (executemany).

    Completed by calling ``callback(result, error)`` on the event loop: no future per message.
    """

    __slots__ = ("callback", "error", "max_queue", "message", "result")

    def __init__(self, message: NewMessage, max_queue: int, callback: EnqueueCallback) -> None:
        self.message = message
        self.max_queue = max_queue
        self.callback = callback
        self.result: EnqueueResult | None = None
        self.error: StoreError | None = None


class _AckOp:
    """An ack: its deletes run before the sends of its batch. Completed like _EnqueueOp, if at all."""

    __slots__ = ("callback", "error", "recipient", "result", "seqs")

    def __init__(self, recipient: str, seqs: Sequence[int],
                 callback: Callable[[int | None, StoreError | None], None] | None) -> None:
        self.recipient = recipient
        self.seqs = seqs
        self.callback = callback
        self.result: int | None = None
        self.error: StoreError | None = None


_AnyOp = _Op | _EnqueueOp | _AckOp
_STOP = object()
_DEDUP_CHUNK = 300  # rows per lookup statement (3 parameters each, far below SQLite's limit)


class SqliteRelayStore:
    """The default store: one SQLite file in WAL mode, written by one thread with group commits."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
        self.path = Path(path)
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        # Writer-thread caches, see the module docstring.
        self._next_seq = 1
        self._queue_len: dict[str, int] = {}
        self._known_accounts: set[str] = set()
        self.batches = 0
        self.batched_ops = 0

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="cipherpost-store",
                                        daemon=True)
        self._thread.start()
        await ready

    async def close(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        # Up to 64 MiB of page cache (default 2 MiB): the dedup table of a busy relay outgrows the
        # default, and every miss is a read syscall on the writer thread (~10% of its CPU in bench).
        conn.execute("PRAGMA cache_size=-65536")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, _SCHEMA_VERSION):
            conn.close()
            raise StoreError(f"database schema version {version} is not supported")
        conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={_SCHEMA_VERSION}; COMMIT;")
        self._load_caches(conn)
        return conn

    def _load_caches(self, conn: sqlite3.Connection) -> None:
        # Sequence numbers never repeat: every accepted message leaves its seq in recent_ids for
        # the dedup window, and prune() records the next seq in meta before forgetting any.
        row = conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        stored = row[0] if row else 1
        top = conn.execute("SELECT max(coalesce((SELECT max(seq) FROM messages), 0), "
                           "coalesce((SELECT max(seq) FROM recent_ids), 0))").fetchone()[0]
        self._next_seq = max(stored, top + 1)
        self._queue_len.clear()
        self._known_accounts.clear()

    # --- the writer thread ------------------------------------------------------------------

    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
        except BaseException as exc:
            loop.call_soon_threadsafe(_fail_future, ready, exc)
            return
        self._conn = conn
        loop.call_soon_threadsafe(_set_future, ready, None)
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch: list[_AnyOp] = []
            if item is _STOP:
                stopping = True
            else:
                batch.append(item)
            while len(batch) < _MAX_BATCH:  # everything that arrived meanwhile joins this commit
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                self._run_batch(conn, batch)
                try:
                    loop.call_soon_threadsafe(_complete, batch)
                except RuntimeError:  # the event loop is gone (closed without close()): stop
                    log.error("event=store_loop_closed ops=%d", len(batch))
                    break
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_AnyOp]) -> None:
        self.batches += 1
        self.batched_ops += len(batch)
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Acks first, so that they do not split runs of sends (each run is one dedup query and
            # one executemany). A client acks only seqs it was delivered, i.e. committed earlier,
            # so running them before this batch's sends changes nothing it can observe.
            others: list[_Op | _EnqueueOp] = []
            for op in batch:
                if type(op) is _AckOp:
                    self._ack_run(conn, op)
                else:
                    others.append(op)  # type: ignore[arg-type]
            i = 0
            while i < len(others):
                op = others[i]
                if type(op) is _EnqueueOp:
                    j = i + 1
                    while j < len(others) and type(others[j]) is _EnqueueOp:
                        j += 1
                    self._enqueue_run(conn, others[i:j])  # type: ignore[arg-type]
                    i = j
                    continue
                assert isinstance(op, _Op)
                try:
                    op.result = op.fn(conn)
                except StoreError as exc:  # refused before writing anything: the batch goes on
                    op.error = exc
                i += 1
            conn.execute("COMMIT")
            return
        except Exception:  # a database error, or a bug in one operation: isolate it
            log.exception("event=store_batch_failed ops=%d; retrying one by one", len(batch))
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._load_caches(conn)
        for op in batch:
            op.result, op.error = None, None
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if type(op) is _EnqueueOp:
                        self._enqueue_run(conn, [op])
                    elif type(op) is _AckOp:
                        self._ack_run(conn, op)
                    else:
                        assert isinstance(op, _Op)
                        op.result = op.fn(conn)
                except StoreError as exc:
                    op.error = exc
                conn.execute("COMMIT")
            except Exception as exc:
                log.error("event=store_op_failed error=%s", type(exc).__name__)
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._load_caches(conn)
                op.result, op.error = None, StoreError(f"database error ({type(exc).__name__})")

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._loop is None or self._closed:
            raise StoreError("store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Op(fn, future))
        return future

    # --- accounts ---------------------------------------------------------------------------

    async def create_account(self, username: str, identity: bytes, now_ms: int,
                             invite_hash: bytes | None = None, recovery_public: bytes | None = None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if invite_hash is not None:
                row = conn.execute("SELECT expires_ms FROM invites WHERE token_hash=?",
                                   (invite_hash,)).fetchone()
                if row is None or row[0] < now_ms:
                    raise InvalidInvite("invite token is unknown, used or expired")
            if conn.execute("SELECT 1 FROM accounts WHERE username=?", (username,)).fetchone():
                raise UsernameTaken(username)
            if invite_hash is not None:
                conn.execute("DELETE FROM invites WHERE token_hash=?", (invite_hash,))
            conn.execute("INSERT INTO accounts(username, identity, created_ms) VALUES (?, ?, ?)",
                         (username, identity, now_ms))
        await self._submit(op)

    async def get_identity(self, username: str) -> bytes | None:
        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT identity FROM accounts WHERE username=?", (username,)).fetchone()
            return None if row is None else bytes(row[0])
        return await self._submit(op)

    async def add_invite(self, token_hash: bytes, now_ms: int, expires_ms: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO invites(token_hash, created_ms, expires_ms) VALUES (?, ?, ?)",
                         (token_hash, now_ms, expires_ms))
        await self._submit(op)

    # --- prekeys ----------------------------------------------------------------------------

    @staticmethod
    def _counts(conn: sqlite3.Connection, username: str) -> PoolCounts:
        rows = dict(conn.execute("SELECT kind, count(*) FROM one_time_prekeys WHERE username=? "
                                 "GROUP BY kind", (username,)).fetchall())
        return PoolCounts(one_time=rows.get(_X25519, 0), kem=rows.get(_KEM, 0))

    @staticmethod
    def _require_account(conn: sqlite3.Connection, username: str) -> tuple[Any, ...]:
        row = conn.execute("SELECT identity, signed_prekey, kem_last_resort FROM accounts "
                           "WHERE username=?", (username,)).fetchone()
        if row is None:
            raise UnknownAccount(username)
        return tuple(row)

    async def put_prekeys(self, username: str, *, signed_prekey: bytes | None,
                          one_time: Sequence[tuple[int, bytes]], kem_one_time: Sequence[tuple[int, bytes]],
                          kem_last_resort: bytes | None, max_pool: int) -> PoolCounts:
        one_time, kem_one_time = list(one_time), list(kem_one_time)

        def op(conn: sqlite3.Connection) -> PoolCounts:
            self._require_account(conn, username)
            have = self._counts(conn, username)
            if have.one_time + len(one_time) > max_pool or have.kem + len(kem_one_time) > max_pool:
                raise PrekeyPoolFull(f"a one-time prekey pool would exceed {max_pool} keys")
            if signed_prekey is not None:
                conn.execute("UPDATE accounts SET signed_prekey=? WHERE username=?",
                             (signed_prekey, username))
            if kem_last_resort is not None:
                conn.execute("UPDATE accounts SET kem_last_resort=? WHERE username=?",
                             (kem_last_resort, username))
            conn.executemany("INSERT OR REPLACE INTO one_time_prekeys(username, kind, key_id, data) "
                             "VALUES (?, ?, ?, ?)",
                             [(username, _X25519, k, d) for k, d in one_time]
                             + [(username, _KEM, k, d) for k, d in kem_one_time])
            return self._counts(conn, username)
        return await self._submit(op)

    async def prekey_counts(self, username: str) -> PoolCounts:
        return await self._submit(lambda conn: self._counts(conn, username))

    async def take_bundle(self, username: str) -> BundleParts:
        def take(conn: sqlite3.Connection, kind: int) -> bytes | None:
            row = conn.execute("SELECT key_id, data FROM one_time_prekeys WHERE username=? AND kind=? "
                               "ORDER BY key_id LIMIT 1", (username, kind)).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM one_time_prekeys WHERE username=? AND kind=? AND key_id=?",
                         (username, kind, row[0]))
            return bytes(row[1])

        def op(conn: sqlite3.Connection) -> BundleParts:
            identity, signed, last_resort = self._require_account(conn, username)
            has_kem = conn.execute("SELECT 1 FROM one_time_prekeys WHERE username=? AND kind=? LIMIT 1",
                                   (username, _KEM)).fetchone() is not None
            if signed is None or (last_resort is None and not has_kem):
                raise NoPrekeys(username)
            one_time = take(conn, _X25519)
            kem = take(conn, _KEM) or bytes(last_resort)
            return BundleParts(identity=bytes(identity), signed_prekey=bytes(signed), kem_prekey=kem,
                               one_time_prekey=one_time, remaining=self._counts(conn, username))
        return await self._submit(op)

    # --- mailboxes --------------------------------------------------------------------------

    def _account_exists(self, conn: sqlite3.Connection, username: str) -> bool:
        if username in self._known_accounts:
            return True
        if conn.execute("SELECT 1 FROM accounts WHERE username=?", (username,)).fetchone() is None:
            return False
        self._known_accounts.add(username)  # accounts are never deleted, so this stays true
        return True

    def _queued(self, conn: sqlite3.Connection, recipient: str) -> int:
        n = self._queue_len.get(recipient)
        if n is None:
            n = conn.execute("SELECT count(*) FROM messages WHERE recipient=?", (recipient,)).fetchone()[0]
            self._queue_len[recipient] = n
        return n

    def enqueue(self, message: NewMessage, policy: MailboxPolicy | int) -> asyncio.Future[EnqueueResult]:
        if self._loop is None or self._closed:
            raise StoreError("store is not open")
        future: asyncio.Future[EnqueueResult] = self._loop.create_future()
        self._queue.put(_EnqueueOp(message, _max_queue(policy), partial(_resolve, future)))
        return future

    def enqueue_then(self, message: NewMessage, policy: MailboxPolicy | int,
                     callback: EnqueueCallback) -> None:
        if self._closed:
            raise StoreError("store is not open")
        self._queue.put(_EnqueueOp(message, _max_queue(policy), callback))

    def _enqueue_run(self, conn: sqlite3.Connection, ops: list[_EnqueueOp]) -> None:
        """Check and insert consecutive sends with a few statements instead of three per message."""
        seen: dict[tuple[str, str, bytes], int] = {}
        for start in range(0, len(ops), _DEDUP_CHUNK):
            chunk = ops[start:start + _DEDUP_CHUNK]
            params: list[Any] = []
            for op in chunk:
                params += (op.message.recipient, op.message.sender, op.message.msg_id)
            values = ",".join(["(?,?,?)"] * len(chunk))
            for recipient, sender, msg_id, seq in conn.execute(
                    "SELECT r.recipient, r.sender, r.msg_id, r.seq FROM (VALUES " + values + ") AS v "  # noqa: S608
                    "CROSS JOIN recent_ids AS r ON r.recipient=v.column1 AND r.sender=v.column2 "
                    "AND r.msg_id=v.column3", params):
                seen[(recipient, sender, bytes(msg_id))] = seq
        messages: list[tuple[Any, ...]] = []
        ids: list[tuple[Any, ...]] = []
        for op in ops:
            m = op.message
            if not self._account_exists(conn, m.recipient):
                op.error = UnknownAccount(m.recipient)
                continue
            key = (m.recipient, m.sender, m.msg_id)
            seq = seen.get(key)
            if seq is not None:
                op.result = EnqueueResult(seq=seq, duplicate=True)
                continue
            queued = self._queued(conn, m.recipient)
            if queued >= op.max_queue:
                op.error = MailboxFull(m.recipient)
                continue
            seq = self._next_seq
            self._next_seq = seq + 1
            seen[key] = seq
            self._queue_len[m.recipient] = queued + 1
            messages.append((seq, m.recipient, m.sender, m.msg_id, m.kind, m.body, m.ts))
            ids.append((m.recipient, m.sender, m.msg_id, seq, m.ts))
            op.result = EnqueueResult(seq=seq, duplicate=False)
        if messages:
            conn.executemany("INSERT INTO messages(seq, recipient, sender, msg_id, kind, body, ts) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", messages)
            conn.executemany("INSERT INTO recent_ids(recipient, sender, msg_id, seq, ts) "
                             "VALUES (?, ?, ?, ?, ?)", ids)

    async def pending(self, recipient: str, after_seq: int, limit: int) -> list[StoredMessage]:
        def op(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute("SELECT seq, sender, msg_id, kind, body, ts FROM messages "
                                "WHERE recipient=? AND seq>? ORDER BY seq LIMIT ?",
                                (recipient, after_seq, limit)).fetchall()
            return [StoredMessage(seq=r[0], recipient=recipient, sender=r[1], msg_id=bytes(r[2]), kind=r[3],
                                  body=bytes(r[4]), ts=r[5]) for r in rows]
        return await self._submit(op)

    def _ack_run(self, conn: sqlite3.Connection, op: _AckOp) -> None:
        recipient = op.recipient
        before = conn.total_changes
        conn.executemany("DELETE FROM messages WHERE seq=? AND recipient=?",
                         [(seq, recipient) for seq in op.seqs])
        deleted = conn.total_changes - before
        if deleted and recipient in self._queue_len:
            self._queue_len[recipient] -= deleted
        op.result = deleted

    def ack_later(self, recipient: str, seqs: Sequence[int]) -> None:
        if self._closed:
            raise StoreError("store is not open")
        self._queue.put(_AckOp(recipient, seqs, None))

    def ack_nowait(self, recipient: str, seqs: Sequence[int]) -> asyncio.Future[int]:
        if self._loop is None or self._closed:
            raise StoreError("store is not open")
        future: asyncio.Future[int] = self._loop.create_future()
        self._queue.put(_AckOp(recipient, seqs, partial(_resolve, future)))
        return future

    async def ack(self, recipient: str, seqs: Sequence[int]) -> int:
        return await self.ack_nowait(recipient, seqs)

    # --- store v2 (docs/contracts.md 1.1-1.5): interface committed first, implementation follows ---

    async def get_account(self, username: str) -> AccountInfo | None:
        raise NotImplementedError("store v2: not built yet")

    async def list_accounts(self) -> list[AccountInfo]:
        raise NotImplementedError("store v2: not built yet")

    async def set_state(self, username: str, state: AccountState, by: str, reason: str) -> None:
        raise NotImplementedError("store v2: not built yet")

    async def delete_account(self, username: str, by: str, reason: str) -> None:
        raise NotImplementedError("store v2: not built yet")

    async def rebind_identity(self, username: str, identity: bytes, recovery_public: bytes | None) -> None:
        raise NotImplementedError("store v2: not built yet")

    async def set_recovery_public(self, username: str, recovery_public: bytes) -> None:
        raise NotImplementedError("store v2: not built yet")

    async def bump_login(self, username: str, counter: int) -> bool:
        raise NotImplementedError("store v2: not built yet")

    async def reserve(self, names: Sequence[str]) -> None:
        raise NotImplementedError("store v2: not built yet")

    async def unreserve(self, names: Sequence[str]) -> None:
        raise NotImplementedError("store v2: not built yet")

    async def reserved(self) -> list[str]:
        raise NotImplementedError("store v2: not built yet")

    def enqueue_many_then(self, delivery: Delivery, policy: MailboxPolicy,
                          callback: EnqueueManyCallback) -> None:
        raise NotImplementedError("store v2: not built yet")

    async def enqueue_many(self, delivery: Delivery, policy: MailboxPolicy) -> list[RecipientResult]:
        raise NotImplementedError("store v2: not built yet")

    async def set_block(self, owner: str, blocked: str, blocked_on: bool) -> None:
        raise NotImplementedError("store v2: not built yet")

    async def blocked(self, owner: str) -> list[str]:
        raise NotImplementedError("store v2: not built yet")

    async def usage(self, since_ms: int) -> list[UsageRow]:
        raise NotImplementedError("store v2: not built yet")

    async def epoch(self) -> bytes:
        raise NotImplementedError("store v2: not built yet")

    async def renew_epoch(self) -> bytes:
        raise NotImplementedError("store v2: not built yet")

    # --- operator log -----------------------------------------------------------------------

    async def log_operator_action(self, operator: str, action: str, names: Sequence[str], reason: str,
                                  now_ms: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO operator_log(ts_ms, operator, action, names, reason) "
                         "VALUES (?, ?, ?, ?, ?)",
                         (now_ms, operator, action, json.dumps(list(names)), reason))
        await self._submit(op)

    async def operator_log(self, after_id: int, limit: int) -> list[OperatorAction]:
        def op(conn: sqlite3.Connection) -> list[OperatorAction]:
            rows = conn.execute("SELECT id, ts_ms, operator, action, names, reason FROM operator_log "
                                "WHERE id>? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
            return [OperatorAction(id=r[0], ts_ms=r[1], operator=r[2], action=r[3],
                                   names=tuple(json.loads(r[4])), reason=r[5]) for r in rows]
        return await self._submit(op)

    async def prune(self, now_ms: int, dedup_window_ms: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO meta(key, value) VALUES('next_seq', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (self._next_seq,))
            conn.execute("DELETE FROM recent_ids WHERE ts < ?", (now_ms - dedup_window_ms,))
            conn.execute("DELETE FROM invites WHERE expires_ms < ?", (now_ms,))
        await self._submit(op)

    async def stats(self) -> StoreStats:
        def op(conn: sqlite3.Connection) -> StoreStats:
            accounts = conn.execute("SELECT count(*) FROM accounts").fetchone()[0]
            queued = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
            return StoreStats(accounts=accounts, queued_messages=queued)
        return await self._submit(op)


def _set_future(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail_future(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _complete(batch: list[_AnyOp]) -> None:
    """Runs on the event loop after the batch committed: complete every operation of it at once."""
    for op in batch:
        if isinstance(op, _Op):
            _resolve(op.future, op.result, op.error)
            continue
        callback: Callable[[Any, StoreError | None], None] | None = op.callback
        if callback is None:
            if op.error is not None:
                log.error("event=store_failed error=%s", type(op.error).__name__)
            continue
        try:
            callback(op.result, op.error)
        except Exception as exc:  # one failing callback must not leave the others uncompleted
            log.error("event=store_callback_failed error=%s", type(exc).__name__, exc_info=True)
