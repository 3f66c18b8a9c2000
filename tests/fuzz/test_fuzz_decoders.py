"""Every decoder of network or disk bytes, fuzzed: arbitrary bytes, byte-mutated valid inputs and
structurally mutated valid inputs raise only the decoder's documented errors (never IndexError,
KeyError, ValueError, TypeError, OverflowError, RecursionError...), and valid inputs decode.

The targets are in ``tests/fuzz/targets.py`` (shared with ``bench/fuzz.py``, the long
coverage-guided campaigns). Quick here: ``CIPHERPOST_FUZZ_EXAMPLES=2000`` runs many more examples.
"""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import FUZZ, FUZZ_SLOW, MAX_INPUT, byte_mutations, mutate_structure, structural_mutations
from targets import TARGETS

NAMES = sorted(TARGETS)
FAST = [n for n in NAMES if not TARGETS[n].slow]
SLOW = [n for n in NAMES if TARGETS[n].slow]


def test_every_decoder_has_a_target():
    assert set(NAMES) >= {
        "frame", "frame_send_fields", "frame_ack_fields", "envelope_inspect", "envelope_decrypt",
        "envelope_accept",
        "initial_message", "ratchet_header", "session_blob", "session_body", "ratchet_body",
        "prekey_store_blob", "prekey_store_body", "identity", "signed_prekey", "kem_prekey",
        "one_time_prekey", "bundle", "keystore", "record", "sealed_x25519", "sealed_hybrid",
        "pake_finish", "pake_confirm", "pake_mailbox", "stream", "group_message",
        "sender_key_distribution", "sender_key_record", "sender_key_record_body",
    }


@pytest.mark.parametrize("name", NAMES)
def test_valid_inputs_decode(name):
    target = TARGETS[name]
    seeds = target.seeds()
    assert seeds
    for seed in seeds:
        target.run(seed)   # no exception at all


def arbitrary_bytes(name, data):
    TARGETS[name].check(data)


def byte_mutated(name, data):
    target = TARGETS[name]
    target.check(data.draw(byte_mutations(target.seeds())))


def structurally_mutated(name, data):
    target = TARGETS[name]
    target.check(data.draw(structural_mutations(target.seeds())))


@pytest.mark.parametrize("name", FAST)
@FUZZ
@given(data=st.binary(max_size=MAX_INPUT))
def test_arbitrary_bytes_raise_only_documented_errors(name, data):
    arbitrary_bytes(name, data)


@pytest.mark.parametrize("name", FAST)
@FUZZ
@given(data=st.data())
def test_byte_mutations_raise_only_documented_errors(name, data):
    byte_mutated(name, data)


@pytest.mark.parametrize("name", FAST)
@FUZZ
@given(data=st.data())
def test_structural_mutations_raise_only_documented_errors(name, data):
    structurally_mutated(name, data)


@pytest.mark.parametrize("name", SLOW)
@FUZZ_SLOW
@given(data=st.data())
def test_slow_targets_raise_only_documented_errors(name, data):
    arbitrary_bytes(name, data.draw(st.binary(max_size=64)))
    byte_mutated(name, data)
    structurally_mutated(name, data)


@pytest.mark.parametrize("name", FAST)
def test_campaign_structure_mutator_feeds_the_target(name):
    """bench/fuzz.py --structure: its mutator turns valid inputs into other msgpack, never raises."""
    target = TARGETS[name]
    rng = random.Random(name)
    changed = 0
    for seed in target.seeds():
        for _ in range(20):
            out = mutate_structure(seed, rng)
            if out is not None:
                changed += out != seed
                target.check(out)
    assert changed or name in ("record", "stream")   # their inputs are not msgpack
