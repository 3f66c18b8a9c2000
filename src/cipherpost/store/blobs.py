"""The relay's blob bytes: opaque encrypted chunks on disk (issue 13, docs/attachments.md section 5).

Only bytes live here; who owns a blob, who may read it and the quota ledger are the
:class:`~cipherpost.store.base.RelayStore`'s (``blob_*`` methods, migration 3). A blob is one data
file ``<root>/<2 hex>/<id hex>.blob`` (chunk ``i`` at ``i * chunk_size``) and an index
``<id hex>.idx`` with the SHA-256 of chunk ``i`` at ``i * 32``.

Durability: data and index are written with ``pwrite`` and fsynced every :data:`FSYNC_BYTES` and
before :meth:`FileBlobStore.held` answers, so ``held`` counts only chunks that are on disk. After a
crash the held prefix is recomputed by checking each chunk against its index entry: a torn or lost
write is never reported as held, and every chunk written before a process kill (the kernel keeps it)
still is, so a resumed upload sends again at most the chunk that was in flight.

For many relay instances the root is a shared volume mounted on each (docs/attachments.md); an
S3-compatible store would be another class with these five methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final, Protocol

FSYNC_BYTES: Final = 4 * 1024 * 1024  # fsync data and index after this many bytes written
MAX_OPEN: Final = 64                   # blobs with open file descriptors; the least recent closes
_HASH_LEN: Final = 32


class BlobStoreError(Exception):
    """A chunk out of order or of the wrong size (the handler names it on the wire)."""


class BlobStore(Protocol):
    async def create(self, blob_id: bytes, size: int, chunk_size: int) -> None:
        """Make room for a new blob (empty files); idempotent."""

    async def put_chunk(self, blob_id: bytes, size: int, chunk_size: int, index: int, data: bytes) -> int:
        """Write chunk ``index`` (at most one past the chunks written so far; rewriting one is
        idempotent); return the count of chunks known to be on disk (fsynced)."""

    async def held(self, blob_id: bytes, size: int, chunk_size: int) -> int:
        """fsync, then the length of the prefix of chunks on disk and matching their index."""

    async def read_chunk(self, blob_id: bytes, size: int, chunk_size: int, index: int) -> bytes: ...

    async def delete(self, blob_id: bytes) -> None: ...

    async def close(self) -> None: ...


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))


def chunk_length(size: int, chunk_size: int, index: int) -> int:
    """Bytes of chunk ``index``: full, except the last one (an empty blob has one empty chunk)."""
    return max(0, min(chunk_size, size - index * chunk_size))


class _Open:
    """One blob with open files: what this process wrote since it opened them."""

    __slots__ = ("closed", "data", "fsyncing", "index", "lock", "synced", "unsynced_bytes", "written")

    def __init__(self, data: int, index: int, written: int) -> None:
        self.data = data
        self.index = index
        self.written = written   # chunks 0..written-1 are in the files (page cache at least)
        self.synced = written    # chunks 0..synced-1 are fsynced
        self.unsynced_bytes = 0
        self.lock = asyncio.Lock()
        self.closed = False  # its descriptors are closed (evicted or deleted): open it again
        self.fsyncing: asyncio.Task[None] | None = None  # a background fsync (closing waits for it)


class FileBlobStore:
    """Blob bytes in files under ``root`` (``DATA/blobs``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._open: OrderedDict[bytes, _Open] = OrderedDict()
        self.fsyncs = 0

    def _paths(self, blob_id: bytes) -> tuple[Path, Path]:
        name = blob_id.hex()
        folder = self.root / name[:2]
        return folder / f"{name}.blob", folder / f"{name}.idx"

    async def create(self, blob_id: bytes, size: int, chunk_size: int) -> None:
        await self._get(blob_id, size, chunk_size)

    async def _get(self, blob_id: bytes, size: int, chunk_size: int) -> _Open:
        found = self._open.get(blob_id)
        if found is not None:
            self._open.move_to_end(blob_id)
            return found
        opened = await asyncio.to_thread(self._open_files, blob_id, size, chunk_size)
        again = self._open.get(blob_id)  # another task opened it meanwhile
        if again is not None:
            await asyncio.to_thread(_close_fds, opened)
            return again
        self._open[blob_id] = opened
        while len(self._open) > MAX_OPEN:
            _, old = self._open.popitem(last=False)
            async with old.lock:
                await _settled(old)
                await asyncio.to_thread(self._sync_and_close, old)
        return opened

    @contextlib.asynccontextmanager
    async def _locked(self, blob_id: bytes, size: int, chunk_size: int) -> AsyncIterator[_Open]:
        """The blob's open files, locked; never ones closed by an eviction meanwhile."""
        while True:
            opened = await self._get(blob_id, size, chunk_size)
            async with opened.lock:
                if not opened.closed:
                    yield opened
                    return

    def _open_files(self, blob_id: bytes, size: int, chunk_size: int) -> _Open:
        data_path, index_path = self._paths(blob_id)
        data_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            index = os.open(index_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            os.close(data)
            raise
        opened = _Open(data, index, 0)
        opened.written = opened.synced = self._verified_prefix(opened, size, chunk_size)
        return opened

    def _verified_prefix(self, opened: _Open, size: int, chunk_size: int) -> int:
        """fsync both files, then count the chunks from 0 whose data matches their index entry."""
        os.fsync(opened.data)
        os.fsync(opened.index)
        self.fsyncs += 1
        hashes = os.pread(opened.index, chunk_count(size, chunk_size) * _HASH_LEN, 0)
        n = 0
        for i in range(len(hashes) // _HASH_LEN):
            expected = hashes[i * _HASH_LEN:(i + 1) * _HASH_LEN]
            length = chunk_length(size, chunk_size, i)
            chunk = os.pread(opened.data, length, i * chunk_size)
            if len(chunk) != length or hashlib.sha256(chunk).digest() != expected:
                break
            n += 1
        return n

    async def put_chunk(self, blob_id: bytes, size: int, chunk_size: int, index: int, data: bytes) -> int:
        count = chunk_count(size, chunk_size)
        if not 0 <= index < count:
            raise BlobStoreError(f"chunk {index} out of range (the blob has {count} chunks)")
        if len(data) != chunk_length(size, chunk_size, index):
            raise BlobStoreError(f"chunk {index} must be {chunk_length(size, chunk_size, index)} bytes, "
                                 f"not {len(data)}")
        async with self._locked(blob_id, size, chunk_size) as opened:
            if index > opened.written:
                raise BlobStoreError(f"chunk {index} before chunk {opened.written}: send chunks in order "
                                     "(ask blob_held where to resume)")
            await asyncio.to_thread(self._write, opened, index, chunk_size, data)
            if index == opened.written:
                opened.written += 1
            opened.unsynced_bytes += len(data)
            if (opened.unsynced_bytes >= FSYNC_BYTES or index == count - 1) and (
                    opened.fsyncing is None or opened.fsyncing.done()):
                # In the background: the connection goes on with its next frame (a chat message
                # does not wait for the disk); held() and closing wait for it.
                opened.unsynced_bytes = 0
                sync = self._sync_to(opened, opened.written)
                opened.fsyncing = asyncio.get_running_loop().create_task(sync)
            return opened.synced

    async def _sync_to(self, opened: _Open, target: int) -> None:
        await asyncio.to_thread(self._sync, opened)
        opened.synced = max(opened.synced, target)

    def _write(self, opened: _Open, index: int, chunk_size: int, data: bytes) -> None:
        os.pwrite(opened.data, data, index * chunk_size)
        os.pwrite(opened.index, hashlib.sha256(data).digest(), index * _HASH_LEN)

    async def held(self, blob_id: bytes, size: int, chunk_size: int) -> int:
        async with self._locked(blob_id, size, chunk_size) as opened:
            await _settled(opened)
            if opened.synced < opened.written:
                await asyncio.to_thread(self._sync, opened)
                opened.synced = opened.written
                opened.unsynced_bytes = 0
            return opened.synced

    def _sync(self, opened: _Open) -> None:
        os.fsync(opened.data)
        os.fsync(opened.index)
        self.fsyncs += 1

    def _sync_and_close(self, opened: _Open) -> None:
        with contextlib.suppress(OSError):
            if opened.synced < opened.written:
                self._sync(opened)
        _close_fds(opened)

    async def read_chunk(self, blob_id: bytes, size: int, chunk_size: int, index: int) -> bytes:
        count = chunk_count(size, chunk_size)
        if not 0 <= index < count:
            raise BlobStoreError(f"chunk {index} out of range (the blob has {count} chunks)")
        length = chunk_length(size, chunk_size, index)
        async with self._locked(blob_id, size, chunk_size) as opened:
            data = await asyncio.to_thread(os.pread, opened.data, length, index * chunk_size)
        if len(data) != length:
            raise BlobStoreError(f"chunk {index} is not stored")
        return data

    async def delete(self, blob_id: bytes) -> None:
        opened = self._open.pop(blob_id, None)
        if opened is not None:
            async with opened.lock:
                await _settled(opened)
                _close_fds(opened)
        for path in self._paths(blob_id):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def close(self) -> None:
        while self._open:
            _, opened = self._open.popitem()
            async with opened.lock:
                await _settled(opened)
                await asyncio.to_thread(self._sync_and_close, opened)


async def _settled(opened: _Open) -> None:
    """Wait for a background fsync of ``opened`` (its descriptors must stay open meanwhile)."""
    task = opened.fsyncing
    if task is not None:
        with contextlib.suppress(OSError):
            await asyncio.shield(task)
        opened.fsyncing = None


def _close_fds(opened: _Open) -> None:
    opened.closed = True
    for fd in (opened.data, opened.index):
        with contextlib.suppress(OSError):
            os.close(fd)
