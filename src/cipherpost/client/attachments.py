"""Encrypted attachments: streamed, resumable upload and download (issue 13, docs/attachments.md).

A file is encrypted with age's STREAM (``crypto/stream.py``) under a fresh 32-byte key and a fresh
16-byte nonce, chunk by chunk while it is read (never whole in memory), and uploaded to the relay's
blob store (cap ``blobs``) with a window of chunk requests in flight, so chat frames interleave.
Then an ordinary message carries the blob id, key, nonce, size, SHA-256, name and media type
(:class:`FileOffer`). Relay chunk ``i`` is STREAM chunk ``i``; the blob is padded with random bytes
to the Padmé length of the ciphertext so the relay learns only a size class.

Resuming an upload: the key, nonce and blob id are kept in the profile database (encrypted, like
every record there) and the Poly1305 tag of each *ciphertext* chunk is appended to
``uploads/<key>.hashes`` before the chunk is sent. To resume, the first ``held`` chunks are read and
encrypted again (identical plaintext under the same key, nonce and index gives identical
ciphertext, which is never sent) and their tags compared with the recorded ones: any difference means the
file changed, and the upload starts over with a fresh key, nonce and blob id.

Downloading streams into ``<dir>/.<blob id>.cipherpost-part`` and renames into a fresh, sanitised
name (:func:`safe_name`) only after the final chunk, the size and the SHA-256 are verified; a
partial file left by a broken connection is resumed, one that fails verification is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import mimetypes
import os
import unicodedata
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..crypto.encoding import pack, unpack
from ..crypto.errors import StreamError
from ..crypto.stream import (
    CHUNK_SIZE,
    ENCRYPTED_CHUNK_SIZE,
    FILE_KEY_LEN,
    PAYLOAD_NONCE_LEN,
    TAG_LEN,
    StreamState,
    decrypt_chunk,
    encrypt_chunk,
    end_of_stream,
    new_file_key,
    new_payload_nonce,
    open_stream,
)
from .errors import ClientError, ServerError
from .upload_state import Begun, Changed, ChunkStored, Committed, Upload, Verified, step

if TYPE_CHECKING:
    from .client import Client
    from .connection import Connection

WINDOW: Final = 16                        # chunk requests in flight (1 MiB): chat frames interleave
BLOB_ID_LEN: Final = 16
MAX_NAME: Final = 120                     # characters of a saved file name
PART_SUFFIX: Final = ".cipherpost-part"
DEFAULT_TYPE: Final = "application/octet-stream"
Progress = Callable[[int, int], None]     # (bytes done, bytes total)


class AttachmentError(ClientError):
    """A transfer failed: the file is not sent, or not saved (nothing under the final name)."""


class FileChanged(AttachmentError):
    """The file changed while it was being sent."""


@dataclass(frozen=True, repr=False)
class FileOffer:
    """What the message announcing a file carries (docs/attachments.md section 2). ``repr`` hides
    the key."""

    blob_id: bytes
    key: bytes
    nonce: bytes
    size: int
    sha256: bytes
    name: str
    media_type: str

    def __repr__(self) -> str:
        return f"FileOffer(name={self.name!r}, size={self.size}, key=<hidden>)"

    def to_map(self) -> dict[str, Any]:
        return {"blob": self.blob_id, "key": self.key, "nonce": self.nonce, "size": self.size,
                "sha256": self.sha256, "name": self.name, "type": self.media_type}

    @classmethod
    def from_map(cls, m: Any) -> FileOffer:
        """Strict: a malformed offer is refused (``ClientError``), never half-trusted."""
        if not isinstance(m, dict):
            raise ClientError("file message without a file description")
        blob, key, nonce, digest = m.get("blob"), m.get("key"), m.get("nonce"), m.get("sha256")
        size, name, media = m.get("size"), m.get("name"), m.get("type", DEFAULT_TYPE)
        if not (isinstance(blob, bytes) and len(blob) == BLOB_ID_LEN
                and isinstance(key, bytes) and len(key) == FILE_KEY_LEN
                and isinstance(nonce, bytes) and len(nonce) == PAYLOAD_NONCE_LEN
                and type(size) is int and 0 <= size < 1 << 50
                and isinstance(digest, bytes) and len(digest) == 32
                and isinstance(name, str) and len(name) <= 4096
                and isinstance(media, str) and len(media) <= 255):
            raise ClientError("file message with a malformed file description")
        return cls(blob, key, nonce, size, digest, name, media)

    def describe(self) -> str:
        return f"[file] {printable_name(self.name)} ({self.size} bytes)"


# --- pure helpers ---------------------------------------------------------------------------------

def padme(length: int) -> int:
    """Padmé (Nikitin et al., PETS 2019, "Reducing Metadata Leakage ... with PURBs", Algorithm 1):
    the padded length, at most 12 % more, leaking O(log log n) bits of the length."""
    if length < 2:
        return length
    e = length.bit_length() - 1          # floor(log2 L)
    s = e.bit_length()                   # floor(log2 e) + 1
    last_bits = e - s
    mask = (1 << last_bits) - 1
    return (length + mask) & ~mask


def real_chunks(size: int) -> int:
    """STREAM chunks of a ``size``-byte plaintext (an empty file has one empty final chunk)."""
    return max(1, -(-size // CHUNK_SIZE))


def ciphertext_len(size: int) -> int:
    """Bytes of the STREAM chunks (the age payload without its nonce)."""
    return size + real_chunks(size) * TAG_LEN


def blob_size(size: int) -> int:
    return padme(ciphertext_len(size))


def relay_chunks(size: int) -> int:
    return max(1, -(-blob_size(size) // ENCRYPTED_CHUNK_SIZE))


def relay_chunk_len(size: int, index: int) -> int:
    return max(0, min(ENCRYPTED_CHUNK_SIZE, blob_size(size) - index * ENCRYPTED_CHUNK_SIZE))


def stream_chunk_len(size: int, index: int) -> int:
    """Ciphertext bytes of STREAM chunk ``index`` (< real_chunks(size))."""
    return min(CHUNK_SIZE, size - index * CHUNK_SIZE) + TAG_LEN


def printable_name(name: str) -> str:
    return "".join(c for c in name if unicodedata.category(c)[0] != "C")


def safe_name(name: str) -> str:
    """A received file name made harmless: the last path component only (``/`` and ``\\``), no
    control or format characters, no leading dots (no hidden files, no ``..``), at most
    :data:`MAX_NAME` characters; ``file`` when nothing is left."""
    name = unicodedata.normalize("NFC", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")
    name = name.strip().lstrip(".").strip()
    if len(name) > MAX_NAME:
        stem, dot, ext = name.rpartition(".")
        ext = ext[:16] if dot and stem else ""
        name = name[:MAX_NAME - len(ext) - 1] + "." + ext if ext else name[:MAX_NAME]
    return name or "file"


def media_type_of(path: Path) -> str:
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or DEFAULT_TYPE


def link_unique(source: Path, folder: Path, name: str) -> Path:
    """Hard-link ``source`` as ``folder/name``, or ``name (1).ext``, ... : never over an existing file
    (``link`` fails with EEXIST, atomically)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    for n in range(10_000):
        candidate = folder / (name if n == 0 else f"{stem} ({n}).{ext}" if ext else f"{stem} ({n})")
        try:
            os.link(source, candidate)
        except FileExistsError:
            continue
        return candidate
    raise AttachmentError(f"no free file name for {name!r} in {folder}")


# --- the shell: transfers over a relay connection ---------------------------------------------------

def _require_blobs(conn: Connection) -> None:
    if "blobs" not in conn.caps:
        raise AttachmentError("this relay does not store files (it does not announce the 'blobs' feature)")


async def _windowed(requests: Sequence[Callable[[], Awaitable[dict[str, Any]]]],
                    on_reply: Callable[[int, dict[str, Any]], None]) -> None:
    """Run the requests in order with at most :data:`WINDOW` in flight; ``on_reply(i, reply)`` in order."""
    pending: deque[tuple[int, asyncio.Task[dict[str, Any]]]] = deque()
    try:
        for i, make in enumerate(requests):
            pending.append((i, asyncio.ensure_future(make())))
            if len(pending) >= WINDOW:
                j, task = pending.popleft()
                on_reply(j, await task)
        while pending:
            j, task = pending.popleft()
            on_reply(j, await task)
    finally:
        for _, task in pending:
            task.cancel()


_RECORD: Final = TAG_LEN   # bytes recorded per chunk sent


def _fingerprint(ciphertext: bytes) -> bytes:
    """What is recorded of each chunk sent, to check a resume: its Poly1305 tag. Under one key and
    nonce (the resumed stream's), the tag of chunk ``i`` is a MAC of its ciphertext with a one-time
    key, so a changed plaintext gives another tag (except with probability ~2^-100), and it costs
    nothing to compute (a SHA-256 per chunk was half of the client's time per chunk). It reveals
    nothing about the file without the key."""
    return ciphertext[-TAG_LEN:]


class _UploadState:
    """Key, nonce and blob id of one upload (in the profile database, encrypted) and the tags of the
    ciphertext chunks sent (``uploads/<key>.hashes``, :func:`_fingerprint`)."""

    def __init__(self, client: Client, path: Path, readers: Sequence[str]) -> None:
        self.client = client
        # one state per (file, readers): the same file for someone else is another blob
        what = "\0".join([str(path), *sorted(readers)]).encode()
        self.meta_key = "upload:" + hashlib.sha256(what).hexdigest()[:32]
        folder = client.paths.dir / "uploads"
        folder.mkdir(mode=0o700, exist_ok=True)
        self.hashes_path = folder / (self.meta_key.split(":")[1] + ".hashes")

    def load(self, size: int) -> tuple[bytes, bytes, bytes, list[bytes]] | None:
        raw = self.client.db.get_secret_meta(self.meta_key)
        if not raw:
            return None
        blob_id, key, nonce, recorded_size = unpack(raw, what="upload state")
        if recorded_size != size:
            return None
        try:
            data = self.hashes_path.read_bytes()
        except FileNotFoundError:
            data = b""
        n = _RECORD
        return blob_id, key, nonce, [data[i:i + n] for i in range(0, len(data) - len(data) % n, n)]

    def start(self, blob_id: bytes, key: bytes, nonce: bytes, size: int) -> None:
        with self.client.db.transaction():
            self.client.db.set_secret_meta(self.meta_key, pack([blob_id, key, nonce, size]))
        fd = os.open(self.hashes_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)

    def truncate(self, count: int) -> None:
        os.truncate(self.hashes_path, count * _RECORD)

    def forget(self) -> None:
        with self.client.db.transaction():
            self.client.db.set_secret_meta(self.meta_key, b"")
        with contextlib.suppress(FileNotFoundError):
            self.hashes_path.unlink()


async def upload_file(client: Client, path: Path, readers: Sequence[str], *,
                      progress: Progress | None = None) -> FileOffer:
    """Encrypt and upload ``path`` (resuming an earlier attempt when the file is unchanged), commit
    the blob to ``readers`` and return the offer to send in a message."""
    conn = client._require_conn()
    _require_blobs(conn)
    path = Path(path).resolve()
    try:
        size = path.stat().st_size
        handle = path.open("rb")
    except OSError as exc:
        raise AttachmentError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        state = _UploadState(client, path, readers)
        phase = [Upload.NEW]   # client/upload_state.py: every change of phase goes through step()
        for _attempt in range(2):
            try:
                offer = await _upload_once(conn, state, phase, handle, path, size, readers, progress)
            except OSError as exc:
                raise AttachmentError(f"cannot read {path}: {exc.strerror or exc}") from None
            if offer is not None:
                state.forget()
                return offer
    raise FileChanged(f"{path} keeps changing while it is being sent; try again when it is complete")


async def _upload_once(conn: Connection, state: _UploadState, phase: list[Upload], handle: Any, path: Path,
                       size: int, readers: Sequence[str], progress: Progress | None) -> FileOffer | None:
    loaded = state.load(size)
    hashes: list[bytes] = []
    if loaded is None:
        blob_id, key, nonce = os.urandom(BLOB_ID_LEN), new_file_key(), new_payload_nonce()
        state.start(blob_id, key, nonce, size)
    else:
        blob_id, key, nonce, hashes = loaded
    total_relay = relay_chunks(size)
    n_real = real_chunks(size)
    reply = await conn.request({"t": "blob_begin", "id": blob_id, "size": blob_size(size),
                                "chunk_size": ENCRYPTED_CHUNK_SIZE})
    held = int(reply["held"])
    phase[0] = step(phase[0], Begun(held))
    file_hash = hashlib.sha256()
    # Verify what the relay holds against the recorded ciphertext hashes (docs/attachments.md 8).
    handle.seek(0)
    stream = open_stream(key, nonce)
    for i in range(min(held, n_real)):
        plain = handle.read(CHUNK_SIZE)
        final = i == n_real - 1
        try:
            ciphertext, stream = encrypt_chunk(stream, plain, final)
        except StreamError:
            ciphertext = b""
        if i >= len(hashes) or not hmac.compare_digest(_fingerprint(ciphertext), hashes[i]):
            phase[0] = step(phase[0], Changed())
            with contextlib.suppress(ServerError):   # the file changed: never reuse this key and nonce
                await conn.request({"t": "blob_release", "id": blob_id})
            state.forget()
            return None
        file_hash.update(plain)
    phase[0] = step(phase[0], Verified())
    if reply.get("committed"):
        held = total_relay
    state.truncate(min(held, n_real))
    total = blob_size(size)
    if progress is not None:   # where this attempt starts: what the relay already holds
        progress(min(total, held * ENCRYPTED_CHUNK_SIZE), total)

    def chunk(i: int) -> bytes:
        nonlocal stream
        if i >= n_real:
            return os.urandom(relay_chunk_len(size, i))   # padding to the size class
        plain = handle.read(CHUNK_SIZE)
        final = i == n_real - 1
        if len(plain) != (min(CHUNK_SIZE, size - i * CHUNK_SIZE)) or (final and handle.read(1)):
            phase[0] = step(phase[0], Changed())
            raise FileChanged(f"{path} changed while it was being sent (its size is not {size} bytes any "
                              "more); nothing was sent as complete")
        ciphertext, stream = encrypt_chunk(stream, plain, final)
        file_hash.update(plain)
        # recorded before it is sent (the resume check); an unbuffered write reaches the kernel now,
        # so a SIGKILL of this process after the send cannot lose it
        os.write(hashes_fd, _fingerprint(ciphertext))
        if final:
            ciphertext += os.urandom(relay_chunk_len(size, i) - len(ciphertext))
        return ciphertext

    def put(i: int) -> Callable[[], Awaitable[dict[str, Any]]]:
        data = chunk(i)  # read and encrypted now, in order; sent when the window has room
        return lambda: conn.request({"t": "blob_put", "id": blob_id, "index": i, "data": data})

    def sent(j: int, _reply: dict[str, Any]) -> None:
        phase[0] = step(phase[0], ChunkStored(held + j))
        if progress is not None:
            progress(min(total, (held + j + 1) * ENCRYPTED_CHUNK_SIZE), total)

    hashes_fd = os.open(state.hashes_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        await _windowed(_Lazy(put, held, total_relay), sent)
    finally:
        os.close(hashes_fd)
    if not reply.get("committed"):
        await conn.request({"t": "blob_commit", "id": blob_id, "to": list(readers)})
    phase[0] = step(phase[0], Committed())
    return FileOffer(blob_id, key, nonce, size, file_hash.digest(), path.name, media_type_of(path))


class _Lazy(Sequence[Callable[[], Awaitable[dict[str, Any]]]]):
    """``make(i)`` for i in [start, stop), built only when the window takes it (one chunk in memory
    per request in flight, never the file)."""

    def __init__(self, make: Callable[[int], Callable[[], Awaitable[dict[str, Any]]]], start: int,
                 stop: int) -> None:
        self.make, self.start, self.stop = make, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: Any) -> Any:
        return self.make(self.start + i)

    def __iter__(self) -> Any:
        for i in range(self.start, self.stop):
            yield self.make(i)


async def download_file(client: Client, offer: FileOffer, folder: Path, *,
                        progress: Progress | None = None) -> Path:
    """Fetch, decrypt and verify the file of ``offer`` into ``folder``; return the saved path.

    Resumes a ``.part`` file left by a broken connection. Any integrity failure deletes the part
    file and raises :class:`AttachmentError`: nothing appears under the final name."""
    conn = client._require_conn()
    _require_blobs(conn)
    folder = Path(folder)
    part = folder / f".{offer.blob_id.hex()}{PART_SUFFIX}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise AttachmentError(f"cannot save into {folder}: {exc.strerror or exc}") from None
    try:
        saved = await _download_into(conn, offer, fd, part, folder, progress)
    except (StreamError, AttachmentError) as exc:
        os.close(fd)
        part.unlink(missing_ok=True)
        if isinstance(exc, AttachmentError):
            raise
        raise AttachmentError(f"the file {printable_name(offer.name)!r} failed verification ({exc}); "
                              "nothing was saved") from None
    except ServerError as exc:
        os.close(fd)
        if exc.code == "not_found":
            part.unlink(missing_ok=True)
            raise AttachmentError(f"the relay no longer has the file {printable_name(offer.name)!r} "
                                  "(already saved, or expired after 30 days)") from None
        if exc.code == "bad_frame":   # the relay's copy is damaged (a chunk missing or cut short)
            part.unlink(missing_ok=True)
            raise AttachmentError(f"the relay's copy of {printable_name(offer.name)!r} is damaged "
                                  f"({exc.server_message}); nothing was saved") from None
        raise
    except OSError as exc:   # a full disk, an unwritable folder: nothing half-written stays
        os.close(fd)
        part.unlink(missing_ok=True)
        raise AttachmentError(f"cannot write {printable_name(offer.name)!r} into {folder}: "
                              f"{exc.strerror or exc}; nothing was saved") from None
    except BaseException:
        os.close(fd)   # a broken connection: the part file stays, to resume
        raise
    os.close(fd)
    with contextlib.suppress(ServerError, ClientError):
        await conn.request({"t": "blob_release", "id": offer.blob_id})
    return saved


async def _download_into(conn: Connection, offer: FileOffer, fd: int, part: Path, folder: Path,
                         progress: Progress | None) -> Path:
    n_real = real_chunks(offer.size)
    have = os.fstat(fd).st_size
    start = min(have // CHUNK_SIZE, n_real - 1) if offer.size else 0
    if start * CHUNK_SIZE != have:
        os.ftruncate(fd, start * CHUNK_SIZE)
    file_hash = hashlib.sha256()
    offset = 0
    while offset < start * CHUNK_SIZE:   # the part already decrypted and verified chunk by chunk
        piece = os.pread(fd, min(1 << 20, start * CHUNK_SIZE - offset), offset)
        file_hash.update(piece)
        offset += len(piece)
    box: list[StreamState] = [open_stream(offer.key, offer.nonce, chunk_index=start)]
    if progress is not None:   # where this attempt starts
        progress(start * CHUNK_SIZE, offer.size)

    def get(i: int) -> Callable[[], Awaitable[dict[str, Any]]]:
        return lambda: conn.request({"t": "blob_get", "id": offer.blob_id, "index": i})

    def got(j: int, reply: dict[str, Any]) -> None:
        i = start + j
        data = reply.get("data")
        if reply.get("index") != i or not isinstance(data, bytes):
            raise AttachmentError("the relay sent a chunk out of order")
        ciphertext = data[:stream_chunk_len(offer.size, i)]
        plain, box[0] = decrypt_chunk(box[0], ciphertext, at_end=i == n_real - 1)
        os.pwrite(fd, plain, i * CHUNK_SIZE)
        file_hash.update(plain)
        if progress is not None:
            progress(min(offer.size, (i + 1) * CHUNK_SIZE), offer.size)

    await _windowed(_Lazy(get, start, n_real), got)
    end_of_stream(box[0])
    if os.fstat(fd).st_size != offer.size:
        raise AttachmentError(f"the file {printable_name(offer.name)!r} has the wrong size; "
                              "nothing was saved")
    if not hmac.compare_digest(file_hash.digest(), offer.sha256):
        raise AttachmentError(f"the file {printable_name(offer.name)!r} does not match its SHA-256; "
                              "nothing was saved")
    os.fchmod(fd, 0o600)   # never executable
    os.fsync(fd)
    try:
        final = link_unique(part, folder, safe_name(offer.name))
    except OSError as exc:
        raise AttachmentError(f"cannot save into {folder}: {exc.strerror or exc}") from None
    part.unlink()
    return final


# --- the message that announces a file (client/client.py send and receive call these) -------------

def read_content(kind: Any, content: Any) -> tuple[str, dict[str, Any] | None]:
    """(text to show, history extra) of an incoming message; ``ClientError`` for an unknown kind or
    a malformed offer."""
    if kind == "text" and isinstance(content, str):
        return content, None
    if kind == "file":
        offer = FileOffer.from_map(content)
        return offer.describe(), {"file": offer.to_map()}
    raise ClientError("message of an unknown kind")


async def send_file(client: Client, name: str, path: Path, *, progress: Progress | None = None) -> bytes:
    """Upload ``path`` for ``name`` and send the message that announces it; the message id."""
    from ..protocol.usernames import normalize_username
    name = normalize_username(name)
    offer = await upload_file(client, path, [name], progress=progress)
    return await client.send(name, offer.describe(), file=offer)


async def send_text_as_file(client: Client, name: str, text: str) -> bytes:
    """A text too long for one message, sent as ``message.txt`` (written to the profile's private
    ``uploads`` folder, deleted once sent)."""
    folder = client.paths.dir / "uploads"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / "message.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode("utf-8"))
    try:
        return await send_file(client, name, path)
    finally:
        path.unlink(missing_ok=True)


def offer_of(extra: dict[str, Any]) -> FileOffer | None:
    found = extra.get("file")
    return None if found is None else FileOffer.from_map(found)
