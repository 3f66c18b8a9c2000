"""Hypothesis strategies for fuzzing: byte-level mutations of valid inputs, and structural ones
(a msgpack node replaced, removed, duplicated or pushed to an edge value, also inside ``bin``
fields that are themselves msgpack, such as a header inside an envelope inside a frame)."""

from __future__ import annotations

import os
import random
from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Fast in the normal suite (the whole folder in a few seconds); CIPHERPOST_FUZZ_EXAMPLES=N for a
# deeper local run (bench/fuzz.py runs the coverage-guided campaigns). Slow targets get a tenth.
EXAMPLES = int(os.environ.get("CIPHERPOST_FUZZ_EXAMPLES", "25"))
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
FUZZ = settings(max_examples=EXAMPLES, **_COMMON)
FUZZ_SLOW = settings(max_examples=max(3, EXAMPLES // 10), **_COMMON)

MAX_INPUT = 4096   # arbitrary inputs stay small: the decoders' own size limits are tested elsewhere

# msgpack type bytes and boundaries a mutation is most likely to make interesting.
INTERESTING_BYTES = [0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3,
                     0xC4, 0xC5, 0xC6, 0xC7, 0xCA, 0xCB, 0xCC, 0xCF, 0xD0, 0xD3, 0xD4, 0xD8, 0xD9,
                     0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF]
EDGE_INTS = [-(1 << 63), -1, 0, 1, 2, 255, 256, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63,
             (1 << 64) - 1]
_POS = st.integers(min_value=0, max_value=1 << 20)

_OP = st.one_of(
    st.tuples(st.just("flip"), _POS, st.integers(0, 7)),
    st.tuples(st.just("truncate"), _POS),
    st.tuples(st.just("insert"), _POS, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), _POS, st.integers(1, 64)),
    st.tuples(st.just("set"), _POS, st.sampled_from(INTERESTING_BYTES)),
    st.tuples(st.just("duplicate"), _POS, st.integers(1, 64)),
)


def _apply(data: bytes, op: tuple[Any, ...]) -> bytes:
    b = bytearray(data)
    pos = op[1] % (len(b) + 1)
    kind = op[0]
    if kind == "flip" and b:
        b[pos % len(b)] ^= 1 << op[2]
    elif kind == "truncate":
        del b[pos:]
    elif kind == "insert":
        b[pos:pos] = op[2]
    elif kind == "delete":
        del b[pos:pos + op[2]]
    elif kind == "set" and b:
        b[pos % len(b)] = op[2]
    elif kind == "duplicate":
        b[pos:pos] = b[pos:pos + op[2]]
    return bytes(b)


def byte_mutations(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A valid input with 1 to 4 byte-level mutations."""
    def mutate(pair: tuple[bytes, list[tuple[Any, ...]]]) -> bytes:
        data, ops = pair
        for op in ops:
            data = _apply(data, op)
        return data
    return st.tuples(st.sampled_from(seeds), st.lists(_OP, min_size=1, max_size=4)).map(mutate)


# --- structural mutations ----------------------------------------------------------------------------

msgpack_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.sampled_from(EDGE_INTS)
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats() | st.binary(max_size=40) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                       max_size=4),
    max_leaves=8,
)

_BIN = object()   # path step: "decode this bin field as msgpack and go inside"


def _nested(b: bytes) -> Any:
    """The msgpack structure inside a bin field, if it really is one (it re-encodes identically)."""
    if len(b) < 2 or (b[0] not in range(0x90, 0xA0) and b[0] not in (0xDC, 0xDD, 0xDE, 0xDF) \
            and b[0] not in range(0x80, 0x90)):
        return None
    try:
        obj = msgpack.unpackb(b, raw=False, strict_map_key=False)
    except Exception:  # not msgpack: an opaque field
        return None
    if not isinstance(obj, list | dict) or msgpack.packb(obj, use_bin_type=True) != b:
        return None
    return obj


def _children(obj: Any) -> list[tuple[Any, Any]]:
    if isinstance(obj, list):
        return list(enumerate(obj))
    if isinstance(obj, dict):
        return list(obj.items())
    if isinstance(obj, bytes):
        inner = _nested(obj)
        return [] if inner is None else [(_BIN, inner)]
    return []


def _paths(obj: Any, prefix: tuple[Any, ...] = (), depth: int = 0) -> list[tuple[Any, ...]]:
    out = [prefix]
    if depth < 8:
        for key, child in _children(obj):
            out.extend(_paths(child, (*prefix, key), depth + 1))
    return out


def _at(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = _nested(obj) if key is _BIN else obj[key]
    return obj


def _replace(obj: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    key, rest = path[0], path[1:]
    if key is _BIN:
        return msgpack.packb(_replace(_nested(obj), rest, new), use_bin_type=True)
    copy: Any = list(obj) if isinstance(obj, list) else dict(obj)
    copy[key] = _replace(obj[key], rest, new)
    return copy


@st.composite
def _node_mutation(draw: st.DrawFn, node: Any) -> Any:
    choices = ["replace", "edge_int"]
    if isinstance(node, list):
        choices += ["drop_item", "append_item", "duplicate_item"]
    if isinstance(node, dict):
        choices += ["drop_key", "add_key"]
    if isinstance(node, bytes | str):
        choices += ["shorter", "longer", "empty", "retype"]
    kind = draw(st.sampled_from(choices))
    if kind == "edge_int":
        return draw(st.sampled_from([*EDGE_INTS, True, False, None, 1.0]))
    if kind == "drop_item" and node:
        i = draw(st.integers(0, len(node) - 1))
        return node[:i] + node[i + 1:]
    if kind == "append_item":
        return [*node, draw(msgpack_values)]
    if kind == "duplicate_item" and node:
        return [*node, node[-1]]
    if kind == "drop_key" and node:
        key = draw(st.sampled_from(sorted(node, key=repr)))
        return {k: v for k, v in node.items() if k != key}
    if kind == "add_key":
        return {**node, draw(st.text(max_size=12)): draw(msgpack_values)}
    if kind == "shorter" and node:
        return node[:draw(st.integers(0, len(node) - 1))]
    if kind == "longer":
        return node + node[:1] * draw(st.integers(1, 3))
    if kind == "empty":
        return node[:0]
    if kind == "retype":
        return node.encode() if isinstance(node, str) else node.decode("latin-1")
    return draw(msgpack_values)


@st.composite
def structural_mutations(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid msgpack input with one node changed (at any depth, also inside nested encodings)."""
    seed = draw(st.sampled_from(seeds))
    try:
        obj = msgpack.unpackb(seed, raw=False, strict_map_key=False)
    except Exception:  # a seed that is not msgpack (a record, a stream): mutate its bytes instead
        return draw(byte_mutations([seed]))
    path = draw(st.sampled_from(_paths(obj)))
    new = draw(_node_mutation(_at(obj, path)))
    try:
        return msgpack.packb(_replace(obj, path, new), use_bin_type=True)  # type: ignore[no-any-return]
    except (OverflowError, ValueError, TypeError):  # e.g. a value msgpack cannot encode
        return seed


# --- the same structural mutation for atheris (bench/fuzz.py --structure): a seeded RNG, no Hypothesis

def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 2 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(EDGE_INTS)
    if kind == 3:
        return rng.randrange(-(1 << 63), 1 << 64)
    if kind == 4:
        return rng.randbytes(rng.choice([0, 1, 15, 16, 17, 31, 32, 33, 64, rng.randrange(200)]))
    if kind == 5:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(20)))
    if kind == 6:
        return rng.random() * 1e6
    if kind == 7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {str(rng.randrange(100)): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def mutate_structure(data: bytes, rng: random.Random) -> bytes | None:
    """One node of a msgpack input changed (as :func:`structural_mutations`), or None if ``data``
    is not msgpack."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # not msgpack (yet): the byte-level mutator has to get it there
        return None
    path = rng.choice(_paths(obj))
    node = _at(obj, path)
    choice = rng.randrange(6)
    new: Any
    if choice == 0 and isinstance(node, list) and node:
        i = rng.randrange(len(node))
        new = node[:i] + node[i + 1:]
    elif choice == 1 and isinstance(node, list):
        new = [*node, _random_value(rng)]
    elif choice == 2 and isinstance(node, dict) and node:
        drop = rng.choice(sorted(node, key=repr))
        new = {k: v for k, v in node.items() if k != drop}
    elif choice == 3 and isinstance(node, bytes | str) and node:
        new = node[:rng.randrange(len(node))]
    elif choice == 4:
        new = rng.choice([*EDGE_INTS, True, False, None, b"", ""])
    else:
        new = _random_value(rng)
    try:
        return msgpack.packb(_replace(obj, path, new), use_bin_type=True)  # type: ignore[no-any-return]
    except (OverflowError, ValueError, TypeError):
        return None
