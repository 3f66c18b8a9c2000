"""Blob metadata of the SQLite store (migration 3, docs/attachments.md section 5).

Functions of one connection, run on the store's writer thread inside its transaction;
:mod:`cipherpost.store.sqlite` keeps the owner's byte counter (the one quota ledger of mail and
blobs) in step with what these functions insert and delete. Each checks before it writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from .base import BlobConflict, BlobInfo, BlobNotFound


def info(conn: sqlite3.Connection, blob_id: bytes) -> BlobInfo | None:
    row = conn.execute("SELECT owner, size, chunk_size, created_ms, committed FROM blobs WHERE id=?",
                       (blob_id,)).fetchone()
    if row is None:
        return None
    readers = tuple(r[0] for r in conn.execute(
        "SELECT reader FROM blob_readers WHERE blob_id=? ORDER BY reader", (blob_id,)))
    return BlobInfo(blob_id, row[0], row[1], row[2], row[3], bool(row[4]), readers)


def existing(conn: sqlite3.Connection, owner: str, blob_id: bytes, size: int,
             chunk_size: int) -> BlobInfo | None:
    """The row of a resumed upload, None for a new id; refuses another account's id or sizes."""
    found = info(conn, blob_id)
    if found is None:
        return None
    if found.owner != owner:
        raise BlobNotFound("no such blob")
    if (found.size, found.chunk_size) != (size, chunk_size):
        raise BlobConflict("this blob id was begun with another size or chunk size")
    return found


def insert(conn: sqlite3.Connection, owner: str, blob_id: bytes, size: int, chunk_size: int,
           now_ms: int) -> BlobInfo:
    conn.execute("INSERT INTO blobs (id, owner, size, chunk_size, created_ms) VALUES (?, ?, ?, ?, ?)",
                 (blob_id, owner, size, chunk_size, now_ms))
    return BlobInfo(blob_id, owner, size, chunk_size, now_ms, False, ())


def commit(conn: sqlite3.Connection, blob_id: bytes, owner: str, readers: Sequence[str]) -> BlobInfo:
    found = info(conn, blob_id)
    if found is None or found.owner != owner:
        raise BlobNotFound("no such blob")
    names = sorted({r for r in readers if conn.execute(
        "SELECT 1 FROM accounts WHERE username=? AND state='active'", (r,)).fetchone()})
    if found.committed:
        if list(found.readers) != names:
            raise BlobConflict("blob already committed to other readers")
        return found
    conn.executemany("INSERT INTO blob_readers (blob_id, reader) VALUES (?, ?)",
                     [(blob_id, r) for r in names])
    conn.execute("UPDATE blobs SET committed=1 WHERE id=?", (blob_id,))
    return BlobInfo(blob_id, owner, found.size, found.chunk_size, found.created_ms, True, tuple(names))


def release(conn: sqlite3.Connection, blob_id: bytes, who: str) -> BlobInfo | None:
    """Drop ``who`` from the readers (or, for the owner of an uncommitted blob, the blob); the deleted
    row's info when nothing holds the blob any more, else None."""
    found = info(conn, blob_id)
    if found is None or not found.may_read(who):
        raise BlobNotFound("no such blob")
    if who in found.readers:
        conn.execute("DELETE FROM blob_readers WHERE blob_id=? AND reader=?", (blob_id, who))
        if len(found.readers) > 1:
            return None
    elif found.committed:  # the owner of a committed blob: the readers decide
        return None
    delete(conn, blob_id)
    return found


def delete(conn: sqlite3.Connection, blob_id: bytes) -> None:
    conn.execute("DELETE FROM blob_readers WHERE blob_id=?", (blob_id,))
    conn.execute("DELETE FROM blobs WHERE id=?", (blob_id,))


def expired(conn: sqlite3.Connection, before_ms: int) -> list[tuple[bytes, str, int]]:
    """(id, owner, size) of every blob created before ``before_ms``, or whose owner was deleted, or
    committed with every reader gone (released, or the account deleted): deleted."""
    conn.execute("DELETE FROM blob_readers WHERE reader IN "
                 "(SELECT username FROM accounts WHERE state='deleted')")
    rows = [(bytes(r[0]), str(r[1]), int(r[2])) for r in conn.execute(
        "SELECT id, owner, size FROM blobs WHERE created_ms < ? "
        "OR owner IN (SELECT username FROM accounts WHERE state='deleted') "
        "OR (committed AND NOT EXISTS (SELECT 1 FROM blob_readers WHERE blob_id=blobs.id))", (before_ms,))]
    for blob_id, _, _ in rows:
        delete(conn, blob_id)
    return rows


def owned_bytes(conn: sqlite3.Connection, owner: str) -> int:
    return int(conn.execute("SELECT coalesce(sum(size), 0) FROM blobs WHERE owner=?", (owner,)).fetchone()[0])


def total_bytes(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(sum(size), 0) FROM blobs").fetchone()[0])
