"""Cap ``blobs``: encrypted attachments stored on the relay (issue 13, docs/attachments.md).

The relay stores opaque chunks of age STREAM ciphertext; it never sees a key, a file name or a
plaintext hash. Metadata and the quota ledger are the ``RelayStore``'s (``blob_*``), bytes the
``BlobStore``'s (``store/blobs.py``). A blob is readable by its owner and by the readers named at
commit; anyone else (or an id that does not exist) reads ``not_found``, the same reply.

Chunks are at most ``MAX_BLOB_CHUNK`` bytes, far below the frame limit, and each chunk is its own
request: a chat frame on the same connection waits behind at most the client's window of chunk
requests, never behind a whole file. Transfers are limited in bytes per account and hour
(``--blob-bytes-per-hour``), not in frames.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ...protocol import errors as E
from ...protocol.errors import ProtocolError
from ...protocol.frames import (
    MAX_BLOB_CHUNK,
    BlobBegin,
    BlobCommit,
    BlobData,
    BlobGet,
    BlobHeld,
    BlobPut,
    BlobRelease,
    BlobState,
    Ok,
    encode_frame,
)
from ...protocol.usernames import require_normalized
from ...store.base import BlobConflict, BlobInfo, BlobNotFound, QuotaExceeded, RelayStore, UnknownAccount
from ...store.blobs import BlobStore, BlobStoreError, chunk_count
from ..limits import Limiter, retry_text

if TYPE_CHECKING:
    from ..connection import Connection

log = logging.getLogger("cipherpost.server")

BLOB_TTL_MS: Final = 30 * 24 * 3600 * 1000  # every blob goes 30 days after blob_begin
_CACHE: Final = 1024  # blob metadata kept in memory (uploads touch it once per chunk)


class BlobService:
    """The relay's blob state: metadata (``RelayStore``) and bytes (``BlobStore``), and a bounded cache
    of the metadata of blobs in transfer."""

    def __init__(self, store: RelayStore, blobs: BlobStore, limiter: Limiter, max_blob_bytes: int) -> None:
        self.store = store
        self.blobs = blobs
        self.limiter = limiter
        self.max_blob_bytes = max_blob_bytes
        self._cache: OrderedDict[bytes, BlobInfo] = OrderedDict()

    def remember(self, info: BlobInfo) -> BlobInfo:
        self._cache[info.blob_id] = info
        self._cache.move_to_end(info.blob_id)
        while len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return info

    async def info(self, blob_id: bytes, who: str) -> BlobInfo:
        """The blob's metadata if ``who`` may read it; ``not_found`` otherwise, the same for an id
        that does not exist (someone else's blob id leaks nothing)."""
        info = self._cache.get(blob_id)
        if info is None:
            info = await self.store.blob_info(blob_id)
            if info is not None:
                self.remember(info)
        if info is None or not info.may_read(who):
            raise ProtocolError(E.NOT_FOUND, "no such blob")
        return info

    async def expire(self, now_ms: int) -> int:
        """Delete every blob begun more than 30 days ago (the prune loop, hourly)."""
        gone = await self.store.blobs_expired(now_ms - BLOB_TTL_MS)
        for blob_id in gone:
            self._cache.pop(blob_id, None)
            await self.blobs.delete(blob_id)
        return len(gone)

    async def spend(self, who: str, nbytes: int) -> None:
        decision = await self.limiter.hit(who, max(1, nbytes))
        if not decision.allowed:
            raise ProtocolError(E.RATE_LIMITED, f"blob transfer budget of this account used up "
                                f"({self.limiter.limit} bytes per hour); {retry_text(decision)}")


def _state(rid: int, info: BlobInfo, held: int) -> bytes:
    return encode_frame(BlobState(rid=rid, id=info.blob_id, size=info.size, chunk_size=info.chunk_size,
                                  held=held, committed=info.committed))


def _service(conn: Connection) -> BlobService:
    service: BlobService = conn.server.blob_service
    return service


async def blob_begin(conn: Connection, frame: BlobBegin) -> None:
    assert conn.username is not None
    service = _service(conn)
    if frame.size > service.max_blob_bytes:
        raise ProtocolError(E.TOO_LARGE, f"blob of {frame.size} bytes exceeds this relay's limit of "
                                         f"{service.max_blob_bytes} bytes")
    if frame.chunk_size > min(MAX_BLOB_CHUNK, conn.config.max_frame // 2):
        raise ProtocolError(E.TOO_LARGE, f"chunk size {frame.chunk_size} too large")
    try:
        info = await service.store.blob_reserve(conn.username, frame.id, frame.size, frame.chunk_size,
                                                _now_ms(), conn.server.mailbox_policy)
    except QuotaExceeded:
        raise ProtocolError(E.QUOTA_EXCEEDED, f"no room for a blob of {frame.size} bytes: your storage "
                            "quota (mail and files together) or the relay's disk budget is used up") from None
    except BlobNotFound:
        raise ProtocolError(E.NOT_FOUND, "no such blob") from None
    except BlobConflict as exc:
        raise ProtocolError(E.BAD_FRAME, f"blob_begin: {exc}") from None
    except UnknownAccount:
        raise ProtocolError(E.SUSPENDED, "this account cannot store blobs") from None
    service.remember(info)
    held = await service.blobs.held(info.blob_id, info.size, info.chunk_size)
    log.info("event=blob_begin user=%s size=%d held=%d", conn.username, info.size, held)
    conn.push_frame(_state(frame.rid, info, held))


async def blob_put(conn: Connection, frame: BlobPut) -> None:
    assert conn.username is not None
    service = _service(conn)
    info = await service.info(frame.id, conn.username)
    if info.owner != conn.username or info.committed:
        raise ProtocolError(E.BAD_FRAME, "blob_put: the blob is committed, or not yours to write")
    await service.spend(conn.username, len(frame.data))
    try:
        held = await service.blobs.put_chunk(info.blob_id, info.size, info.chunk_size, frame.index,
                                             frame.data)
    except BlobStoreError as exc:
        raise ProtocolError(E.BAD_FRAME, f"blob_put: {exc}") from None
    except OSError as exc:  # a full disk, an I/O error: nothing is reported held that is not stored
        log.error("event=blob_write_failed error=%s", type(exc).__name__)
        raise ProtocolError(E.INTERNAL, "the relay could not store this chunk; retry later") from None
    conn.push_frame(_state(frame.rid, info, held))


async def blob_held(conn: Connection, frame: BlobHeld) -> None:
    assert conn.username is not None
    service = _service(conn)
    info = await service.info(frame.id, conn.username)
    held = await service.blobs.held(info.blob_id, info.size, info.chunk_size)
    conn.push_frame(_state(frame.rid, info, held))


async def blob_commit(conn: Connection, frame: BlobCommit) -> None:
    assert conn.username is not None
    service = _service(conn)
    info = await service.info(frame.id, conn.username)
    if info.owner != conn.username:
        raise ProtocolError(E.NOT_FOUND, "no such blob")
    readers = sorted({require_normalized(name) for name in frame.to} - {conn.username})
    if len(readers) > conn.config.max_fanout:
        raise ProtocolError(E.TOO_LARGE, f"blob_commit: at most {conn.config.max_fanout} readers")
    held = await service.blobs.held(info.blob_id, info.size, info.chunk_size)
    needed = chunk_count(info.size, info.chunk_size)
    if held < needed:
        raise ProtocolError(E.BAD_FRAME, f"blob_commit: the relay holds {held} of {needed} chunks; send "
                                         "the rest first")
    try:
        info = service.remember(await service.store.blob_commit(info.blob_id, conn.username, readers))
    except BlobConflict as exc:
        raise ProtocolError(E.BAD_FRAME, f"blob_commit: {exc}") from None
    except BlobNotFound:
        raise ProtocolError(E.NOT_FOUND, "no such blob") from None
    log.info("event=blob_commit user=%s size=%d readers=%d", conn.username, info.size, len(info.readers))
    conn.push_frame(_state(frame.rid, info, held))


async def blob_get(conn: Connection, frame: BlobGet) -> None:
    assert conn.username is not None
    service = _service(conn)
    info = await service.info(frame.id, conn.username)
    if not info.committed:
        raise ProtocolError(E.NOT_FOUND, "no such blob")
    await service.spend(conn.username, info.chunk_size)
    try:
        data = await service.blobs.read_chunk(info.blob_id, info.size, info.chunk_size, frame.index)
    except BlobStoreError as exc:
        raise ProtocolError(E.BAD_FRAME, f"blob_get: {exc}") from None
    if frame.index == 0:
        log.info("event=blob_fetch user=%s size=%d", conn.username, info.size)  # who fetched: stated
    conn.push_frame(encode_frame(BlobData(rid=frame.rid, id=info.blob_id, index=frame.index, data=data)))


async def blob_release(conn: Connection, frame: BlobRelease) -> None:
    """A reader saved the file (or the owner abandons an upload); the last release deletes it."""
    assert conn.username is not None
    service = _service(conn)
    await service.info(frame.id, conn.username)
    try:
        gone = await service.store.blob_release(frame.id, conn.username)
    except BlobNotFound:
        raise ProtocolError(E.NOT_FOUND, "no such blob") from None
    service._cache.pop(frame.id, None)
    if gone:
        await service.blobs.delete(frame.id)
        log.info("event=blob_deleted user=%s", conn.username)
    conn.push_frame(encode_frame(Ok(rid=frame.rid)))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


HANDLERS: Final[dict[type, Callable[[Connection, Any], Any]]] = {
    BlobBegin: blob_begin, BlobPut: blob_put, BlobHeld: blob_held, BlobCommit: blob_commit,
    BlobGet: blob_get, BlobRelease: blob_release}
