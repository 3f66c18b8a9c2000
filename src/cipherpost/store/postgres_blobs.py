"""Blob metadata of the PostgreSQL store (migration 3, docs/attachments.md section 5).

The same rules as ``store/sqlite_blobs.py``, each one transaction. The quota ledger is the one of
mail: ``mailbox_heads.bytes`` of the owner (locked ``FOR UPDATE``, as an enqueue locks it) and one
``disk_usage`` shard, taken in the lock order of ``store/postgres_schema.py`` (blob row, then
``mailbox_heads``, then one ``disk_usage`` shard; an enqueue never locks a blob row). The bytes of
a blob are never in the database: they are files on a volume every instance mounts.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .base import BlobConflict, BlobInfo, BlobNotFound, MailboxPolicy, QuotaExceeded, UnknownAccount
from .postgres_schema import DISK_SHARDS

T = TypeVar("T")
_SELECT = "SELECT owner, size, chunk_size, created_ms, committed FROM blobs WHERE id=$1"
_SELECT_LOCKED = _SELECT + " FOR UPDATE"
_DISK = "SELECT coalesce(sum(bytes), 0) FROM disk_usage"


async def _info(conn: Any, blob_id: bytes, *, lock: bool = False) -> BlobInfo | None:
    row = await conn.fetchrow(_SELECT_LOCKED if lock else _SELECT, blob_id)
    if row is None:
        return None
    readers = tuple(r[0] for r in await conn.fetch(
        "SELECT reader FROM blob_readers WHERE blob_id=$1 ORDER BY reader", blob_id))
    return BlobInfo(blob_id, row[0], row[1], row[2], row[3], bool(row[4]), readers)


async def _charge(conn: Any, owner: str, delta: int) -> None:
    await conn.execute("UPDATE mailbox_heads SET bytes = bytes + $2 WHERE recipient=$1", owner, delta)
    await conn.execute("UPDATE disk_usage SET bytes = bytes + $2 WHERE shard=$1",
                       secrets.randbelow(DISK_SHARDS), delta)


async def _delete(conn: Any, blob_id: bytes) -> None:
    await conn.execute("DELETE FROM blob_readers WHERE blob_id=$1", blob_id)
    await conn.execute("DELETE FROM blobs WHERE id=$1", blob_id)


class PostgresBlobs:
    """Blob methods of :class:`~cipherpost.store.postgres.PostgresRelayStore`."""

    _call: Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[Any]]

    async def _tx(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async def run(conn: Any) -> T:
            async with conn.transaction():
                return await fn(conn)
        result: T = await self._call(run)
        return result

    async def blob_reserve(self, owner: str, blob_id: bytes, size: int, chunk_size: int, now_ms: int,
                           policy: MailboxPolicy) -> BlobInfo:
        async def op(conn: Any) -> BlobInfo:
            found = await _info(conn, blob_id)
            if found is not None:
                if found.owner != owner:
                    raise BlobNotFound("no such blob")
                if (found.size, found.chunk_size) != (size, chunk_size):
                    raise BlobConflict("this blob id was begun with another size or chunk size")
                return found
            state = await conn.fetchval("SELECT state FROM accounts WHERE username=$1", owner)
            if state != "active":
                raise UnknownAccount(f"no active account {owner!r}")
            stored = await conn.fetchval("SELECT bytes FROM mailbox_heads WHERE recipient=$1 FOR UPDATE",
                                         owner)
            budget = policy.disk_budget_bytes
            disk = 0 if budget is None else await conn.fetchval(_DISK)
            over_disk = budget is not None and disk + size > budget
            if (stored or 0) + size > policy.max_stored_bytes or over_disk:
                raise QuotaExceeded("the owner's storage quota or the disk budget is used up")
            inserted = await conn.execute(
                "INSERT INTO blobs (id, owner, size, chunk_size, created_ms) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT DO NOTHING", blob_id, owner, size, chunk_size, now_ms)
            if inserted.endswith(" 0"):   # begun concurrently by another instance: read it again
                raise BlobConflict("this blob id is being begun elsewhere; retry")
            await _charge(conn, owner, size)
            return BlobInfo(blob_id, owner, size, chunk_size, now_ms, False, ())
        return await self._tx(op)

    async def blob_info(self, blob_id: bytes) -> BlobInfo | None:
        return await self._tx(lambda conn: _info(conn, blob_id))

    async def blob_commit(self, blob_id: bytes, owner: str, readers: Sequence[str]) -> BlobInfo:
        async def op(conn: Any) -> BlobInfo:
            found = await _info(conn, blob_id, lock=True)
            if found is None or found.owner != owner:
                raise BlobNotFound("no such blob")
            names = sorted(r[0] for r in await conn.fetch(
                "SELECT username FROM accounts WHERE username = ANY($1::text[]) AND state='active'",
                list(set(readers))))
            if found.committed:
                if list(found.readers) != names:
                    raise BlobConflict("blob already committed to other readers")
                return found
            await conn.executemany("INSERT INTO blob_readers (blob_id, reader) VALUES ($1, $2)",
                                   [(blob_id, r) for r in names])
            await conn.execute("UPDATE blobs SET committed=TRUE WHERE id=$1", blob_id)
            return BlobInfo(blob_id, owner, found.size, found.chunk_size, found.created_ms, True,
                            tuple(names))
        return await self._tx(op)

    async def blob_release(self, blob_id: bytes, who: str) -> bool:
        async def op(conn: Any) -> bool:
            found = await _info(conn, blob_id, lock=True)
            if found is None or not found.may_read(who):
                raise BlobNotFound("no such blob")
            if who in found.readers:
                await conn.execute("DELETE FROM blob_readers WHERE blob_id=$1 AND reader=$2", blob_id, who)
                if len(found.readers) > 1:
                    return False
            elif found.committed:
                return False
            await _delete(conn, blob_id)
            await _charge(conn, found.owner, -found.size)
            return True
        return await self._tx(op)

    async def blobs_expired(self, before_ms: int) -> list[bytes]:
        async def op(conn: Any) -> list[bytes]:
            await conn.execute("DELETE FROM blob_readers WHERE reader IN "
                               "(SELECT username FROM accounts WHERE state='deleted')")
            rows = await conn.fetch(
                "SELECT id, owner, size FROM blobs WHERE created_ms < $1 "
                "OR owner IN (SELECT username FROM accounts WHERE state='deleted') "
                "OR (committed AND NOT EXISTS (SELECT 1 FROM blob_readers WHERE blob_id=blobs.id)) "
                "ORDER BY id FOR UPDATE", before_ms)
            for blob_id, owner, size in rows:
                await _delete(conn, bytes(blob_id))
                await _charge(conn, owner, -size)
            return [bytes(r[0]) for r in rows]
        return await self._tx(op)
