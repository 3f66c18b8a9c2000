"""SQLite backend of :class:`~cipherpost.store.base.RelayStore`: WAL, one writer thread, group commit.

Every operation is a function run on one dedicated thread that owns the only connection. The
thread takes *all* operations that queued up while it was busy, runs them in one transaction,
commits once (``synchronous=FULL``: the WAL is fsynced), and only then completes their futures, in
one callback on the event loop. So a burst of N sends costs one fsync, not N, and nothing is
reported as stored before it is on disk. Operations check everything before writing, so a refused
operation (``MailboxFull`` ...) leaves the shared transaction intact; an unexpected database error
rolls the batch back and re-runs each operation in a transaction of its own. One writer also means
that each recipient's sequence numbers commit in order (docs/contracts.md 1.3).

Mailbox rules (contracts 1.2) are checked per recipient against writer-thread counters: per
recipient (messages queued, bytes stored) and per (sender, recipient), each loaded once by one
grouped query when a recipient is first touched and then kept running by enqueue and ack; with the
account's state and block list. They are valid because this process is the only writer of
messages; another process that commits (an operator command) bumps ``PRAGMA data_version``, which
the writer checks before each batch and then reloads everything.

A message for one recipient keeps its body in its ``messages`` row (the 1:1 path: two inserts, as
before fan-out existed); a fan-out stores its body once in ``bodies`` and each recipient's row
points at it; the body is deleted with its last reference. Dedup is one ``sent`` row per
``(sender, msg_id)`` listing the recipients it was accepted for.

At rest (docs/contracts.md 1.6): ``PRAGMA secure_delete=ON`` zeroes deleted rows, and the writer runs
``PRAGMA wal_checkpoint(TRUNCATE)`` at most ``checkpoint_interval_s`` after a write, so an acked
body is gone from ``relay.db`` and ``relay.db-wal`` within that interval.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from . import sqlite_accounts as accounts
from . import sqlite_blobs as blobs
from .base import (
    MAX_FANOUT,
    AccountInfo,
    AccountState,
    AccountSuspended,
    BlobInfo,
    BundleParts,
    Delivery,
    EnqueueCallback,
    EnqueueManyCallback,
    EnqueueResult,
    InvalidDelivery,
    MailboxFull,
    MailboxPolicy,
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
)
from .migrations import migrate_sqlite

T = TypeVar("T")
log = logging.getLogger("cipherpost.store")

CHECKPOINT_INTERVAL_S = 30.0  # an acked body leaves relay.db / relay.db-wal within this (contracts 1.6)
CHECKPOINT_RETRY_S = 1.0  # after a checkpoint that a reader blocked
USAGE_BUCKET_MS = 3_600_000  # usage counters per sender and hour
USAGE_KEEP_MS = 8 * 24 * USAGE_BUCKET_MS  # a day and a week for `admin top`, with a margin
USAGE_FLUSH_S = 10.0  # usage counters are written at most this often (counts only: a crash loses <= 10 s)
_CACHE_LIMIT = 100_000  # mailboxes cached by the writer; beyond it the cache starts again (all persisted)
_RECENT_LIMIT = 50_000  # unacked messages whose row the writer remembers (~9 MiB); older ones are read
_X25519 = 0
_KEM = 1
_MAX_BATCH = 1024
_DEDUP_CHUNK = 400  # (sender, msg_id) pairs per lookup statement, far below SQLite's parameter limit
_ACK_CHUNK = 500

_ACCEPTED = RecipientStatus.ACCEPTED
_DUPLICATE = RecipientStatus.DUPLICATE
_UNKNOWN = RecipientStatus.UNKNOWN_USER
_SUSPENDED = RecipientStatus.SUSPENDED
_FULL = RecipientStatus.MAILBOX_FULL
_SENDER_CAP = RecipientStatus.SENDER_CAP
_QUOTA = RecipientStatus.QUOTA_EXCEEDED
_SINGLE_ERRORS: dict[RecipientStatus, type[StoreError]] = {
    _UNKNOWN: UnknownAccount, _SUSPENDED: AccountSuspended, _FULL: MailboxFull,
    _SENDER_CAP: SenderCapReached, _QUOTA: QuotaExceeded}


class _Box:
    """Writer-thread view of one account as a recipient: state, counters, block list."""

    __slots__ = ("active", "blocks", "per_sender", "queued", "stored_bytes")

    def __init__(self, active: bool) -> None:
        self.active = active
        self.queued = 0
        self.stored_bytes = 0
        self.per_sender: dict[str, int] = {}
        self.blocks: set[str] | None = None  # None: blocks nobody (the common case, no set)


class _Op:
    __slots__ = ("error", "fn", "future", "result")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.future = future
        self.result: Any = None
        self.error: BaseException | None = None


class _EnqueueOp:
    """A send to one or more recipients; consecutive ones in a batch are checked and inserted together
    (one dedup query, one executemany). Completed by calling ``callback(result, error)`` on the event
    loop: no future per message. ``item`` is a NewMessage (one recipient: the result is an
    EnqueueResult or a StoreError) or a Delivery (a list of RecipientResult). Its fields are read on
    the writer thread: the event loop only makes this object (the server's per-message cost)."""

    __slots__ = ("callback", "error", "item", "policy", "result")

    def __init__(self, item: NewMessage | Delivery, policy: MailboxPolicy | int,
                 callback: Callable[[Any, StoreError | None], None]) -> None:
        self.item = item
        self.policy = policy
        self.callback = callback
        self.result: Any = None
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


@functools.lru_cache(maxsize=16)
def _queue_only(max_queue: int) -> MailboxPolicy:
    return MailboxPolicy.queue_only(max_queue)


# --- blob metadata (store/sqlite_blobs.py; the owner's byte counter is the one quota ledger) ------

class _BlobMixin:
    """Blob methods of :class:`SqliteRelayStore`, kept apart from its mail hot path."""

    _boxes: dict[str, _Box]
    _total_bytes: int | None
    _box: Callable[[sqlite3.Connection, str], _Box | None]
    _total: Callable[[sqlite3.Connection], int]
    _submit: Callable[..., asyncio.Future[Any]]

    def _charge(self, owner: str, delta: int) -> None:
        box = self._boxes.get(owner)
        if box is not None:
            box.stored_bytes += delta
        if self._total_bytes is not None:
            self._total_bytes += delta

    async def blob_reserve(self, owner: str, blob_id: bytes, size: int, chunk_size: int, now_ms: int,
                           policy: MailboxPolicy) -> BlobInfo:
        def op(conn: sqlite3.Connection) -> BlobInfo:
            found = blobs.existing(conn, owner, blob_id, size, chunk_size)
            if found is not None:
                return found
            box = self._box(conn, owner)
            if box is None or not box.active:
                raise UnknownAccount(f"no active account {owner!r}")
            budget = policy.disk_budget_bytes
            if (box.stored_bytes + size > policy.max_stored_bytes
                    or (budget is not None and self._total(conn) + size > budget)):
                raise QuotaExceeded("the owner's storage quota or the disk budget is used up")
            created = blobs.insert(conn, owner, blob_id, size, chunk_size, now_ms)
            self._charge(owner, size)
            return created
        result: BlobInfo = await self._submit(op)
        return result

    async def blob_info(self, blob_id: bytes) -> BlobInfo | None:
        result: BlobInfo | None = await self._submit(partial(blobs.info, blob_id=blob_id))
        return result

    async def blob_commit(self, blob_id: bytes, owner: str, readers: Sequence[str]) -> BlobInfo:
        result: BlobInfo = await self._submit(partial(blobs.commit, blob_id=blob_id, owner=owner,
                                                      readers=readers))
        return result

    async def blob_release(self, blob_id: bytes, who: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            gone = blobs.release(conn, blob_id, who)
            if gone is None:
                return False
            self._charge(gone.owner, -gone.size)
            return True
        result: bool = await self._submit(op)
        return result

    async def blobs_expired(self, before_ms: int) -> list[bytes]:
        def op(conn: sqlite3.Connection) -> list[bytes]:
            rows = blobs.expired(conn, before_ms)
            for _, owner, size in rows:
                self._charge(owner, -size)
            return [r[0] for r in rows]
        result: list[bytes] = await self._submit(op)
        return result


class SqliteRelayStore(_BlobMixin):
    """The default store: one SQLite file in WAL mode, written by one thread with group commits."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL",
                 checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
        if not checkpoint_interval_s > 0:
            raise ValueError("checkpoint_interval_s must be positive")
        self.path = Path(path)
        self._synchronous = synchronous
        self._checkpoint_interval_s = checkpoint_interval_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        # Writer-thread state, see the module docstring.
        self._next_seq = 1
        self._boxes: dict[str, _Box] = {}
        # seq -> (recipient, sender, size, body_id) of messages this writer stored and not yet acked,
        # oldest first, at most _RECENT_LIMIT: an ack then needs no read (see _ack_run).
        self._recent: dict[int, tuple[str, str, int, int | None]] = {}
        self._total_bytes: int | None = None  # every stored body once; loaded when a disk budget is used
        self._data_version = 0
        self._usage_batch: dict[tuple[str, int], list[int]] = {}  # this transaction's, uncommitted
        self._usage_pending: dict[tuple[str, int], list[int]] = {}  # committed sends, not yet written
        self._usage_flushing: dict[tuple[str, int], list[int]] = {}  # written in this transaction
        self._usage_flushed_at = time.monotonic()
        self._wal_dirty_since: float | None = None
        self.batches = 0
        self.batched_ops = 0
        self.checkpoints = 0  # truncating checkpoints done
        self.checkpointed_batch = 0  # value of `batches` when the last one ran

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
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten with zeros
            # Up to 64 MiB of page cache (default 2 MiB): the dedup table of a busy relay outgrows the
            # default, and every miss is a read syscall on the writer thread (~10% of its CPU in bench).
            conn.execute("PRAGMA cache_size=-65536")
            migrate_sqlite(conn, f"the relay store {self.path}")
        except BaseException:
            conn.close()
            raise
        self._load_caches(conn)
        return conn

    def _load_caches(self, conn: sqlite3.Connection) -> None:
        # Sequence numbers never repeat: every accepted message leaves its seq in `sent` for the
        # dedup window, and prune() records the next seq in meta before forgetting any.
        row = conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        stored = row[0] if row else 1
        top = conn.execute("SELECT max(coalesce((SELECT max(seq) FROM messages), 0), "
                           "coalesce((SELECT max(seq) FROM sent), 0))").fetchone()[0]
        self._next_seq = max(stored, top + 1)
        self._boxes.clear()
        self._recent.clear()
        self._total_bytes = None
        self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]

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
            timeout = None
            if self._wal_dirty_since is not None:
                timeout = max(0.0, self._wal_dirty_since + self._checkpoint_interval_s - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                self._checkpoint(conn)
                continue
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
                changes = conn.total_changes
                self._run_batch(conn, batch)
                if conn.total_changes != changes and self._wal_dirty_since is None:
                    self._wal_dirty_since = time.monotonic()
                try:
                    loop.call_soon_threadsafe(_complete, batch)
                except RuntimeError:  # the event loop is gone (closed without close()): stop
                    log.error("event=store_loop_closed ops=%d", len(batch))
                    break
            now = time.monotonic()
            if self._usage_pending and now - self._usage_flushed_at >= USAGE_FLUSH_S:
                self._in_transaction(conn, self._flush_usage)
            dirty_since = self._wal_dirty_since
            if dirty_since is not None and now - dirty_since >= self._checkpoint_interval_s:
                self._checkpoint(conn)
        if self._usage_pending:
            self._in_transaction(conn, self._flush_usage)
        self._checkpoint(conn)
        conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL into relay.db and truncate it: deleted (zeroed) rows replace the WAL frames
        that still held acked bodies. A reader in another process can block it: retry soon."""
        try:
            conn.execute("PRAGMA busy_timeout=100")
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            busy = 1
            log.error("event=store_checkpoint_failed error=%s", type(exc).__name__)
        if busy:
            self._wal_dirty_since = time.monotonic() - self._checkpoint_interval_s + CHECKPOINT_RETRY_S
            return
        self._wal_dirty_since = None
        self.checkpoints += 1
        self.checkpointed_batch = self.batches

    def _in_transaction(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], None]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            fn(conn)
            conn.execute("COMMIT")
            self._committed()
        except sqlite3.Error as exc:
            log.error("event=store_upkeep_failed error=%s", type(exc).__name__)
            self._rolled_back(conn)

    def _committed(self) -> None:
        for key, (n, nbytes) in self._usage_batch.items():
            counts = self._usage_pending.setdefault(key, [0, 0])
            counts[0] += n
            counts[1] += nbytes
        self._usage_batch.clear()
        self._usage_flushing.clear()

    def _rolled_back(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        self._usage_batch.clear()
        for key, (n, nbytes) in self._usage_flushing.items():  # not written after all
            counts = self._usage_pending.setdefault(key, [0, 0])
            counts[0] += n
            counts[1] += nbytes
        self._usage_flushing.clear()
        self._load_caches(conn)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_AnyOp]) -> None:
        self.batches += 1
        self.batched_ops += len(batch)
        try:
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("PRAGMA data_version").fetchone()[0] != self._data_version or \
                    len(self._boxes) > _CACHE_LIMIT:
                self._load_caches(conn)  # another process committed (an operator command)
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
            self._committed()
            return
        except Exception:  # a database error, or a bug in one operation: isolate it
            log.exception("event=store_batch_failed ops=%d; retrying one by one", len(batch))
            self._rolled_back(conn)
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
                self._committed()
            except Exception as exc:
                log.error("event=store_op_failed error=%s", type(exc).__name__)
                self._rolled_back(conn)
                op.result, op.error = None, StoreError(f"database error ({type(exc).__name__})")

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._loop is None or self._closed:
            raise StoreError("store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Op(fn, future))
        return future

    # --- accounts, names, blocks (store/sqlite_accounts.py) ------------------------------------

    async def create_account(self, username: str, identity: bytes, now_ms: int,
                             invite_hash: bytes | None = None, recovery_public: bytes | None = None) -> None:
        skel = accounts.skeleton_of(username)
        await self._submit(partial(accounts.create_account, username=username, skel=skel, identity=identity,
                                   now=now_ms, invite_hash=invite_hash, recovery_public=recovery_public))

    async def get_identity(self, username: str) -> bytes | None:
        return await self._submit(partial(accounts.active_identity, username=username))

    async def get_account(self, username: str) -> AccountInfo | None:
        return await self._submit(partial(accounts.get_account, username=username))

    async def list_accounts(self) -> list[AccountInfo]:
        return await self._submit(accounts.list_accounts)

    async def set_state(self, username: str, state: AccountState, by: str, reason: str) -> None:
        if state not in (AccountState.ACTIVE, AccountState.SUSPENDED):
            raise ValueError("set_state takes ACTIVE or SUSPENDED; use delete_account to delete")

        def op(conn: sqlite3.Connection) -> None:
            accounts.set_state(conn, username, state, by, reason)
            self._boxes.pop(username, None)
        await self._submit(op)

    async def delete_account(self, username: str, by: str, reason: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if accounts.delete_account(conn, username, by, reason):
                self._boxes.clear()  # block lists of others may have named it
                self._recent.clear()
                self._total_bytes = None
        await self._submit(op)

    async def rebind_identity(self, username: str, identity: bytes, recovery_public: bytes | None) -> None:
        await self._submit(partial(accounts.rebind_identity, username=username, identity=identity,
                                   recovery_public=recovery_public))

    async def set_recovery_public(self, username: str, recovery_public: bytes) -> None:
        await self._submit(partial(accounts.set_recovery_public, username=username,
                                   recovery_public=recovery_public))

    async def bump_login(self, username: str, counter: int) -> bool:
        return await self._submit(partial(accounts.bump_login, username=username, counter=counter))

    async def reserve(self, names: Sequence[str]) -> None:
        await self._submit(partial(accounts.reserve, names=[(n, accounts.skeleton_of(n)) for n in names]))

    async def unreserve(self, names: Sequence[str]) -> None:
        await self._submit(partial(accounts.unreserve, names=list(names)))

    async def reserved(self) -> list[str]:
        return await self._submit(accounts.reserved)

    async def set_block(self, owner: str, blocked: str, blocked_on: bool) -> None:
        def op(conn: sqlite3.Connection) -> None:
            accounts.set_block(conn, owner, blocked, blocked_on)
            self._boxes.pop(owner, None)
        await self._submit(op)

    async def blocked(self, owner: str) -> list[str]:
        return await self._submit(partial(accounts.blocked, owner=owner))

    async def epoch(self) -> bytes:
        return await self._submit(accounts.epoch)

    async def renew_epoch(self) -> bytes:
        return await self._submit(accounts.renew_epoch)

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
                           "WHERE username=? AND state=?", (username, accounts.ACTIVE)).fetchone()
        if row is None:
            raise UnknownAccount(username)
        return tuple(row)

    async def put_prekeys(self, username: str, *, signed_prekey: bytes | None,
                          one_time: Sequence[tuple[int, bytes]], kem_one_time: Sequence[tuple[int, bytes]],
                          kem_last_resort: bytes | None, max_pool: int,
                          replace_pools: bool = False) -> PoolCounts:
        one_time, kem_one_time = list(one_time), list(kem_one_time)

        def op(conn: sqlite3.Connection) -> PoolCounts:
            self._require_account(conn, username)
            have = PoolCounts(0, 0) if replace_pools else self._counts(conn, username)
            if have.one_time + len(one_time) > max_pool or have.kem + len(kem_one_time) > max_pool:
                raise PrekeyPoolFull(f"a one-time prekey pool would exceed {max_pool} keys")
            if replace_pools:  # checked before writing: same transaction as the inserts below
                conn.execute("DELETE FROM one_time_prekeys WHERE username=?", (username,))
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

    async def take_bundle(self, username: str, *, one_time: bool = True) -> BundleParts:
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
            otpk = take(conn, _X25519) if one_time else None
            kem = (take(conn, _KEM) if one_time or last_resort is None else None) or bytes(last_resort)
            return BundleParts(identity=bytes(identity), signed_prekey=bytes(signed), kem_prekey=kem,
                               one_time_prekey=otpk, remaining=self._counts(conn, username))
        return await self._submit(op)

    # --- mailboxes --------------------------------------------------------------------------

    def _box(self, conn: sqlite3.Connection, name: str) -> _Box | None:
        """The recipient's state and counters (writer thread); None for no account at all."""
        box = self._boxes.get(name)
        if box is not None:
            return box
        row = conn.execute("SELECT state FROM accounts WHERE username=?", (name,)).fetchone()
        if row is None:
            return None  # not cached: made-up names must not grow the cache
        box = _Box(row[0] == accounts.ACTIVE)
        if box.active:
            for sender, n, nbytes in conn.execute("SELECT sender, count(*), sum(size) FROM messages "
                                                  "WHERE recipient=? GROUP BY sender", (name,)):
                box.per_sender[sender] = n
                box.queued += n
                box.stored_bytes += nbytes
            box.stored_bytes += blobs.owned_bytes(conn, name)  # one ledger: mail and blobs (issue 13)
            blocks = {r[0] for r in conn.execute("SELECT blocked FROM blocks WHERE owner=?", (name,))}
            box.blocks = blocks or None
        self._boxes[name] = box
        return box

    def _total(self, conn: sqlite3.Connection) -> int:
        if self._total_bytes is None:
            self._total_bytes = conn.execute(
                "SELECT (SELECT coalesce(sum(size), 0) FROM messages WHERE body_id IS NULL) + "
                "(SELECT coalesce(sum(length(body)), 0) FROM bodies)").fetchone()[0] + blobs.total_bytes(conn)
        return self._total_bytes

    def _drop_body(self, conn: sqlite3.Connection, body_id: int) -> None:
        """Delete a shared body once no queued message points at it."""
        rows = conn.execute("DELETE FROM bodies WHERE id=? AND NOT EXISTS "
                            "(SELECT 1 FROM messages WHERE body_id=?) RETURNING length(body)",
                            (body_id, body_id)).fetchall()
        if rows and self._total_bytes is not None:
            self._total_bytes -= rows[0][0]

    def enqueue(self, message: NewMessage, policy: MailboxPolicy | int) -> asyncio.Future[EnqueueResult]:
        if self._loop is None or self._closed:
            raise StoreError("store is not open")
        future: asyncio.Future[EnqueueResult] = self._loop.create_future()
        self._queue.put(_EnqueueOp(message, policy, partial(_resolve, future)))
        return future

    def enqueue_then(self, message: NewMessage, policy: MailboxPolicy | int,
                     callback: EnqueueCallback) -> None:
        if self._closed:
            raise StoreError("store is not open")
        self._queue.put(_EnqueueOp(message, policy, callback))

    def enqueue_many_then(self, delivery: Delivery, policy: MailboxPolicy,
                          callback: EnqueueManyCallback) -> None:
        if self._closed:
            raise StoreError("store is not open")
        recipients = tuple(delivery.recipients)
        if not 1 <= len(recipients) <= MAX_FANOUT or len(set(recipients)) != len(recipients):
            raise InvalidDelivery(f"a delivery names 1 to {MAX_FANOUT} distinct recipients "
                                  f"(got {len(recipients)}, {len(set(recipients))} distinct)")
        if delivery.recipients is not recipients:  # a copy the caller cannot change any more
            delivery = dataclasses.replace(delivery, recipients=recipients)
        self._queue.put(_EnqueueOp(delivery, policy, callback))

    async def enqueue_many(self, delivery: Delivery, policy: MailboxPolicy) -> list[RecipientResult]:
        if self._loop is None:
            raise StoreError("store is not open")
        future: asyncio.Future[list[RecipientResult]] = self._loop.create_future()
        self.enqueue_many_then(delivery, policy, partial(_resolve, future))
        return await future

    def _load_sent(self, conn: sqlite3.Connection,
                   ops: list[_EnqueueOp]) -> dict[tuple[str, bytes], dict[str, int]]:
        """The recipients each (sender, msg_id) of ``ops`` was already accepted for, with their seqs."""
        found: dict[tuple[str, bytes], dict[str, int]] = {}
        for start in range(0, len(ops), _DEDUP_CHUNK):
            chunk = ops[start:start + _DEDUP_CHUNK]
            params: list[Any] = []
            for op in chunk:
                params += (op.item.sender, op.item.msg_id)
            values = ",".join(["(?,?)"] * len(chunk))
            for sender, msg_id, accepted in conn.execute(
                    "SELECT s.sender, s.msg_id, s.accepted FROM (VALUES " + values + ") AS v "  # noqa: S608
                    "CROSS JOIN sent AS s ON s.sender=v.column1 AND s.msg_id=v.column2", params):
                found[(sender, bytes(msg_id))] = {
                    name: int(seq) for name, _, seq in (item.partition(":") for item in accepted.split(","))}
        return found

    @staticmethod
    def _admit(box: _Box, sender: str, size: int, policy: MailboxPolicy) -> RecipientStatus | None:
        """The mailbox rules of one recipient, in the order of docs/contracts.md 1.2 (after DUPLICATE
        and UNKNOWN_USER). ACCEPTED: store it; None: the recipient blocks the sender (drop it)."""
        if not box.active:
            return _SUSPENDED
        if box.blocks is not None and sender in box.blocks:
            return None
        if box.queued >= policy.max_queue:
            return _FULL
        if box.per_sender.get(sender, 0) >= policy.max_queue_per_sender:
            return _SENDER_CAP
        if box.stored_bytes + size > policy.max_stored_bytes:
            return _QUOTA
        return _ACCEPTED

    def _enqueue_run(self, conn: sqlite3.Connection, ops: list[_EnqueueOp]) -> None:
        """Check and insert consecutive sends with a few statements instead of several per message:
        one dedup lookup, one executemany into ``messages``, one into ``sent``."""
        sent = self._load_sent(conn, ops)
        in_db = set(sent)
        touched: dict[tuple[str, bytes], int] = {}  # sent rows to write -> ts of their first acceptance
        fresh: list[tuple[Any, ...]] = []  # new sent rows written by the fast path
        rows: list[tuple[Any, ...]] = []
        usage = self._usage_batch
        boxes = self._boxes
        recent = self._recent
        for op in ops:
            item = op.item
            sender, msg_id, body, ts = item.sender, item.msg_id, item.body, item.ts
            key = (sender, msg_id)
            accepted = sent.get(key)
            policy = op.policy if type(op.policy) is MailboxPolicy else _queue_only(op.policy)
            size = len(body)
            single = type(item) is NewMessage
            if single and accepted is None:
                # The 1:1 hot path: a new message that passes every rule (the loop below, for one
                # recipient with no block and no disk budget). Anything else takes the loop.
                name = item.recipient  # type: ignore[union-attr]
                box = boxes.get(name) or self._box(conn, name)
                if box is not None and box.active and box.blocks is None and policy.disk_budget_bytes is None:
                    from_sender = box.per_sender.get(sender, 0)
                    if box.queued < policy.max_queue and from_sender < policy.max_queue_per_sender and \
                            box.stored_bytes + size <= policy.max_stored_bytes:
                        seq = self._next_seq
                        self._next_seq = seq + 1
                        box.queued += 1
                        box.stored_bytes += size
                        box.per_sender[sender] = from_sender + 1
                        if self._total_bytes is not None:
                            self._total_bytes += size
                        rows.append((seq, name, sender, msg_id, item.kind, ts, size, body, None))
                        recent[seq] = (name, sender, size, None)
                        sent[key] = {name: seq}
                        fresh.append((sender, msg_id, seq, ts, f"{name}:{seq}"))
                        op.result = EnqueueResult(seq, False)
                        hour_key = (sender, ts // USAGE_BUCKET_MS)
                        counts = usage.get(hour_key)
                        if counts is None:
                            usage[hour_key] = [1, size]
                        else:
                            counts[0] += 1
                            counts[1] += size
                        continue
            recipients: Sequence[str] = (item.recipient,) if single else item.recipients  # type: ignore[union-attr]
            statuses: list[RecipientStatus] = []
            seqs: list[int | None] = []
            store: list[tuple[int, str, _Box]] = []
            delivered = 0
            for name in recipients:
                if accepted is not None and name in accepted:
                    statuses.append(_DUPLICATE)
                    seqs.append(accepted[name] or None)
                    continue
                box = boxes.get(name) or self._box(conn, name)
                status = _UNKNOWN if box is None else self._admit(box, sender, size, policy)
                if status is None:  # blocked: reads as accepted, and a retry reads DUPLICATE
                    if accepted is None:
                        accepted = sent[key] = {}
                    accepted[name] = 0
                    touched.setdefault(key, ts)
                    delivered += 1
                    status = _ACCEPTED
                elif status is _ACCEPTED:
                    store.append((len(statuses), name, box))  # type: ignore[arg-type]
                statuses.append(status)
                seqs.append(None)
            budget = policy.disk_budget_bytes
            if store and budget is not None and self._total(conn) + size > budget:
                for index, _, _ in store:
                    statuses[index] = _QUOTA
                store = []
            if store:
                if accepted is None:
                    accepted = sent[key] = {}
                touched.setdefault(key, ts)
                inline: bytes | None = body
                body_id = None
                if len(store) > 1:  # a fan-out: one body, a reference per recipient
                    inline = None
                    body_id = conn.execute("INSERT INTO bodies(body) VALUES (?)", (body,)).lastrowid
                if self._total_bytes is not None:
                    self._total_bytes += size
                for index, name, box in store:
                    new_seq = self._next_seq
                    self._next_seq = new_seq + 1
                    seqs[index] = new_seq
                    accepted[name] = new_seq
                    box.queued += 1
                    box.stored_bytes += size
                    box.per_sender[sender] = box.per_sender.get(sender, 0) + 1
                    rows.append((new_seq, name, sender, msg_id, item.kind, ts, size, inline, body_id))
                    recent[new_seq] = (name, sender, size, body_id)
                delivered += len(store)
            if delivered:
                hour_key = (sender, ts // USAGE_BUCKET_MS)
                counts = usage.get(hour_key)
                if counts is None:
                    usage[hour_key] = [delivered, delivered * size]
                else:
                    counts[0] += delivered
                    counts[1] += delivered * size
            if single:
                status, seq_or_none = statuses[0], seqs[0]
                if status is _ACCEPTED or status is _DUPLICATE:
                    op.result = EnqueueResult(seq=seq_or_none or 0, duplicate=status is _DUPLICATE,
                                              dropped=seq_or_none is None)
                else:
                    op.error = _SINGLE_ERRORS[status](recipients[0])
            else:
                op.result = [RecipientResult(name, status, seq_or_none)
                             for name, status, seq_or_none in zip(recipients, statuses, seqs, strict=True)]
        while len(recent) > _RECENT_LIMIT:
            del recent[next(iter(recent))]
        if rows:
            conn.executemany("INSERT INTO messages(seq, recipient, sender, msg_id, kind, ts, size, body, "
                             "body_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        if touched and fresh:  # a key the fast path wrote and a later op of this batch changed
            fresh = [row for row in fresh if (row[0], row[1]) not in touched]
        if fresh:
            conn.executemany("INSERT INTO sent(sender, msg_id, seq, ts, accepted) VALUES (?, ?, ?, ?, ?)",
                             fresh)
        if touched:
            new: list[tuple[Any, ...]] = []
            changed: list[tuple[Any, ...]] = []
            for key, ts in touched.items():
                accepted = sent[key]
                if len(accepted) == 1:
                    ((name, top),) = accepted.items()
                    text = f"{name}:{top}"
                else:
                    text = ",".join(f"{name}:{seq}" for name, seq in accepted.items())
                    top = max(accepted.values())
                if key in in_db:
                    changed.append((top, text, key[0], key[1]))
                else:
                    new.append((key[0], key[1], top, ts, text))
            if new:
                conn.executemany("INSERT INTO sent(sender, msg_id, seq, ts, accepted) "
                                 "VALUES (?, ?, ?, ?, ?)", new)
            if changed:
                conn.executemany("UPDATE sent SET seq=max(seq, ?), accepted=? WHERE sender=? AND msg_id=?",
                                 changed)

    async def pending(self, recipient: str, after_seq: int, limit: int) -> list[StoredMessage]:
        def op(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute("SELECT m.seq, m.sender, m.msg_id, m.kind, coalesce(m.body, b.body), m.ts "
                                "FROM messages AS m LEFT JOIN bodies AS b ON b.id = m.body_id "
                                "WHERE m.recipient=? AND m.seq>? ORDER BY m.seq LIMIT ?",
                                (recipient, after_seq, limit)).fetchall()
            return [StoredMessage(seq=r[0], recipient=recipient, sender=r[1], msg_id=bytes(r[2]), kind=r[3],
                                  body=bytes(r[4]), ts=r[5]) for r in rows]
        return await self._submit(op)

    def _ack_run(self, conn: sqlite3.Connection, op: _AckOp) -> None:
        """Delete acked messages and keep the counters running. Messages this writer stored recently
        are deleted by key with what ``_recent`` remembers of them (as fast as before counters
        existed); others (older, or stored before a restart) with ``DELETE ... RETURNING``."""
        recipient = op.recipient
        recent = self._recent
        known: list[tuple[int, str]] = []
        gone: list[tuple[Any, ...]] = []  # (recipient, sender, size, body_id) of each deleted message
        other: list[int] = []
        for seq in op.seqs:
            entry = recent.pop(seq, None)
            if entry is None:
                other.append(seq)
            elif entry[0] == recipient:
                known.append((seq, recipient))
                gone.append(entry)
            else:  # not this recipient's: nothing to delete
                recent[seq] = entry
        if known:
            before = conn.total_changes
            conn.executemany("DELETE FROM messages WHERE seq=? AND recipient=?", known)
            if conn.total_changes - before != len(known):  # cannot happen; if it does, recount
                log.error("event=store_recent_mismatch")
                self._boxes.pop(recipient, None)
                self._total_bytes = None
                gone = []
        for start in range(0, len(other), _ACK_CHUNK):
            chunk = other[start:start + _ACK_CHUNK]
            sql = ("DELETE FROM messages WHERE recipient=? AND seq IN (" + ",".join("?" * len(chunk))  # noqa: S608
                   + ") RETURNING recipient, sender, size, body_id")
            gone += conn.execute(sql, [recipient, *chunk]).fetchall()
        box = self._boxes.get(recipient)
        shared: set[int] | None = None
        for _, sender, size, body_id in gone:
            if box is not None:
                box.queued -= 1
                box.stored_bytes -= size
                left = box.per_sender[sender] - 1
                if left:
                    box.per_sender[sender] = left
                else:
                    del box.per_sender[sender]
            if body_id is not None:
                if shared is None:
                    shared = set()
                shared.add(body_id)
            elif self._total_bytes is not None:
                self._total_bytes -= size
        if shared:
            for body_id in shared:
                self._drop_body(conn, body_id)
        op.result = len(gone)

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

    # --- operators and upkeep ---------------------------------------------------------------

    def _flush_usage(self, conn: sqlite3.Connection) -> None:
        """Write the committed sends' counters (in the caller's transaction)."""
        if self._usage_pending:
            conn.executemany("INSERT INTO usage(sender, hour, messages, bytes) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(sender, hour) DO UPDATE SET messages=messages+excluded.messages, "
                             "bytes=bytes+excluded.bytes",
                             [(s, h, n, b) for (s, h), (n, b) in self._usage_pending.items()])
            self._usage_flushing, self._usage_pending = self._usage_pending, {}
        self._usage_flushed_at = time.monotonic()

    async def usage(self, since_ms: int) -> list[UsageRow]:
        def op(conn: sqlite3.Connection) -> list[UsageRow]:
            self._flush_usage(conn)
            sent = {r[0]: (r[1], r[2]) for r in conn.execute(
                "SELECT sender, sum(messages), sum(bytes) FROM usage WHERE hour >= ? GROUP BY sender",
                (since_ms // USAGE_BUCKET_MS,))}
            stored = dict(conn.execute("SELECT sender, sum(size) FROM messages GROUP BY sender").fetchall())
            rows = [UsageRow(sender=name, messages=sent.get(name, (0, 0))[0],
                             bytes_sent=sent.get(name, (0, 0))[1], bytes_stored=stored.get(name, 0))
                    for name in sent.keys() | stored.keys()]
            rows.sort(key=lambda r: (-r.messages, -r.bytes_sent, -r.bytes_stored, r.sender))
            return rows
        return await self._submit(op)

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
            conn.execute("DELETE FROM sent WHERE ts < ?", (now_ms - dedup_window_ms,))
            conn.execute("DELETE FROM invites WHERE expires_ms < ?", (now_ms,))
            self._flush_usage(conn)
            conn.execute("DELETE FROM usage WHERE hour < ?", ((now_ms - USAGE_KEEP_MS) // USAGE_BUCKET_MS,))
        await self._submit(op)

    async def stats(self) -> StoreStats:
        def op(conn: sqlite3.Connection) -> StoreStats:
            live = conn.execute("SELECT count(*) FROM accounts WHERE state != ?",
                                (accounts.DELETED,)).fetchone()[0]
            queued = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
            return StoreStats(accounts=live, queued_messages=queued)
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
