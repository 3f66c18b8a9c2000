"""Double Ratchet (spec section 3): conversations, out-of-order delivery, skipped-key bounds,
replays, tampering, and the guarantee that a failed call leaves the state untouched."""

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cipherpost.crypto.errors import (
    CryptoError,
    DecryptionError,
    DuplicateMessage,
    EncodingError,
    StateCorrupt,
    TooManySkipped,
)
from cipherpost.crypto.ratchet import (
    MAX_SKIP_PER_CHAIN,
    MAX_SKIPPED_TOTAL,
    Header,
    RatchetState,
    init_receiver,
    init_sender,
    ratchet_decrypt,
    ratchet_encrypt,
)

AD = b"associated data: both identities"


def new_pair():
    sk = os.urandom(32)
    bob_key = X25519PrivateKey.generate()
    bob_pub = bob_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    bob_priv = bob_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return init_sender(sk, bob_pub), init_receiver(sk, bob_priv)


def send(state, text):
    header, ct, state = ratchet_encrypt(state, text, AD)
    return (header, ct), state


def recv(state, msg):
    return ratchet_decrypt(state, msg[0], msg[1], AD)


def assert_fails_untouched(state, msg, error, ad=AD):
    before = state.serialize()
    with pytest.raises(error):
        ratchet_decrypt(state, msg[0], msg[1], ad)
    assert state.serialize() == before


def test_long_conversation_with_every_direction_change():
    alice, bob = new_pair()
    # Run lengths 1..6, alternating senders, Alice first: every kind of direction change.
    pattern = [1, 1, 2, 1, 3, 2, 1, 4, 6, 5, 1, 1]
    sender_is_alice = True
    count = 0
    for run in pattern:
        for _ in range(run):
            text = f"message {count}".encode()
            if sender_is_alice:
                msg, alice = send(alice, text)
                got, bob = recv(bob, msg)
            else:
                msg, bob = send(bob, text)
                got, alice = recv(alice, msg)
            assert got == text
            count += 1
        sender_is_alice = not sender_is_alice
    assert not alice.skipped and not bob.skipped


def test_dh_ratchet_changes_the_ratchet_key_each_turn():
    alice, bob = new_pair()
    m1, alice = send(alice, b"a")
    _, bob = recv(bob, m1)
    r1, bob = send(bob, b"b")
    _, alice = recv(alice, r1)
    m2, alice = send(alice, b"c")
    assert m1[0].dh != m2[0].dh
    assert m2[0].pn == 1 and m2[0].n == 0


def test_responder_cannot_send_first():
    _, bob = new_pair()
    with pytest.raises(CryptoError):
        ratchet_encrypt(bob, b"x", AD)


def test_out_of_order_within_and_across_chains():
    alice, bob = new_pair()
    a = []
    for i in range(5):
        m, alice = send(alice, b"a%d" % i)
        a.append(m)
    got, bob = recv(bob, a[3])             # skips a0..a2
    assert got == b"a3" and len(bob.skipped) == 3
    r, bob = send(bob, b"r")
    _, alice = recv(alice, r)
    m5, alice = send(alice, b"a5")          # new chain; pn = 5 so a4 is skipped too
    got, bob = recv(bob, m5)
    assert got == b"a5" and len(bob.skipped) == 4
    for i in (4, 0, 2, 1):
        got, bob = recv(bob, a[i])
        assert got == b"a%d" % i
    assert not bob.skipped                  # used keys are deleted


def test_duplicates_are_refused_and_leave_the_state_untouched():
    alice, bob = new_pair()
    m0, alice = send(alice, b"0")
    m1, alice = send(alice, b"1")
    m2, alice = send(alice, b"2")
    _, bob = recv(bob, m1)                  # m0 skipped
    assert_fails_untouched(bob, m1, DuplicateMessage)            # same chain, below Nr
    _, bob = recv(bob, m0)
    assert_fails_untouched(bob, m0, DuplicateMessage)            # skipped key already used
    r, bob = send(bob, b"r")
    _, alice = recv(alice, r)
    m3, alice = send(alice, b"3")
    _, bob = recv(bob, m3)                  # Bob moves to Alice's next chain
    assert_fails_untouched(bob, m1, DuplicateMessage)            # earlier chain
    got, bob = recv(bob, m2)                # m2 was skipped at the DH step: still decrypts
    assert got == b"2"
    assert_fails_untouched(bob, m2, DuplicateMessage)


def test_skip_bound_in_one_chain():
    alice, bob = new_pair()
    first, alice = send(alice, b"first")
    _, bob = recv(bob, first)
    msgs = []
    for i in range(MAX_SKIP_PER_CHAIN + 2):
        m, alice = send(alice, b"%d" % i)
        msgs.append(m)
    # Exactly MAX_SKIP_PER_CHAIN skipped keys is allowed ...
    got, ok_bob = recv(bob, msgs[MAX_SKIP_PER_CHAIN])
    assert got == b"%d" % MAX_SKIP_PER_CHAIN and len(ok_bob.skipped) == MAX_SKIP_PER_CHAIN
    # ... one more is not, and the state is untouched.
    assert_fails_untouched(bob, msgs[MAX_SKIP_PER_CHAIN + 1], TooManySkipped)


def test_skip_bound_across_a_dh_step():
    alice, bob = new_pair()
    first, alice = send(alice, b"first")
    _, bob = recv(bob, first)
    for _ in range(MAX_SKIP_PER_CHAIN + 1):
        _, alice = send(alice, b"lost")
    r, bob = send(bob, b"r")
    _, alice = recv(alice, r)
    m, alice = send(alice, b"new chain")    # header.pn = MAX_SKIP_PER_CHAIN + 2
    assert_fails_untouched(bob, m, TooManySkipped)


def test_forged_huge_counter_is_too_many_skipped():
    alice, bob = new_pair()
    (h, ct), alice = send(alice, b"x")
    assert_fails_untouched(bob, (Header(h.dh, h.pn, 2**32 - 1), ct), TooManySkipped)


def test_total_skipped_keys_are_bounded_oldest_dropped_first():
    alice, bob = new_pair()
    chains = []
    for _ in range(3):
        sent = []
        for i in range(MAX_SKIP_PER_CHAIN):
            m, alice = send(alice, b"%d" % i)
            sent.append(m)
        last, alice = send(alice, b"last")
        _, bob = recv(bob, last)            # skips the whole chain
        chains.append(sent)
        r, bob = send(bob, b"r")
        _, alice = recv(alice, r)
    assert len(bob.skipped) == MAX_SKIPPED_TOTAL
    # The oldest chain was dropped entirely: its messages are refused, not decrypted.
    with pytest.raises(DuplicateMessage):
        recv(bob, chains[0][0])
    got, _ = recv(bob, chains[1][0])
    assert got == b"0"
    got, _ = recv(bob, chains[2][-1])
    assert got == b"%d" % (MAX_SKIP_PER_CHAIN - 1)


def test_every_bit_flip_of_header_and_ciphertext_fails_and_leaves_state():
    alice, bob = new_pair()
    m0, alice = send(alice, b"hi")
    _, bob = recv(bob, m0)
    (header, ct), alice = send(alice, b"short message")
    hb = header.encode()
    for i in range(len(hb) * 8):
        flipped = bytearray(hb)
        flipped[i // 8] ^= 1 << (i % 8)
        before = bob.serialize()
        with pytest.raises((DecryptionError, EncodingError)):
            ratchet_decrypt(bob, Header.decode(bytes(flipped)), ct, AD)
        assert bob.serialize() == before
    for i in range(len(ct) * 8):
        flipped = bytearray(ct)
        flipped[i // 8] ^= 1 << (i % 8)
        assert_fails_untouched(bob, (header, bytes(flipped)), DecryptionError)
    for n in range(len(ct)):
        assert_fails_untouched(bob, (header, ct[:n]), DecryptionError)
    assert_fails_untouched(bob, (header, ct), DecryptionError, ad=AD + b"x")
    got, _ = recv(bob, (header, ct))
    assert got == b"short message"


def test_tampered_message_opening_a_new_chain_leaves_state():
    alice, bob = new_pair()
    (h, ct), alice = send(alice, b"hi")
    assert_fails_untouched(bob, (h, ct[:-1] + bytes([ct[-1] ^ 1])), DecryptionError)
    other = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert_fails_untouched(bob, (Header(other, h.pn, h.n), ct), DecryptionError)
    assert_fails_untouched(bob, (Header(bytes(32), h.pn, h.n), ct), DecryptionError)  # low order


def test_header_naming_the_initiators_first_peer_key_fails_cleanly():
    """Alice's first DHr (Bob's signed prekey) has no receiving chain; a forged header using it is
    a DecryptionError, not a crash."""
    alice, _ = new_pair()
    (_, ct), alice = send(alice, b"x")
    assert_fails_untouched(alice, (Header(alice.dhr, 0, 0), ct), DecryptionError)


def test_header_decode_is_strict():
    h = Header(b"\x01" * 32, 3, 7)
    assert Header.decode(h.encode()) == h
    for n in range(len(h.encode())):
        with pytest.raises(EncodingError):
            Header.decode(h.encode()[:n])
    with pytest.raises(EncodingError):
        Header.decode(h.encode() + b"\x00")


def conversation_state():
    alice, bob = new_pair()
    msgs = []
    for i in range(4):
        m, alice = send(alice, b"%d" % i)
        msgs.append(m)
    _, bob = recv(bob, msgs[3])
    r, bob = send(bob, b"r")
    _, alice = recv(alice, r)
    return bob


def test_state_round_trip():
    bob = conversation_state()
    blob = bob.serialize()
    again = RatchetState.deserialize(blob)
    assert again.serialize() == blob and again == bob


def test_state_truncations_and_bit_flips_are_state_corrupt():
    blob = conversation_state().serialize()
    for n in range(len(blob)):
        with pytest.raises(StateCorrupt):
            RatchetState.deserialize(blob[:n])
    for i in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(StateCorrupt):
            RatchetState.deserialize(bytes(flipped))


def test_repr_hides_keys():
    bob = conversation_state()
    text = repr(bob)
    for secret in (bob.rk, bob.dhs_private, *bob.skipped.values()):
        assert secret.hex() not in text


# -- property: any delivery order within the bound delivers every message exactly once ----------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["alice", "bob", "deliver", "drop"]), st.integers(0, 1000)),
                max_size=40),
       st.randoms(use_true_random=False))
def test_any_delivery_order_delivers_each_message_once(ops, rnd):
    alice, bob = new_pair()
    states = {"alice": alice, "bob": bob}
    peer = {"alice": "bob", "bob": "alice"}
    in_flight = []           # (recipient, message, plaintext)
    delivered = {"alice": [], "bob": []}
    expected = {"alice": [], "bob": []}
    bob_has_received = False
    counter = 0

    def deliver(item):
        nonlocal bob_has_received
        to, msg, text = item
        got, states[to] = recv(states[to], msg)
        assert got == text
        delivered[to].append(got)
        if to == "bob":
            bob_has_received = True
        # A second delivery of the same message is refused and changes nothing.
        assert_fails_untouched(states[to], msg, DuplicateMessage)

    for op, k in ops:
        if op in ("alice", "bob"):
            sender = op if (op == "alice" or bob_has_received) else "alice"
            text = b"%d" % counter
            counter += 1
            msg, states[sender] = send(states[sender], text)
            in_flight.append((peer[sender], msg, text))
            expected[peer[sender]].append(text)
        elif in_flight:
            item = in_flight.pop(k % len(in_flight))
            if op == "deliver":
                deliver(item)
            else:
                expected[item[0]].remove(item[2])
    rnd.shuffle(in_flight)
    for item in in_flight:
        deliver(item)
    for who in ("alice", "bob"):
        assert sorted(delivered[who]) == sorted(expected[who])
        assert len(set(delivered[who])) == len(delivered[who])


@settings(max_examples=20, deadline=None)
@given(st.integers(MAX_SKIP_PER_CHAIN + 1, MAX_SKIP_PER_CHAIN + 50))
def test_beyond_the_bound_fails_cleanly(skip):
    alice, bob = new_pair()
    (h, ct), alice = send(alice, b"x")
    assert_fails_untouched(bob, (Header(h.dh, 0, skip), ct), TooManySkipped)
    got, _ = recv(bob, (h, ct))
    assert got == b"x"
