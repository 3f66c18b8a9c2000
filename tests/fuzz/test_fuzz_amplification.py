"""No decoder may spend memory out of proportion to its input. msgpack's ``unpackb`` allocates each
array and map at its declared length before reading the items, so an incomplete input of nested
container headers made every decoder allocate tens of MiB for a few KiB (bench/fuzz.py's
slowest-input report found it: a 370-byte envelope took 5 ms). Measured with tracemalloc (bytes
requested, not time), for every fuzz target and each container header msgpack has."""

import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import FUZZ
from targets import TARGETS

from cipherpost.protocol.errors import ProtocolError
from cipherpost.protocol.frames import decode_frame

# The PAKE targets parse no msgpack (and SPAKE2 in pure Python under tracemalloc is slow).
NAMES = sorted(n for n in TARGETS if not TARGETS[n].slow)
# array32, map32, array16, map16 headers declaring many items, repeated (and never filled)
HEADERS = [b"\xdd\x00\x01\x86\x9f", b"\xdf\x00\x01\x86\x9f", b"\xdc\xff\xff", b"\xde\xff\xff"]
ALLOWED_FACTOR = 64            # bytes traced per input byte
ALLOWED_BASE = 512 * 1024      # plus this much (msgpack.packb's 256 KiB buffer in *_body targets)


def traced_peak(run, data):
    run(data)   # warm-up: fixtures and caches are built on first use
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        run(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def nested(header: bytes, size: int, prefix: bytes = b"") -> bytes:
    return prefix + header * ((size - len(prefix)) // len(header))


@pytest.mark.parametrize("header", HEADERS[::2], ids=["array32", "array16"])
@pytest.mark.parametrize("name", NAMES)
def test_incomplete_nested_containers_cost_memory_in_proportion(name, header):
    target = TARGETS[name]
    for prefix in (b"", b"\x95\x01"):       # bare, and inside a version-1 array as our blobs start
        data = nested(header, 4096, prefix)
        assert traced_peak(target.check, data) < ALLOWED_BASE + ALLOWED_FACTOR * len(data), name


def refused_frame(data):
    with pytest.raises(ProtocolError):
        decode_frame(data)


@pytest.mark.parametrize("header", HEADERS, ids=["array32", "map32", "array16", "map16"])
def test_relay_frame_decoder_on_a_large_hostile_frame(header):
    """What an unauthenticated peer can make the relay spend on one frame: linear in its size
    (the decoder copies it once), not the ~68 MiB it cost before."""
    data = nested(header, 250_000)      # under the relay's 256 KiB frame limit
    assert traced_peak(refused_frame, data) < ALLOWED_BASE + 2 * len(data)


@FUZZ
@given(st.sampled_from(NAMES), st.sampled_from(HEADERS),
       st.integers(1, 4000), st.binary(max_size=8))
def test_any_nesting_depth_costs_memory_in_proportion(name, header, size, tail):
    data = nested(header, size) + tail
    assert traced_peak(TARGETS[name].check, data) < ALLOWED_BASE + ALLOWED_FACTOR * len(data)
