"""Canonical byte encodings shared by the crypto layer.

All structures encode as msgpack arrays whose first element is a format version. Only ``bytes``,
``int``, ``bool``, ``None`` and nested arrays/maps occur, so the encoding is deterministic, which the
known-answer vectors in ``tests/vectors/`` rely on.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import EncodingError

PROTOCOL_LABEL = b"cipherpost/v1"


def context(label: str) -> bytes:
    """Domain-separation prefix: ``b"cipherpost/v1/" + label + b"\\x00"``.

    Every signature, HKDF ``info`` and MAC input in cipherpost starts with one of these, so a value
    produced for one purpose is never valid for another.
    """
    return PROTOCOL_LABEL + b"/" + label.encode("ascii") + b"\x00"


def pack(obj: Any) -> bytes:
    """Deterministic msgpack encoding (bin type for bytes)."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def is_one_msgpack_value(data: bytes) -> bool:
    """True if ``data`` is exactly one complete msgpack value, checked without building it.

    Run before ``msgpack.unpackb`` on untrusted bytes: unpackb allocates every array and map at its
    declared length before reading the items, so an *incomplete* input of nested ``array32``
    headers (5 bytes each, up to msgpack's depth limit of 1024) made a 64 KiB frame cost ~60 ms and
    ~68 MiB before failing (found by bench/fuzz.py; tests/fuzz/test_fuzz_amplification.py).
    ``Unpacker.skip`` walks the same bytes without allocating, and a complete value cannot declare
    more items than it has bytes, so what unpackb then allocates stays linear in the input.
    """
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        unpacker.skip()
    except Exception:  # msgpack raises several unrelated types for bad input
        return False
    consumed: int = unpacker.tell()
    return consumed == len(data)


def unpack(data: bytes, *, what: str, max_size: int = 1 << 20) -> Any:
    """Decode msgpack strictly: no trailing bytes, no str where bytes expected is checked by callers.

    Strings and byte strings may be as long as ``max_size`` allows (the input is refused above
    it, so none can be longer; a fixed 4,096-byte string cap here once made every message text
    longer than that undecryptable, issue 8 item 1). Array and map counts stay capped at 100,000
    (and at ``max_size``): msgpack preallocates a list for the count it reads.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncodingError(f"{what}: expected bytes")
    if len(data) > max_size:
        raise EncodingError(f"{what}: too large ({len(data)} bytes)")
    if not is_one_msgpack_value(bytes(data)):
        raise EncodingError(f"{what}: not one complete msgpack value")
    try:
        return msgpack.unpackb(
            bytes(data), raw=False, strict_map_key=True, use_list=True,
            max_bin_len=max_size, max_str_len=max_size, max_array_len=min(max_size, 100_000),
            max_map_len=min(max_size, 100_000),
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise EncodingError(f"{what}: not valid msgpack ({type(exc).__name__})") from None


def expect_array(obj: Any, *, what: str, version: int, length: int) -> list[Any]:
    """Check ``obj`` is ``[version, ...]`` with exactly ``length`` elements."""
    if not isinstance(obj, list) or len(obj) != length:
        raise EncodingError(f"{what}: wrong structure")
    if obj[0] != version or isinstance(obj[0], bool):
        raise EncodingError(f"{what}: unsupported version {obj[0]!r}")
    return obj


def expect_bytes(value: Any, *, what: str, length: int | None = None, max_len: int = 1 << 20) -> bytes:
    if not isinstance(value, bytes):
        raise EncodingError(f"{what}: expected bytes")
    if length is not None and len(value) != length:
        raise EncodingError(f"{what}: expected {length} bytes, got {len(value)}")
    if len(value) > max_len:
        raise EncodingError(f"{what}: too long")
    return value


def expect_int(value: Any, *, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise EncodingError(f"{what}: expected integer in [{lo}, {hi}]")
    return value


def expect_bool(value: Any, *, what: str) -> bool:
    if not isinstance(value, bool):
        raise EncodingError(f"{what}: expected bool")
    return value
