"""PQXDH (spec sections 3.3 and 3.4): agreement, PSK extension, bundle checks, prekey consumption."""

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cipherpost.crypto import pqxdh
from cipherpost.crypto.errors import BundleError, DecryptionError, EncodingError, PrekeyNotFound
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.prekey_store import PrekeyStore
from cipherpost.crypto.prekeys import KemPrekey, OneTimePrekey, PrekeyBundle, SignedPrekey

ALICE = IdentityKeyPair.generate()
BOB = IdentityKeyPair.generate()
MALLORY = IdentityKeyPair.generate()


def bob_setup(*, one_time=True, last_resort=False):
    store = PrekeyStore.empty()
    spk, store = store.rotate_signed_prekey(BOB, 100)
    opks, store = store.new_one_time_prekeys(2)
    kems, store = store.new_kem_prekeys(BOB, 2)
    lr, store = store.new_last_resort_kem_prekey(BOB)
    bundle = PrekeyBundle(BOB.public, spk, lr if last_resort else kems[0], opks[0] if one_time else None)
    return bundle, store


@pytest.mark.parametrize("one_time", [True, False])
@pytest.mark.parametrize("last_resort", [True, False])
def test_both_sides_agree(one_time, last_resort):
    bundle, store = bob_setup(one_time=one_time, last_resort=last_resort)
    sk, ad, msg = pqxdh.initiate(ALICE, bundle)
    sk_b, ad_b, new_store = pqxdh.respond(BOB, store, msg)
    assert sk == sk_b and len(sk) == 32
    # Spec 3.3: AD = Encode(IK_A) || Encode(IK_B).
    assert ad == ad_b == ALICE.public.encode() + BOB.public.encode()
    assert msg.identity == ALICE.public
    assert msg.signed_prekey_id == bundle.signed_prekey.key_id
    assert msg.one_time_prekey_id == (bundle.one_time_prekey.key_id if one_time else None)
    assert msg.kem_prekey_id == bundle.kem_prekey.key_id
    # Spec 3.4: used one-time keys are deleted, the last-resort KEM key is kept.
    assert new_store.one_time_count == store.one_time_count - (1 if one_time else 0)
    assert new_store.kem_one_time_count() == store.kem_one_time_count() - (0 if last_resort else 1)
    if last_resort:
        new_store.kem_private(bundle.kem_prekey.key_id)  # still held: raises otherwise
    # The input store is untouched.
    assert store.one_time_count == 2 and store.kem_one_time_count() == 2


def test_each_run_gives_a_fresh_key():
    bundle, _ = bob_setup()
    assert pqxdh.initiate(ALICE, bundle)[0] != pqxdh.initiate(ALICE, bundle)[0]


def test_replay_after_consumption_is_prekey_not_found():
    bundle, store = bob_setup()
    _, _, msg = pqxdh.initiate(ALICE, bundle)
    _, _, store2 = pqxdh.respond(BOB, store, msg)
    with pytest.raises(PrekeyNotFound):
        pqxdh.respond(BOB, store2, msg)


def test_replay_with_only_the_kem_one_time_key_consumed_is_prekey_not_found():
    bundle, store = bob_setup(one_time=False)
    _, _, msg = pqxdh.initiate(ALICE, bundle)
    _, _, store2 = pqxdh.respond(BOB, store, msg)
    with pytest.raises(PrekeyNotFound):
        pqxdh.respond(BOB, store2, msg)


@pytest.mark.parametrize("field", ["signed_prekey_id", "one_time_prekey_id", "kem_prekey_id"])
def test_unknown_prekey_ids(field):
    bundle, store = bob_setup()
    _, _, msg = pqxdh.initiate(ALICE, bundle)
    with pytest.raises(PrekeyNotFound):
        pqxdh.respond(BOB, store, dataclasses.replace(msg, **{field: 999}))


def test_rotated_away_signed_prekey_is_prekey_not_found():
    bundle, store = bob_setup()
    _, _, msg = pqxdh.initiate(ALICE, bundle)
    _, store = store.rotate_signed_prekey(BOB, 200)
    pqxdh.respond(BOB, store, msg)  # the previous signed prekey is still held
    _, store = store.rotate_signed_prekey(BOB, 300)
    with pytest.raises(PrekeyNotFound):
        pqxdh.respond(BOB, store, msg)


def test_psk_on_both_sides():
    psk = os.urandom(32)
    bundle, store = bob_setup()
    sk, _, msg = pqxdh.initiate(ALICE, bundle, psk=psk)
    assert msg.psk_id == pqxdh.psk_id(psk) and len(msg.psk_id) == 16
    sk_b, _, _ = pqxdh.respond(BOB, store, msg, psk=psk)
    assert sk == sk_b


def test_psk_changes_the_key():
    """Same randomness with and without a PSK gives different keys: the PSK really is mixed in."""
    bundle, store = bob_setup()
    ek = X25519PrivateKey.generate()

    class Fixed:
        def __init__(self):
            self.encaps = None

        def x25519_private(self):
            return ek

        def mlkem_encapsulate(self, public):
            if self.encaps is None:
                self.encaps = public.encapsulate()
            return self.encaps

        def random_bytes(self, n):
            return os.urandom(n)

    fixed = Fixed()
    sk_plain, _, m1 = pqxdh.initiate(ALICE, bundle, entropy=fixed)
    sk_psk, _, m2 = pqxdh.initiate(ALICE, bundle, psk=b"\x01" * 32, entropy=fixed)
    assert m1.kem_ciphertext == m2.kem_ciphertext and m1.ephemeral == m2.ephemeral
    assert sk_plain != sk_psk
    assert pqxdh.respond(BOB, store, m2, psk=b"\x01" * 32)[0] == sk_psk


def test_mismatched_psk_fails_cleanly():
    bundle, store = bob_setup()
    _, _, msg = pqxdh.initiate(ALICE, bundle, psk=b"\x01" * 32)
    with pytest.raises(DecryptionError):
        pqxdh.respond(BOB, store, msg, psk=b"\x02" * 32)
    with pytest.raises(DecryptionError):
        pqxdh.respond(BOB, store, msg)  # Bob expects none
    _, _, plain = pqxdh.initiate(ALICE, bundle)
    with pytest.raises(DecryptionError):
        pqxdh.respond(BOB, store, plain, psk=b"\x01" * 32)  # Bob expects one, Alice used none


def test_forged_psk_id_still_fails():
    """Even with the right psk id, a different PSK on Alice's side gives a different SK."""
    bundle, store = bob_setup()
    sk, _, msg = pqxdh.initiate(ALICE, bundle, psk=b"\x01" * 32)
    forged = dataclasses.replace(msg, psk_id=pqxdh.psk_id(b"\x02" * 32))
    assert pqxdh.respond(BOB, store, forged, psk=b"\x02" * 32)[0] != sk


def test_psk_must_be_32_bytes():
    bundle, _ = bob_setup()
    with pytest.raises(ValueError):
        pqxdh.initiate(ALICE, bundle, psk=b"short")


def test_bad_signed_prekey_signature():
    bundle, _ = bob_setup()
    sig = bytearray(bundle.signed_prekey.signature)
    sig[0] ^= 1
    bad_spk = dataclasses.replace(bundle.signed_prekey, signature=bytes(sig))
    bad = dataclasses.replace(bundle, signed_prekey=bad_spk)
    with pytest.raises(BundleError):
        pqxdh.initiate(ALICE, bad)


@pytest.mark.parametrize("last_resort", [False, True])
def test_bad_kem_prekey_signature(last_resort):
    bundle, _ = bob_setup(last_resort=last_resort)
    sig = bytearray(bundle.kem_prekey.signature)
    sig[-1] ^= 0x80
    bad = dataclasses.replace(bundle, kem_prekey=dataclasses.replace(bundle.kem_prekey, signature=bytes(sig)))
    with pytest.raises(BundleError):
        pqxdh.initiate(ALICE, bad)


def test_kem_prekey_last_resort_flag_is_signed():
    bundle, _ = bob_setup()
    bad = dataclasses.replace(bundle, kem_prekey=dataclasses.replace(bundle.kem_prekey, last_resort=True))
    with pytest.raises(BundleError):
        pqxdh.initiate(ALICE, bad)


def test_swapped_prekey_public_key_is_rejected():
    bundle, _ = bob_setup()
    other = PrekeyStore.empty().rotate_signed_prekey(MALLORY, 100)[0]
    bad = dataclasses.replace(bundle, signed_prekey=dataclasses.replace(bundle.signed_prekey,
                                                                          public=other.public))
    with pytest.raises(BundleError):
        pqxdh.initiate(ALICE, bad)


def test_prekeys_signed_by_another_identity():
    store = PrekeyStore.empty()
    spk_m, store = store.rotate_signed_prekey(MALLORY, 100)
    kem_m, store = store.new_last_resort_kem_prekey(MALLORY)
    bundle, _ = bob_setup()
    bads = (dataclasses.replace(bundle, signed_prekey=spk_m), dataclasses.replace(bundle, kem_prekey=kem_m))
    for bad in bads:
        with pytest.raises(BundleError):
            pqxdh.initiate(ALICE, bad)
    # A server claiming Mallory's prekeys belong to Bob: from_parts rejects it too.
    with pytest.raises(BundleError):
        PrekeyBundle.from_parts(BOB.public.encode(), spk_m.encode(), kem_m.encode(), None)


def test_low_order_one_time_prekey_is_rejected():
    bundle, _ = bob_setup()
    bad = dataclasses.replace(bundle, one_time_prekey=OneTimePrekey(1, bytes(32)))
    with pytest.raises(BundleError):
        pqxdh.initiate(ALICE, bad)


def test_low_order_signed_prekey_is_rejected_even_if_signed():
    spk = SignedPrekey.create(BOB, 7, bytes(32), 100)
    bundle, _ = bob_setup()
    with pytest.raises(BundleError):
        pqxdh.initiate(ALICE, dataclasses.replace(bundle, signed_prekey=spk))


def test_malformed_kem_public_key_is_rejected_even_if_signed():
    kem = KemPrekey.create(BOB, 9, b"\xff" * 1184, False)
    bundle, _ = bob_setup()
    with pytest.raises(BundleError):
        pqxdh.initiate(ALICE, dataclasses.replace(bundle, kem_prekey=kem))


def test_low_order_ephemeral_is_rejected_by_the_responder():
    bundle, store = bob_setup()
    _, _, msg = pqxdh.initiate(ALICE, bundle)
    with pytest.raises(EncodingError):
        pqxdh.respond(BOB, store, dataclasses.replace(msg, ephemeral=bytes(32)))


def test_initial_message_round_trip_and_strict_decode():
    bundle, _ = bob_setup()
    _, _, msg = pqxdh.initiate(ALICE, bundle, psk=b"\x03" * 32)
    data = msg.encode()
    assert pqxdh.InitialMessage.decode(data) == msg
    for n in range(0, len(data), 7):
        with pytest.raises(EncodingError):
            pqxdh.InitialMessage.decode(data[:n])
    with pytest.raises(EncodingError):
        pqxdh.InitialMessage.decode(data + b"\x00")
    with pytest.raises(EncodingError):
        pqxdh.InitialMessage.decode(dataclasses.replace(msg, kem_ciphertext=b"\x00" * 1087).encode())


def test_initial_message_with_a_broken_identity_binding_is_encoding_error():
    bundle, _ = bob_setup()
    _, _, msg = pqxdh.initiate(ALICE, bundle)
    forged = dataclasses.replace(msg, identity=dataclasses.replace(msg.identity, dh_pub=BOB.public.dh_pub))
    with pytest.raises(EncodingError):
        pqxdh.InitialMessage.decode(forged.encode())


def test_tampered_ciphertext_gives_a_different_key_not_a_crash():
    """ML-KEM decapsulation uses implicit rejection: a changed ciphertext yields an unrelated key,
    so the first ratchet message (see test_session) fails to authenticate."""
    bundle, store = bob_setup()
    sk, _, msg = pqxdh.initiate(ALICE, bundle)
    ct = bytearray(msg.kem_ciphertext)
    ct[500] ^= 4
    assert pqxdh.respond(BOB, store, dataclasses.replace(msg, kem_ciphertext=bytes(ct)))[0] != sk


def test_psk_id_is_deterministic_and_separated():
    assert pqxdh.psk_id(b"\x01" * 32) == pqxdh.psk_id(b"\x01" * 32)
    assert pqxdh.psk_id(b"\x01" * 32) != pqxdh.psk_id(b"\x02" * 32)
    assert pqxdh.psk_id(b"\x01" * 32) != b"\x01" * 16
