"""Group sender keys (Signal Sender Keys): distribution, out-of-order delivery within the bound,
no second decryption, signatures, rotation (a removed member reads nothing later, a joiner nothing
earlier), the last five chains kept, the known-answer vectors, and the guarantee that a refused
message leaves the record untouched."""

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cipherpost.crypto import sender_keys
from cipherpost.crypto.encoding import context, pack, unpack
from cipherpost.crypto.errors import (
    CryptoError,
    DecryptionError,
    DuplicateMessage,
    EncodingError,
    InvalidSignature,
    StateCorrupt,
    TooManySkipped,
    UnknownSenderKey,
)
from cipherpost.crypto.sender_keys import (
    MAX_FORWARD_JUMP,
    MAX_ITERATION,
    MAX_MESSAGE_KEYS,
    MAX_SENDER_KEY_STATES,
    GroupMessage,
    SenderKeyDistribution,
    SenderKeyRecord,
    create_sender_key,
    distribution_message,
    group_decrypt,
    group_encrypt,
    process_distribution,
    rotate_sender_key,
)

AD = b"group id || sender name"
GROUP = os.urandom(16)
VECTOR_DIR = Path(__file__).resolve().parent.parent / "vectors"


def new_pair():
    """A sender's own record and one member's record after the distribution."""
    sender = create_sender_key(GROUP)
    return sender, process_distribution(None, distribution_message(sender))


def send(sender, text):
    return group_encrypt(sender, text, AD)


def assert_fails_untouched(record, message, error, ad=AD):
    before = record.serialize()
    with pytest.raises(error):
        group_decrypt(record, message, ad)
    assert record.serialize() == before


def test_messages_decrypt_in_order():
    sender, member = new_pair()
    for i in range(5):
        msg, sender = send(sender, b"hello %d" % i)
        text, member = group_decrypt(member, msg, AD)
        assert text == b"hello %d" % i
    assert member.current.iteration == sender.current.iteration == 5


def test_out_of_order_within_the_bound_and_each_once():
    sender, member = new_pair()
    msgs = []
    for i in range(6):
        msg, sender = send(sender, b"m%d" % i)
        msgs.append(msg)
    for i in (4, 0, 5, 2, 1, 3):
        text, member = group_decrypt(member, msgs[i], AD)
        assert text == b"m%d" % i
    assert not member.current.skipped          # every skipped key used once, then deleted
    for msg in msgs:
        assert_fails_untouched(member, msg, DuplicateMessage)


def test_forward_jump_bound():
    sender, member = new_pair()
    far = sender
    for _ in range(MAX_FORWARD_JUMP + 1):
        _, far = send(far, b"")
    msg, _ = send(far, b"too far")             # iteration MAX_FORWARD_JUMP + 1: skips one too many
    assert_fails_untouched(member, msg, TooManySkipped)
    # exactly at the bound is fine
    ok = sender
    for _ in range(MAX_FORWARD_JUMP):
        _, ok = send(ok, b"")
    msg, _ = send(ok, b"at the bound")
    text, member = group_decrypt(member, msg, AD)
    assert text == b"at the bound" and len(member.current.skipped) == MAX_FORWARD_JUMP


def test_skipped_keys_are_bounded_oldest_dropped_first():
    sender, member = new_pair()
    msgs = []
    for _ in range(MAX_MESSAGE_KEYS + 6):
        msg, sender = send(sender, b"x")
        msgs.append(msg)
    # Jumps of at most MAX_FORWARD_JUMP: 1000 + 999 + 4 = MAX_MESSAGE_KEYS + 3 keys skipped in all.
    for i in (MAX_FORWARD_JUMP, 2 * MAX_FORWARD_JUMP, MAX_MESSAGE_KEYS + 5):
        _, member = group_decrypt(member, msgs[i], AD)
    assert len(member.current.skipped) == MAX_MESSAGE_KEYS
    for oldest in msgs[:3]:
        assert_fails_untouched(member, oldest, DuplicateMessage)   # dropped first
    text, member = group_decrypt(member, msgs[3], AD)               # the next one is still there
    assert text == b"x"


def test_chain_end_keeps_the_record_loadable():
    """The last iteration a chain can send is MAX_ITERATION - 1; a message naming MAX_ITERATION
    (hand-made and signed by the sender) would leave a record that no longer deserializes."""
    sender = create_sender_key(GROUP)
    own = sender.current
    at_end = SenderKeyRecord(GROUP, (dataclasses.replace(own, iteration=MAX_ITERATION - 1),))
    member = process_distribution(None, distribution_message(at_end))
    msg, at_end = group_encrypt(at_end, b"last", AD)
    text, member = group_decrypt(member, msg, AD)
    assert text == b"last"
    assert SenderKeyRecord.deserialize(member.serialize()).serialize() == member.serialize()
    with pytest.raises(CryptoError):
        group_encrypt(at_end, b"one too many", AD)
    mk, _ = sender_keys._kdf_ck(member.current.chain_key)
    header = GroupMessage(GROUP, own.chain_id, MAX_ITERATION, b"", b"").header()
    ciphertext = sender_keys._encrypt(mk, b"past the end", AD + header)
    unsigned = GroupMessage(GROUP, own.chain_id, MAX_ITERATION, ciphertext, b"")
    signature = Ed25519PrivateKey.from_private_bytes(own.signing_private).sign(unsigned.signed_part())
    forged = dataclasses.replace(unsigned, signature=signature).encode()
    assert_fails_untouched(member, forged, EncodingError)


def test_every_bit_flip_is_refused_and_leaves_the_record():
    sender, member = new_pair()
    msg, _ = send(sender, b"flip me")
    for i in range(len(msg) * 8):
        flipped = bytearray(msg)
        flipped[i // 8] ^= 1 << (i % 8)
        before = member.serialize()
        with pytest.raises(CryptoError):
            group_decrypt(member, bytes(flipped), AD)
        assert member.serialize() == before


def test_signature_is_checked_before_decryption():
    sender, member = new_pair()
    msg, _ = send(sender, b"signed")
    m = GroupMessage.decode(msg)
    forged = GroupMessage(m.distribution_id, m.chain_id, m.iteration, m.ciphertext, bytes(64)).encode()
    assert_fails_untouched(member, forged, InvalidSignature)


def test_message_signed_by_another_key_on_the_same_chain_is_refused():
    """Someone who learnt the chain key (another member) but not the signing key cannot forge."""
    sender, member = new_pair()
    d = distribution_message(sender)
    impostor = create_sender_key(GROUP)
    # the impostor copies the chain (id, key) but signs with its own key
    own = impostor.current
    stolen = SenderKeyRecord(GROUP, (type(own)(d.chain_id, d.iteration, d.chain_key, own.signing_public,
                                                own.signing_private, own.skipped),))
    msg, _ = group_encrypt(stolen, b"I am the sender", AD)
    assert_fails_untouched(member, msg, InvalidSignature)


def test_wrong_associated_data_is_refused():
    sender, member = new_pair()
    msg, _ = send(sender, b"for this group")
    assert_fails_untouched(member, msg, DecryptionError, ad=b"another group || sender")


def test_unknown_chain_or_group_asks_for_the_key():
    _, member = new_pair()
    other = create_sender_key(GROUP)
    msg, _ = group_encrypt(other, b"from a chain never distributed", AD)
    assert_fails_untouched(member, msg, UnknownSenderKey)
    foreign = create_sender_key(os.urandom(16))
    msg, _ = group_encrypt(foreign, b"another group", AD)
    assert_fails_untouched(member, msg, UnknownSenderKey)


def test_only_the_owner_sends_or_distributes():
    _, member = new_pair()
    with pytest.raises(CryptoError):
        group_encrypt(member, b"not mine", AD)
    with pytest.raises(CryptoError):
        distribution_message(member)


def test_replayed_distribution_does_not_rewind_the_chain():
    sender, member = new_pair()
    old = distribution_message(sender)
    msg, sender = send(sender, b"once")
    _, member = group_decrypt(member, msg, AD)
    member = process_distribution(member, old)            # a relay or peer replays it
    assert_fails_untouched(member, msg, DuplicateMessage)


def test_joiner_cannot_read_earlier_messages():
    sender, _ = new_pair()
    early, sender = send(sender, b"before you joined")
    joiner = process_distribution(None, distribution_message(sender))
    assert_fails_untouched(joiner, early, DuplicateMessage)
    later, sender = send(sender, b"after")
    assert group_decrypt(joiner, later, AD)[0] == b"after"


def test_removed_member_cannot_read_after_rotation_but_in_flight_messages_decrypt():
    sender, stays = new_pair()
    removed = stays
    in_flight, sender = send(sender, b"sent before the removal")
    sender = rotate_sender_key(sender)
    stays = process_distribution(stays, distribution_message(sender))   # only to remaining members
    after, sender = send(sender, b"after the removal")
    assert group_decrypt(stays, after, AD)[0] == b"after the removal"
    assert_fails_untouched(removed, after, UnknownSenderKey)
    assert group_decrypt(stays, in_flight, AD)[0] == b"sent before the removal"


def test_last_five_chains_are_kept():
    sender, member = new_pair()
    first, sender = send(sender, b"first chain")
    for _ in range(MAX_SENDER_KEY_STATES - 1):
        sender = rotate_sender_key(sender)
        member = process_distribution(member, distribution_message(sender))
    assert len(member.states) == MAX_SENDER_KEY_STATES
    assert group_decrypt(member, first, AD)[0] == b"first chain"
    sender = rotate_sender_key(sender)
    member = process_distribution(member, distribution_message(sender))
    assert len(member.states) == MAX_SENDER_KEY_STATES
    assert_fails_untouched(member, first, UnknownSenderKey)


def test_distribution_for_another_group_is_refused():
    _, member = new_pair()
    with pytest.raises(CryptoError):
        process_distribution(member, distribution_message(create_sender_key(os.urandom(16))))


def test_encodings_are_strict():
    sender, _ = new_pair()
    d = distribution_message(sender).encode()
    assert SenderKeyDistribution.decode(d) == distribution_message(sender)
    msg, _ = send(sender, b"x")
    for bad in (b"", d[:-1], d + b"\x00", pack([2, *unpack(d, what="t")[1:]]), pack([1, 2, 3])):
        with pytest.raises(EncodingError):
            SenderKeyDistribution.decode(bad)
    for bad in (b"", msg[:-1], msg + b"\x00", pack([1, GROUP, -1, 0, b"", bytes(64)])):
        with pytest.raises(EncodingError):
            GroupMessage.decode(bad)


def conversation_record():
    sender, member = new_pair()
    msgs = []
    for i in range(4):
        msg, sender = send(sender, b"%d" % i)
        msgs.append(msg)
    _, member = group_decrypt(member, msgs[3], AD)   # three skipped keys stored
    return sender, member


def test_record_round_trip():
    sender, member = conversation_record()
    for record in (sender, member):
        assert SenderKeyRecord.deserialize(record.serialize()).serialize() == record.serialize()
    assert len(SenderKeyRecord.deserialize(member.serialize()).current.skipped) == 3


def test_record_truncations_and_bit_flips_are_state_corrupt():
    _, member = conversation_record()
    blob = member.serialize()
    for n in range(len(blob)):
        with pytest.raises(StateCorrupt):
            SenderKeyRecord.deserialize(blob[:n])
    for i in range(0, len(blob) * 8, 7):
        flipped = bytearray(blob)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(StateCorrupt):
            SenderKeyRecord.deserialize(bytes(flipped))


def reseal(body_fields):
    body = pack(body_fields)
    return pack([1, body, hashlib.sha256(context("state-checksum/sender-keys") + body).digest()])


def test_record_content_checks_behind_a_valid_checksum():
    sender, _ = conversation_record()
    body = unpack(unpack(sender.serialize(), what="t")[1], what="t")
    state = body[1][0]
    bad_states = [
        [state[0], state[1], state[2], os.urandom(32), state[4], state[5]],    # halves do not match
        [state[0], state[1], state[2], state[3], state[4], [[state[1], bytes(32)]]],  # skipped >= it
        [-1, *state[1:]],
    ]
    for bad in bad_states:
        with pytest.raises(StateCorrupt):
            SenderKeyRecord.deserialize(reseal([body[0], [bad]]))
    with pytest.raises(StateCorrupt):
        SenderKeyRecord.deserialize(reseal([body[0], [state, state]]))                # chain id twice
    with pytest.raises(StateCorrupt):
        SenderKeyRecord.deserialize(reseal([body[0], [state] * (MAX_SENDER_KEY_STATES + 1)]))


def test_repr_hides_keys():
    sender, member = conversation_record()
    secrets = [sender.current.chain_key, sender.current.signing_private, member.current.chain_key,
               *member.current.skipped.values()]
    for text in (repr(sender), repr(member), repr(sender.current), repr(distribution_message(sender))):
        assert "hidden" in text
        for secret in secrets:
            assert secret.hex() not in text and repr(secret) not in text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.permutations(range(8)), st.sets(st.integers(0, 7), max_size=3))
def test_any_delivery_order_delivers_each_message_once(order, dropped):
    sender, member = new_pair()
    msgs = []
    for i in range(8):
        msg, sender = send(sender, b"%d" % i)
        msgs.append(msg)
    seen = []
    for i in [*order, *order[:3]]:          # with some duplicates at the end
        if i in dropped:
            continue
        try:
            text, member = group_decrypt(member, msgs[i], AD)
        except DuplicateMessage:
            assert i in seen
            continue
        assert i not in seen
        seen.append(i)
        assert text == b"%d" % i
    assert sorted(seen) == sorted(set(range(8)) - dropped)


# --- known-answer vectors (tests/vectors/sender_keys.json) --------------------------------------------

def _load_generator():
    spec = importlib.util.spec_from_file_location("cipherpost_vector_generator_sk",
                                                  VECTOR_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()
VECTORS = json.loads((VECTOR_DIR / "sender_keys.json").read_text())
CASES = {case["name"]: case for case in VECTORS["cases"]}


def test_vector_file_format():
    assert VECTORS["format"] == 1
    assert set(CASES) == {"in-order", "out-of-order-and-rotation"}
    rotation = CASES["out-of-order-and-rotation"]
    assert len(rotation["outputs"]["distributions"]) == 2
    assert sorted(rotation["inputs"]["delivery"]) == list(range(len(rotation["inputs"]["messages"])))


@pytest.mark.parametrize("name", sorted(CASES))
def test_recompute_matches_byte_for_byte(name):
    case = CASES[name]
    outputs = GEN.compute_sender_keys(copy.deepcopy(case["inputs"]))
    for key, expected in case["outputs"].items():
        assert outputs[key] == expected, f"{name}: {key} differs from the recorded vector"
    assert set(outputs) == set(case["outputs"])


def test_generator_reproduces_the_file():
    assert GEN.generate_sender_keys() == VECTORS
