"""Sessions: PQXDH + Double Ratchet + envelopes, as the client uses them."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cipherpost.crypto import session as S
from cipherpost.crypto.encoding import pack, unpack
from cipherpost.crypto.errors import (
    BundleError,
    CryptoError,
    DecryptionError,
    DuplicateMessage,
    EncodingError,
    PrekeyNotFound,
    StateCorrupt,
)
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.prekey_store import PrekeyStore
from cipherpost.crypto.prekeys import PrekeyBundle

ALICE = IdentityKeyPair.generate()
BOB = IdentityKeyPair.generate()
PSK = b"\x07" * 32


def bob_setup(*, one_time=True):
    store = PrekeyStore.empty()
    spk, store = store.rotate_signed_prekey(BOB, 100)
    opks, store = store.new_one_time_prekeys(3)
    kems, store = store.new_kem_prekeys(BOB, 3)
    _, store = store.new_last_resort_kem_prekey(BOB)
    return PrekeyBundle(BOB.public, spk, kems[0], opks[0] if one_time else None), store


def start(*, one_time=True, psk=None, bob_psk=None):
    """Alice opens a session and sends a first message, Bob accepts it."""
    bundle, store = bob_setup(one_time=one_time)
    alice = S.initiate_session(ALICE, bundle, psk=psk)
    env, alice = S.encrypt(alice, b"hello bob")
    text, bob, store = S.accept_session(BOB, store, env, psk=bob_psk if bob_psk is not None else psk)
    assert text == b"hello bob"
    return alice, bob, store, env


def talk(alice, bob, pattern):
    sender_is_alice = True
    n = 0
    for run in pattern:
        for _ in range(run):
            text = f"message {n} {'from alice' if sender_is_alice else 'from bob'}".encode()
            if sender_is_alice:
                env, alice = S.encrypt(alice, text)
                got, bob = S.decrypt(bob, env)
            else:
                env, bob = S.encrypt(bob, text)
                got, alice = S.decrypt(alice, env)
            assert got == text
            n += 1
        sender_is_alice = not sender_is_alice
    return alice, bob


@pytest.mark.parametrize("one_time", [True, False])
def test_long_conversation_both_ways(one_time):
    alice, bob, store, _ = start(one_time=one_time)
    assert alice.session_id == bob.session_id and len(alice.session_id) == 16
    assert alice.peer == BOB.public and bob.peer == ALICE.public
    assert alice.initiator and not bob.initiator
    # Bob replies first (Alice already sent), then every run length and direction change.
    alice, bob = talk(bob, alice, [1])[::-1]
    alice, bob = talk(alice, bob, [3, 1, 1, 2, 5, 1, 4, 4, 1, 1, 7, 2])
    assert store.one_time_count == (2 if one_time else 3)
    assert store.kem_one_time_count() == 2


def test_psk_on_both_sides_works():
    alice, bob, _, _ = start(psk=PSK)
    talk(alice, bob, [2, 2, 1])


def test_mismatched_psk_fails_cleanly():
    bundle, store = bob_setup()
    alice = S.initiate_session(ALICE, bundle, psk=PSK)
    env, _ = S.encrypt(alice, b"x")
    before = store.serialize()
    with pytest.raises(DecryptionError):
        S.accept_session(BOB, store, env, psk=b"\x08" * 32)
    with pytest.raises(DecryptionError):
        S.accept_session(BOB, store, env)
    assert store.serialize() == before
    S.accept_session(BOB, store, env, psk=PSK)  # the right PSK still works afterwards


def test_envelopes_carry_the_initial_message_until_a_reply():
    bundle, store = bob_setup()
    alice = S.initiate_session(ALICE, bundle)
    assert alice.awaiting_reply
    e1, alice = S.encrypt(alice, b"1")
    e2, alice = S.encrypt(alice, b"2")
    info1, info2 = S.inspect_envelope(e1), S.inspect_envelope(e2)
    assert info1.initial is not None and info1.initial == info2.initial
    assert info1.session_id == info2.session_id == alice.session_id
    # Any of them can start the session: the second arrives first.
    text, bob, store = S.accept_session(BOB, store, e2)
    assert text == b"2"
    text, bob = S.decrypt(bob, e1)
    assert text == b"1"
    reply, bob = S.encrypt(bob, b"r")
    assert S.inspect_envelope(reply).initial is None
    _, alice = S.decrypt(alice, reply)
    assert not alice.awaiting_reply
    e3, alice = S.encrypt(alice, b"3")
    assert S.inspect_envelope(e3).initial is None
    assert S.decrypt(bob, e3)[0] == b"3"


def test_replayed_initial_envelope_is_prekey_not_found():
    _, _, store, first = start()
    with pytest.raises(PrekeyNotFound):
        S.accept_session(BOB, store, first)
    # Without a one-time X25519 prekey the one-time KEM prekey still makes a replay fail.
    _alice, _bob, store, first = start(one_time=False)
    with pytest.raises(PrekeyNotFound):
        S.accept_session(BOB, store, first)


def test_decrypting_twice_is_duplicate_and_leaves_state():
    alice, bob, _, first = start()
    with pytest.raises(DuplicateMessage):
        S.decrypt(bob, first)
    env, alice = S.encrypt(alice, b"again")
    _, bob = S.decrypt(bob, env)
    before = bob.serialize()
    with pytest.raises(DuplicateMessage):
        S.decrypt(bob, env)
    assert bob.serialize() == before


def test_accept_session_requires_an_initial_message():
    _alice, bob, store, _ = start()
    reply, bob = S.encrypt(bob, b"r")
    with pytest.raises(EncodingError):
        S.accept_session(ALICE, store, reply)


def test_envelope_of_another_session_is_refused():
    _alice, bob, _, _ = start()
    alice2, _bob2, _, _ = start()
    env, _ = S.encrypt(alice2, b"x")
    with pytest.raises(DecryptionError):
        S.decrypt(bob, env)


def test_initial_message_of_another_session_in_an_envelope_is_refused():
    alice, bob, _, _ = start()
    alice2, _, _, _ = start()
    env, _ = S.encrypt(alice, b"x")
    other_env, _ = S.encrypt(alice2, b"y")
    parts = unpack(env, what="t")
    parts[2] = unpack(other_env, what="t")[2]
    with pytest.raises(DecryptionError):
        S.decrypt(bob, pack(parts))


def test_bad_bundle_is_refused():
    bundle, _ = bob_setup()
    mallory = IdentityKeyPair.generate()
    spk_m, _ = PrekeyStore.empty().rotate_signed_prekey(mallory, 1)
    with pytest.raises(BundleError):
        S.initiate_session(ALICE, PrekeyBundle(BOB.public, spk_m, bundle.kem_prekey, None))


def flip(data, i):
    out = bytearray(data)
    out[i // 8] ^= 1 << (i % 8)
    return bytes(out)


def test_every_bit_flip_of_a_short_envelope_fails_and_leaves_state():
    alice, bob, _, _ = start()
    reply, bob = S.encrypt(bob, b"r")
    _, alice = S.decrypt(alice, reply)
    env, alice = S.encrypt(alice, b"short")     # no initial message any more: ~100 bytes
    before = bob.serialize()
    for i in range(len(env) * 8):
        with pytest.raises(CryptoError):
            S.decrypt(bob, flip(env, i))
        assert bob.serialize() == before
    for n in range(len(env)):
        with pytest.raises(CryptoError):
            S.decrypt(bob, env[:n])
    assert S.decrypt(bob, env)[0] == b"short"


def test_bit_flips_in_the_initial_message_fail_cleanly():
    """One flipped bit in every byte of the initial envelope (bit position varies with the byte)."""
    bundle, store = bob_setup()
    alice = S.initiate_session(ALICE, bundle)
    env, alice = S.encrypt(alice, b"first")
    before = store.serialize()
    for byte in range(len(env)):
        with pytest.raises(CryptoError):
            S.accept_session(BOB, store, flip(env, byte * 8 + byte % 8))
    assert store.serialize() == before
    assert S.accept_session(BOB, store, env)[0] == b"first"


def test_bit_flips_in_a_repeated_initial_message_are_refused():
    bundle, store = bob_setup()
    alice = S.initiate_session(ALICE, bundle)
    e1, alice = S.encrypt(alice, b"1")
    e2, alice = S.encrypt(alice, b"2")
    _, bob, _ = S.accept_session(BOB, store, e1)
    before = bob.serialize()
    for byte in range(0, len(e2), 3):
        with pytest.raises(CryptoError):
            S.decrypt(bob, flip(e2, byte * 8 + byte % 8))
    assert bob.serialize() == before
    assert S.decrypt(bob, e2)[0] == b"2"


def test_session_round_trip():
    alice, bob, _, _ = start()
    for s in (alice, bob):
        blob = s.serialize()
        again = S.Session.deserialize(blob)
        assert again.serialize() == blob and again == s
    # A restored session keeps working.
    alice = S.Session.deserialize(alice.serialize())
    bob = S.Session.deserialize(bob.serialize())
    talk(alice, bob, [1, 1, 1])


def test_session_blob_truncations_and_bit_flips_are_state_corrupt():
    alice, _, _, _ = start()     # the initiator's blob includes the pending initial message
    blob = alice.serialize()
    for n in range(len(blob)):
        with pytest.raises(StateCorrupt):
            S.Session.deserialize(blob[:n])
    for i in range(len(blob) * 8):
        with pytest.raises(StateCorrupt):
            S.Session.deserialize(flip(blob, i))
    with pytest.raises(StateCorrupt):
        S.Session.deserialize(blob + b"\x00")


def test_inspect_envelope_rejects_garbage():
    for bad in (b"", b"\x00", pack([2, b"x", None, b"", b""]), pack([1, b"short", None, b"", b""])):
        with pytest.raises(EncodingError):
            S.inspect_envelope(bad)


def test_repr_hides_keys():
    alice, bob, _, _ = start()
    for s in (alice, bob):
        text = repr(s)
        assert s.ratchet.rk.hex() not in text and s.ratchet.dhs_private.hex() not in text


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["alice", "bob", "deliver", "drop"]), st.integers(0, 1000)),
                min_size=1, max_size=30),
       st.randoms(use_true_random=False))
def test_any_delivery_order_delivers_each_message_once(ops, rnd):
    """Envelopes delivered in any order, with drops, arrive exactly once with the right text;
    a second delivery is DuplicateMessage (or PrekeyNotFound for a replayed initial envelope)."""
    bundle, store = bob_setup()
    sessions = {"alice": S.initiate_session(ALICE, bundle), "bob": None}
    peer = {"alice": "bob", "bob": "alice"}
    in_flight, delivered, expected = [], {"alice": [], "bob": []}, {"alice": [], "bob": []}
    counter = 0

    def deliver(to, env, text):
        nonlocal store
        if to == "bob" and sessions["bob"] is None:
            got, sessions["bob"], store = S.accept_session(BOB, store, env)
        else:
            got, sessions[to] = S.decrypt(sessions[to], env)
        assert got == text
        delivered[to].append(got)
        before = sessions[to].serialize()
        with pytest.raises(DuplicateMessage):
            S.decrypt(sessions[to], env)
        assert sessions[to].serialize() == before
        if S.inspect_envelope(env).initial is not None:
            with pytest.raises(PrekeyNotFound):
                S.accept_session(BOB, store, env)

    for op, k in ops:
        if op in ("alice", "bob"):
            sender = op if sessions["bob"] is not None else "alice"
            text = b"%d" % counter
            counter += 1
            env, sessions[sender] = S.encrypt(sessions[sender], text)
            in_flight.append((peer[sender], env, text))
            expected[peer[sender]].append(text)
        elif in_flight:
            item = in_flight.pop(k % len(in_flight))
            if op == "deliver":
                deliver(*item)
            else:
                expected[item[0]].remove(item[2])
    rnd.shuffle(in_flight)
    for item in in_flight:
        deliver(*item)
    for who in ("alice", "bob"):
        assert sorted(delivered[who]) == sorted(expected[who])


def test_psk_and_session_ids_differ_between_sessions():
    a1, _, _, _ = start()
    a2, _, _, _ = start(psk=os.urandom(32))
    assert a1.session_id != a2.session_id
