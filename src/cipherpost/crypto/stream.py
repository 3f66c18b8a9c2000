"""Streaming AEAD for files: age's STREAM, exactly as specified, sans-I/O.

Implements the payload of the age format (C2SP ``age.md``, section "Payload") and its stand-alone
description C2SP ``agead.md`` ("Encrypting a payload"), which is the STREAM construction of Hoang,
Reyhanitabar, Rogaway and Vizár, "Online Authenticated-Encryption and its Nonce-Reuse
Misuse-Resistance" (CRYPTO 2015), instantiated with ChaCha20-Poly1305:

- ``payload key = HKDF-SHA-256(ikm = file key, salt = nonce, info = "payload")`` (32 bytes), where
  ``nonce`` is 16 random bytes written in front of the encrypted chunks.
- The plaintext is split into chunks of :data:`CHUNK_SIZE` (64 KiB). Chunk ``i`` is
  ``ChaCha20-Poly1305(payload key, nonce_i, chunk, aad = "")`` (RFC 8439), with the 12-byte
  ``nonce_i = i as 11 bytes big-endian || flag``; ``flag`` is ``0x01`` for the final chunk and
  ``0x00`` for every other one.
- Every chunk but the final one is full. The final chunk is shorter than or equal to 64 KiB and is
  not empty unless the whole payload is empty (then it is the one empty final chunk).
- Decryption fails at the end of the data if no final chunk was decrypted (truncation), and fails
  if anything follows a final chunk (extension). The counter in the nonce refuses reordered and
  dropped chunks; the flag refuses a truncation at a chunk boundary.

Chosen here, within the spec: the file key is 32 bytes (``agead.md``: "a 32 byte key"); age's own
16-byte file keys are accepted too, so age's test vectors (C2SP/CCTV ``age/testdata/stream_*``) run
against this code unchanged. No key material is framed or prefixed: the output of
:func:`encrypt_payload` is the byte string that follows an age header.

State is a value (:class:`StreamState`, frozen, ``repr`` hides the key): :func:`encrypt_chunk` and
:func:`decrypt_chunk` return ``(output, new state)`` and raise before returning, so a refused chunk
leaves the caller's state as it was. The shell does the I/O: it hands :func:`decrypt_chunk` the
stream in pieces of :data:`ENCRYPTED_CHUNK_SIZE` bytes (the last one shorter) and calls
:func:`end_of_stream` when the data ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import StreamError, StreamExtended, StreamTruncated

CHUNK_SIZE: Final = 64 * 1024                   # plaintext bytes per chunk (age: 64 KiB)
TAG_LEN: Final = 16                             # Poly1305 tag
ENCRYPTED_CHUNK_SIZE: Final = CHUNK_SIZE + TAG_LEN
PAYLOAD_NONCE_LEN: Final = 16                   # age: "nonce is random(16)"
FILE_KEY_LEN: Final = 32                        # what new_file_key() draws (agead.md)
FILE_KEY_LENS: Final = frozenset({16, 32})      # 16: age's file keys (its test vectors)
COUNTER_LEN: Final = 11                         # big-endian chunk counter in the 12-byte nonce
MAX_CHUNKS: Final = 1 << (8 * COUNTER_LEN)      # the counter must never wrap
PAYLOAD_INFO: Final = b"payload"                # HKDF info, exactly as age
_LAST: Final = b"\x01"
_NOT_LAST: Final = b"\x00"
_SHA256: Final = hashes.SHA256()


@dataclass(frozen=True, slots=True, repr=False)
class StreamState:
    """Where one direction of one stream stands. Immutable; ``repr`` hides the key."""

    _aead: ChaCha20Poly1305   # keyed with the payload key
    counter: int              # index of the next chunk
    finished: bool            # the final chunk has been produced / accepted

    def __repr__(self) -> str:
        return f"StreamState(counter={self.counter}, finished={self.finished}, key=<hidden>)"


def new_file_key(entropy: Entropy = SYSTEM_ENTROPY) -> bytes:
    """A fresh 32-byte file key: one per file, never reused for another file or attempt."""
    key = entropy.random_bytes(FILE_KEY_LEN)
    if len(key) != FILE_KEY_LEN:
        raise StreamError("entropy returned a short file key")
    return key


def new_payload_nonce(entropy: Entropy = SYSTEM_ENTROPY) -> bytes:
    """A fresh 16-byte payload nonce (age: ``random(16)``)."""
    nonce = entropy.random_bytes(PAYLOAD_NONCE_LEN)
    if len(nonce) != PAYLOAD_NONCE_LEN:
        raise StreamError("entropy returned a short nonce")
    return nonce


def payload_key(file_key: bytes, nonce: bytes) -> bytes:
    """age "Payload": ``HKDF-SHA-256(ikm = file key, salt = nonce, info = "payload")``, 32 bytes."""
    if not isinstance(file_key, bytes) or len(file_key) not in FILE_KEY_LENS:
        raise ValueError("file key must be 16 or 32 bytes")
    if not isinstance(nonce, bytes) or len(nonce) != PAYLOAD_NONCE_LEN:
        raise StreamTruncated(f"payload nonce must be {PAYLOAD_NONCE_LEN} bytes")
    return HKDF(_SHA256, 32, salt=nonce, info=PAYLOAD_INFO).derive(file_key)


def open_stream(file_key: bytes, nonce: bytes, *, chunk_index: int = 0) -> StreamState:
    """A state for encrypting or decrypting the stream ``(file_key, nonce)`` from ``chunk_index``.

    Starting past 0 is seeking (agead.md): a reader may decrypt from any chunk. A writer may start
    past 0 only to resume with byte-identical plaintext; encrypting other plaintext under the same
    key, nonce and index reveals both (the caller checks per-chunk hashes before resuming).
    """
    if type(chunk_index) is not int or not 0 <= chunk_index < MAX_CHUNKS:
        raise ValueError("chunk index out of range")
    return StreamState(ChaCha20Poly1305(payload_key(file_key, nonce)), chunk_index, False)


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(COUNTER_LEN, "big") + (_LAST if last else _NOT_LAST)


def encrypt_chunk(state: StreamState, plaintext: bytes, final: bool) -> tuple[bytes, StreamState]:
    """Encrypt the next chunk. Non-final chunks are exactly :data:`CHUNK_SIZE` bytes; the final one
    is 1..CHUNK_SIZE bytes, or empty when it is the only chunk (an empty payload)."""
    if state.finished:
        raise StreamExtended("stream already has its final chunk")
    if state.counter >= MAX_CHUNKS - 1 and not final:
        raise StreamError("chunk counter exhausted")
    if final:
        if len(plaintext) > CHUNK_SIZE:
            raise StreamError(f"final chunk longer than {CHUNK_SIZE} bytes")
        if not plaintext and state.counter != 0:
            raise StreamError("the final chunk may be empty only if the whole payload is")
    elif len(plaintext) != CHUNK_SIZE:
        raise StreamError(f"non-final chunks must be exactly {CHUNK_SIZE} bytes")
    ciphertext = state._aead.encrypt(_nonce(state.counter, final), plaintext, None)
    return ciphertext, StreamState(state._aead, state.counter + 1, final)


def decrypt_chunk(state: StreamState, ciphertext: bytes, *,
                  at_end: bool = False) -> tuple[bytes, StreamState]:
    """Decrypt the next chunk, as age's reader does (FiloSottile/age ``internal/stream``): a short
    chunk can only be the final one; a full chunk is tried as non-final, then as final. Whether the
    stream is complete is ``new_state.finished``; at the end of the data the caller calls
    :func:`end_of_stream` (or passes ``at_end=True``, which refuses a non-final chunk outright).

    Refuses a tampered, reordered, resized or foreign chunk (:class:`StreamError`), a chunk after
    the final one (:class:`StreamExtended`) and, with ``at_end``, a missing final chunk
    (:class:`StreamTruncated`). The input state is never modified.
    """
    if state.finished:
        raise StreamExtended("data after the final chunk")
    n = len(ciphertext)
    if n > ENCRYPTED_CHUNK_SIZE:
        raise StreamError(f"chunk {state.counter} is longer than {ENCRYPTED_CHUNK_SIZE} bytes")
    if n < TAG_LEN:
        raise StreamTruncated(f"chunk {state.counter} is shorter than its tag ({n} bytes)")
    if n < ENCRYPTED_CHUNK_SIZE:
        # Only the final chunk may be short, and it is empty only when the whole payload is.
        if n == TAG_LEN and state.counter != 0:
            raise StreamError("the final chunk may be empty only if the whole payload is")
        last = True
        plaintext = _open(state, ciphertext, last=True)
    else:
        last = False
        plaintext = _open(state, ciphertext, last=False)
        if plaintext is None:
            last = True   # a full-length final chunk
            plaintext = _open(state, ciphertext, last=True)
    if plaintext is None:
        raise StreamError(f"chunk {state.counter} failed authentication (tampered, reordered, "
                          "truncated or from another stream)")
    if not last and state.counter >= MAX_CHUNKS - 1:
        raise StreamError("chunk counter exhausted: the last possible chunk is not final")
    if at_end and not last:
        raise StreamTruncated(f"the stream ends after chunk {state.counter}, which is not its "
                              "final chunk (truncated)")
    return plaintext, StreamState(state._aead, state.counter + 1, last)


def end_of_stream(state: StreamState) -> None:
    """The data has ended: raise :class:`StreamTruncated` unless a final chunk was decrypted
    (agead.md: decryption "MUST signal an error if the end of file is reached without
    successfully decrypting a final chunk")."""
    if not state.finished:
        raise StreamTruncated(f"the stream ends after {state.counter} chunks without its final "
                              "chunk (truncated)")


def _open(state: StreamState, ciphertext: bytes, *, last: bool) -> bytes | None:
    try:
        return state._aead.decrypt(_nonce(state.counter, last), ciphertext, None)
    except InvalidTag:
        return None


# --- whole payloads (small files, tests); the client streams chunk by chunk ---------------------

def encrypt_payload(file_key: bytes, plaintext: bytes, *, nonce: bytes | None = None,
                    entropy: Entropy = SYSTEM_ENTROPY) -> bytes:
    """``nonce || chunk_0 || ... || chunk_final``: the age payload of ``plaintext``."""
    if nonce is None:
        nonce = new_payload_nonce(entropy)
    state = open_stream(file_key, nonce)
    out = [nonce]
    for start in range(0, max(len(plaintext), 1), CHUNK_SIZE):
        final = start + CHUNK_SIZE >= len(plaintext)
        ciphertext, state = encrypt_chunk(state, plaintext[start:start + CHUNK_SIZE], final)
        out.append(ciphertext)
    return b"".join(out)


def decrypt_payload(file_key: bytes, payload: bytes) -> bytes:
    """Decrypt a whole :func:`encrypt_payload` output; every stream error as in :func:`decrypt_chunk`."""
    if len(payload) < PAYLOAD_NONCE_LEN:
        raise StreamTruncated("payload shorter than its nonce")
    state = open_stream(file_key, payload[:PAYLOAD_NONCE_LEN])
    body = memoryview(payload)[PAYLOAD_NONCE_LEN:]
    out = []
    for start in range(0, len(body), ENCRYPTED_CHUNK_SIZE):
        plaintext, state = decrypt_chunk(state, bytes(body[start:start + ENCRYPTED_CHUNK_SIZE]))
        out.append(plaintext)
    end_of_stream(state)
    return b"".join(out)


def ciphertext_size(plaintext_size: int) -> int:
    """Bytes of the payload (nonce included) for a plaintext of ``plaintext_size`` bytes."""
    chunks = max(1, -(-plaintext_size // CHUNK_SIZE))
    return PAYLOAD_NONCE_LEN + plaintext_size + chunks * TAG_LEN


__all__ = [
    "CHUNK_SIZE", "ENCRYPTED_CHUNK_SIZE", "FILE_KEY_LEN", "PAYLOAD_NONCE_LEN", "TAG_LEN", "StreamState",
    "ciphertext_size", "decrypt_chunk", "decrypt_payload", "encrypt_chunk", "encrypt_payload",
    "end_of_stream", "new_file_key", "new_payload_nonce", "open_stream", "payload_key",
]
