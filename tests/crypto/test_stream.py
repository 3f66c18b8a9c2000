"""File streams (age's STREAM): age's own vectors, round trips, and every way to cut, reorder,
flip or extend a stream, each refused with the state unchanged."""

import hashlib
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cipherpost.crypto import stream
from cipherpost.crypto.errors import StreamError, StreamExtended, StreamTruncated
from cipherpost.crypto.stream import (
    CHUNK_SIZE,
    ENCRYPTED_CHUNK_SIZE,
    PAYLOAD_NONCE_LEN,
    TAG_LEN,
    ciphertext_size,
    decrypt_chunk,
    decrypt_payload,
    encrypt_chunk,
    encrypt_payload,
    end_of_stream,
    open_stream,
)

AGE_VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "age_stream"
KEY = bytes(range(32))
NONCE = b"\xa5" * PAYLOAD_NONCE_LEN
BOUNDARY_SIZES = [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE, 2 * CHUNK_SIZE + 7]


def plaintext_of(size: int) -> bytes:
    return hashlib.shake_256(b"plaintext %d" % size).digest(size) if size else b""


def chunks_of(payload: bytes) -> list[bytes]:
    body = payload[PAYLOAD_NONCE_LEN:]
    return [body[i:i + ENCRYPTED_CHUNK_SIZE] for i in range(0, len(body), ENCRYPTED_CHUNK_SIZE)]


def read_like_age(file_key: bytes, payload: bytes) -> tuple[bytes, Exception | None]:
    """Decrypt as age's reader does, chunk by chunk: the plaintext released, and the error if any."""
    released = b""
    try:
        if len(payload) < PAYLOAD_NONCE_LEN:
            raise StreamTruncated("short nonce")
        state = open_stream(file_key, payload[:PAYLOAD_NONCE_LEN])
        for chunk in chunks_of(payload):
            plaintext, state = decrypt_chunk(state, chunk)
            released += plaintext
        end_of_stream(state)
    except StreamError as exc:
        return released, exc
    return released, None


# --- age's own vectors (C2SP/CCTV age/testdata/stream_*) ------------------------------------------

def parse_vector(path: Path) -> tuple[dict[str, str], bytes]:
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n\n")
    meta = dict(line.split(": ", 1) for line in head.decode().splitlines())
    if meta.get("compressed") == "zlib":
        body = zlib.decompress(body)
    mac_line = body.index(b"\n--- ") + 1          # the header ends with the "--- MAC" line
    return meta, body[body.index(b"\n", mac_line) + 1:]


VECTOR_FILES = sorted(p for p in AGE_VECTORS.glob("stream_*"))


def test_all_age_stream_vectors_are_here():
    assert len(VECTOR_FILES) == 28


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.name)
def test_age_vector(path: Path):
    meta, payload = parse_vector(path)
    file_key = bytes.fromhex(meta["file key"])
    released, error = read_like_age(file_key, payload)
    if meta["expect"] == "success":
        assert error is None, f"{path.name}: {error}"
        assert hashlib.sha256(released).hexdigest() == meta["payload"]
        # and encrypting that plaintext under the same nonce gives age's bytes back
        assert encrypt_payload(file_key, released, nonce=payload[:PAYLOAD_NONCE_LEN]) == payload
    elif meta["expect"] == "payload failure":
        assert isinstance(error, StreamError), path.name
        assert hashlib.sha256(released).hexdigest() == meta["payload"], path.name
        with pytest.raises(StreamError):
            decrypt_payload(file_key, payload)
    else:
        assert meta["expect"] == "header failure"   # a nonce shorter than 16 bytes
        assert isinstance(error, StreamTruncated) and released == b""


# --- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_round_trip_at_chunk_boundaries(size: int):
    pt = plaintext_of(size)
    payload = encrypt_payload(KEY, pt, nonce=NONCE)
    assert len(payload) == ciphertext_size(size)
    assert len(chunks_of(payload)) == max(1, -(-size // CHUNK_SIZE))
    assert decrypt_payload(KEY, payload) == pt


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=3 * 1024))
def test_round_trip_small(pt: bytes):
    assert decrypt_payload(KEY, encrypt_payload(KEY, pt)) == pt


def test_fresh_nonce_per_payload_and_16_byte_age_keys():
    a, b = encrypt_payload(KEY, b"same"), encrypt_payload(KEY, b"same")
    assert a[:PAYLOAD_NONCE_LEN] != b[:PAYLOAD_NONCE_LEN] and a != b
    age_key = b"YELLOW SUBMARINE"
    assert decrypt_payload(age_key, encrypt_payload(age_key, b"x")) == b"x"
    with pytest.raises(ValueError):
        open_stream(b"k" * 24, NONCE)


def test_seeking_decrypts_one_chunk_alone():
    pt = plaintext_of(2 * CHUNK_SIZE + 7)
    chunks = chunks_of(encrypt_payload(KEY, pt, nonce=NONCE))
    out, state = decrypt_chunk(open_stream(KEY, NONCE, chunk_index=2), chunks[2], at_end=True)
    assert out == pt[2 * CHUNK_SIZE:] and state.finished
    with pytest.raises(StreamError):
        decrypt_chunk(open_stream(KEY, NONCE, chunk_index=1), chunks[2])


# --- truncation, reordering, extension, bit flips ---------------------------------------------------

def test_every_truncation_of_a_small_payload_is_refused():
    payload = encrypt_payload(KEY, b"attack at dawn" * 5, nonce=NONCE)
    for n in range(len(payload)):
        with pytest.raises(StreamError):
            decrypt_payload(KEY, payload[:n])


def test_every_truncation_around_each_chunk_boundary_is_refused():
    payload = encrypt_payload(KEY, plaintext_of(3 * CHUNK_SIZE + 100), nonce=NONCE)
    cuts = set()
    for boundary in range(PAYLOAD_NONCE_LEN, len(payload), ENCRYPTED_CHUNK_SIZE):
        cuts.update(range(max(0, boundary - TAG_LEN - 2), min(len(payload), boundary + TAG_LEN + 2)))
    cuts.update(range(len(payload) - 200, len(payload)))
    for n in sorted(cuts):
        with pytest.raises(StreamError):
            decrypt_payload(KEY, payload[:n])


@pytest.mark.parametrize("chunks_kept", [1, 2, 3])
def test_truncation_at_a_chunk_boundary_is_truncated(chunks_kept: int):
    """A cut between chunks leaves only valid chunks: the missing final flag is what catches it."""
    payload = encrypt_payload(KEY, plaintext_of(3 * CHUNK_SIZE + 100), nonce=NONCE)
    cut = payload[:PAYLOAD_NONCE_LEN + chunks_kept * ENCRYPTED_CHUNK_SIZE]
    with pytest.raises(StreamTruncated):
        decrypt_payload(KEY, cut)
    released, error = read_like_age(KEY, cut)
    assert isinstance(error, StreamTruncated) and len(released) == chunks_kept * CHUNK_SIZE
    state = open_stream(KEY, NONCE)
    for chunk in chunks_of(cut)[:-1]:
        _, state = decrypt_chunk(state, chunk)
    with pytest.raises(StreamTruncated):
        decrypt_chunk(state, chunks_of(cut)[-1], at_end=True)


def test_payload_without_chunks_is_truncated():
    with pytest.raises(StreamTruncated):
        decrypt_payload(KEY, NONCE)
    with pytest.raises(StreamTruncated):
        decrypt_payload(KEY, NONCE[:-1])


@pytest.mark.parametrize("order", [(1, 0, 2), (0, 2, 1), (2, 1, 0), (0, 0, 1, 2), (0, 2), (1, 2)])
def test_reordered_dropped_or_repeated_chunks_are_refused(order):
    pt = plaintext_of(2 * CHUNK_SIZE + 50)
    payload = encrypt_payload(KEY, pt, nonce=NONCE)
    chunks = chunks_of(payload)
    with pytest.raises(StreamError):
        decrypt_payload(KEY, NONCE + b"".join(chunks[i] for i in order))


FOUR_CHUNKS_PT = plaintext_of(3 * CHUNK_SIZE + 5)
FOUR_CHUNKS = chunks_of(encrypt_payload(KEY, FOUR_CHUNKS_PT, nonce=NONCE))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=6))
def test_only_the_original_chunk_sequence_decrypts(order):
    """Any other sequence of the same chunks (dropped, repeated, swapped, cut) is refused."""
    payload = NONCE + b"".join(FOUR_CHUNKS[i] for i in order)
    if order == [0, 1, 2, 3]:
        assert decrypt_payload(KEY, payload) == FOUR_CHUNKS_PT
    else:
        with pytest.raises(StreamError):
            decrypt_payload(KEY, payload)


def test_chunk_of_another_stream_is_refused():
    ours = chunks_of(encrypt_payload(KEY, plaintext_of(CHUNK_SIZE + 1), nonce=NONCE))
    theirs = chunks_of(encrypt_payload(KEY, plaintext_of(CHUNK_SIZE + 1), nonce=b"\x01" * 16))
    with pytest.raises(StreamError):
        decrypt_payload(KEY, NONCE + ours[0] + theirs[1])
    with pytest.raises(StreamError):
        decrypt_payload(bytes(32), NONCE + b"".join(ours))


def test_every_bit_flip_of_a_small_payload_is_refused():
    payload = encrypt_payload(KEY, b"meet me at the usual place", nonce=NONCE)
    for i in range(len(payload) * 8):
        flipped = bytearray(payload)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(StreamError):
            decrypt_payload(KEY, bytes(flipped))


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=ciphertext_size(2 * CHUNK_SIZE + 9) * 8 - 1))
def test_any_bit_flip_of_a_long_payload_is_refused(bit: int):
    flipped = bytearray(LONG_PAYLOAD)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(StreamError):
        decrypt_payload(KEY, bytes(flipped))


LONG_PAYLOAD = encrypt_payload(KEY, plaintext_of(2 * CHUNK_SIZE + 9), nonce=NONCE)


def test_data_after_the_final_chunk_is_extension():
    payload = encrypt_payload(KEY, plaintext_of(CHUNK_SIZE), nonce=NONCE)   # one full final chunk
    for extra in (b"x", bytes(TAG_LEN), chunks_of(payload)[0]):
        with pytest.raises(StreamExtended):
            decrypt_payload(KEY, payload + extra)
    released, error = read_like_age(KEY, payload + b"garbage")
    assert isinstance(error, StreamExtended) and released == plaintext_of(CHUNK_SIZE)
    state = open_stream(KEY, NONCE)
    _, state = decrypt_chunk(state, chunks_of(payload)[0])
    assert state.finished
    with pytest.raises(StreamExtended):
        decrypt_chunk(state, chunks_of(payload)[0])


def test_two_final_chunks_are_refused():
    first, _ = encrypt_chunk(open_stream(KEY, NONCE), b"a" * CHUNK_SIZE, True)
    second, _ = encrypt_chunk(open_stream(KEY, NONCE, chunk_index=1), b"b", True)
    with pytest.raises(StreamExtended):
        decrypt_payload(KEY, NONCE + first + second)


# --- final-flag misuse on the writing side, empty chunks ---------------------------------------------

def test_writer_refuses_short_non_final_and_anything_after_final():
    state = open_stream(KEY, NONCE)
    for size in (0, 1, CHUNK_SIZE - 1, CHUNK_SIZE + 1):
        with pytest.raises(StreamError):
            encrypt_chunk(state, bytes(size), False)
    with pytest.raises(StreamError):
        encrypt_chunk(state, bytes(CHUNK_SIZE + 1), True)
    _, state = encrypt_chunk(state, bytes(CHUNK_SIZE), False)
    with pytest.raises(StreamError):
        encrypt_chunk(state, b"", True)       # empty final chunk after a full one (age refuses it)
    _, done = encrypt_chunk(state, b"end", True)
    with pytest.raises(StreamExtended):
        encrypt_chunk(done, b"more", True)
    assert state.counter == 1 and not state.finished   # refusals left the state as it was


def test_empty_final_chunk_after_a_full_one_is_refused_when_reading():
    state = open_stream(KEY, NONCE)
    first, state = encrypt_chunk(state, bytes(CHUNK_SIZE), False)
    # What a writer that ignores age's rule would produce: an empty chunk marked final at index 1.
    empty_final = stream.ChaCha20Poly1305(stream.payload_key(KEY, NONCE)).encrypt(
        (1).to_bytes(11, "big") + b"\x01", b"", None)
    with pytest.raises(StreamError):
        decrypt_payload(KEY, NONCE + first + empty_final)


def test_empty_payload_is_one_empty_final_chunk():
    payload = encrypt_payload(KEY, b"", nonce=NONCE)
    assert len(payload) == PAYLOAD_NONCE_LEN + TAG_LEN
    assert decrypt_payload(KEY, payload) == b""


def test_refused_chunk_leaves_state_usable():
    chunks = chunks_of(encrypt_payload(KEY, plaintext_of(CHUNK_SIZE + 3), nonce=NONCE))
    state = open_stream(KEY, NONCE)
    for bad in (chunks[1], chunks[0][:-1], chunks[0][:5], b"\x00" * ENCRYPTED_CHUNK_SIZE):
        with pytest.raises(StreamError):
            decrypt_chunk(state, bad)
        assert (state.counter, state.finished) == (0, False)
    out, state = decrypt_chunk(state, chunks[0])
    out2, state = decrypt_chunk(state, chunks[1], at_end=True)
    assert out + out2 == plaintext_of(CHUNK_SIZE + 3)


def test_counter_end_is_refused_not_wrapped():
    last = stream.MAX_CHUNKS - 1
    state = open_stream(KEY, NONCE, chunk_index=last)
    with pytest.raises(StreamError):
        encrypt_chunk(state, bytes(CHUNK_SIZE), False)
    final, _ = encrypt_chunk(state, b"end", True)
    assert decrypt_chunk(state, final, at_end=True)[0] == b"end"
    full = stream.ChaCha20Poly1305(stream.payload_key(KEY, NONCE)).encrypt(
        last.to_bytes(11, "big") + b"\x00", bytes(CHUNK_SIZE), None)
    with pytest.raises(StreamError):
        decrypt_chunk(state, full)
    with pytest.raises(ValueError):
        open_stream(KEY, NONCE, chunk_index=stream.MAX_CHUNKS)


def test_repr_hides_the_key():
    state = open_stream(KEY, NONCE)
    text = repr(state)
    assert "hidden" in text and KEY.hex() not in text and stream.payload_key(KEY, NONCE).hex() not in text
