"""PrekeyStore: generation, id counters, retention, signatures, and strict deserialization."""

import hashlib

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cipherpost.crypto.encoding import context, pack, unpack
from cipherpost.crypto.errors import PrekeyNotFound, StateCorrupt
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.prekey_store import PrekeyStore

BOB = IdentityKeyPair.generate()


def full_store():
    store = PrekeyStore.empty()
    _, store = store.rotate_signed_prekey(BOB, 1000)
    _, store = store.new_one_time_prekeys(2)
    _, store = store.new_kem_prekeys(BOB, 1)
    _, store = store.new_last_resort_kem_prekey(BOB)
    return store


def reseal(body_fields):
    """A blob with a *valid* checksum around arbitrary body fields (to test content checks)."""
    body = pack(body_fields)
    return pack([1, body, hashlib.sha256(context("state-checksum/prekey-store") + body).digest()])


def test_empty_store():
    store = PrekeyStore.empty()
    assert store.current_signed_prekey is None
    assert store.one_time_count == 0
    assert store.kem_one_time_count() == 0
    assert PrekeyStore.deserialize(store.serialize()).serialize() == store.serialize()


def test_generated_prekeys_are_signed_by_the_identity():
    store = PrekeyStore.empty()
    spk, store = store.rotate_signed_prekey(BOB, 1234)
    kems, store = store.new_kem_prekeys(BOB, 3)
    last, store = store.new_last_resort_kem_prekey(BOB)
    spk.verify(BOB.public)
    assert spk.created_at == 1234
    for kem in kems:
        kem.verify(BOB.public)
        assert not kem.last_resort
    last.verify(BOB.public)
    assert last.last_resort
    assert store.current_signed_prekey == spk


def test_operations_return_new_stores_and_leave_the_old_untouched():
    store = PrekeyStore.empty()
    before = store.serialize()
    opks, new = store.new_one_time_prekeys(5)
    assert store.serialize() == before
    assert store.one_time_count == 0 and new.one_time_count == 5
    assert len({o.key_id for o in opks}) == 5


def test_signed_prekey_rotation_keeps_the_last_two():
    store = PrekeyStore.empty()
    spk1, store = store.rotate_signed_prekey(BOB, 1)
    spk2, store = store.rotate_signed_prekey(BOB, 2)
    assert store.signed_prekey_private(spk1.key_id)
    spk3, store = store.rotate_signed_prekey(BOB, 3)
    assert store.current_signed_prekey == spk3
    assert store.signed_prekey_private(spk2.key_id)
    with pytest.raises(PrekeyNotFound):
        store.signed_prekey_private(spk1.key_id)
    assert [spk1.key_id, spk2.key_id, spk3.key_id] == [1, 2, 3]


def test_private_halves_match_the_published_keys():
    store = full_store()
    spk = store.current_signed_prekey
    pub = store.signed_prekey_private(spk.key_id).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert pub == spk.public
    opks, store = store.new_one_time_prekeys(1)
    pub = store.one_time_private(opks[0].key_id).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert pub == opks[0].public
    kems, store = store.new_kem_prekeys(BOB, 1)
    key, one_time = store.kem_private(kems[0].key_id)
    assert one_time and key.public_key().public_bytes_raw() == kems[0].public


def test_key_ids_are_never_reused():
    store = PrekeyStore.empty()
    opks, store = store.new_one_time_prekeys(3)
    kems, store = store.new_kem_prekeys(BOB, 2)
    last1, store = store.new_last_resort_kem_prekey(BOB)
    store = store.without_one_time(opks[2].key_id, kems[1].key_id)
    # Round trip through serialization: the counters are persisted, not recomputed from the pools.
    store = PrekeyStore.deserialize(store.serialize())
    more_opks, store = store.new_one_time_prekeys(2)
    more_kems, store = store.new_kem_prekeys(BOB, 1)
    last2, store = store.new_last_resort_kem_prekey(BOB)
    opk_ids = [o.key_id for o in opks + more_opks]
    kem_ids = [k.key_id for k in kems] + [last1.key_id] + [k.key_id for k in more_kems] + [last2.key_id]
    assert opk_ids == sorted(set(opk_ids))
    assert kem_ids == sorted(set(kem_ids))  # one-time and last-resort KEM keys share a namespace


def test_used_one_time_prekeys_are_removed_but_last_resort_stays():
    store = PrekeyStore.empty()
    opks, store = store.new_one_time_prekeys(2)
    kems, store = store.new_kem_prekeys(BOB, 1)
    last, store = store.new_last_resort_kem_prekey(BOB)
    store = store.without_one_time(opks[0].key_id, kems[0].key_id)
    assert store.one_time_count == 1 and store.kem_one_time_count() == 0
    with pytest.raises(PrekeyNotFound):
        store.one_time_private(opks[0].key_id)
    with pytest.raises(PrekeyNotFound):
        store.kem_private(kems[0].key_id)
    _, one_time = store.kem_private(last.key_id)
    assert not one_time


def test_last_resort_rotation_keeps_the_last_two():
    store = PrekeyStore.empty()
    l1, store = store.new_last_resort_kem_prekey(BOB)
    l2, store = store.new_last_resort_kem_prekey(BOB)
    l3, store = store.new_last_resort_kem_prekey(BOB)
    store.kem_private(l2.key_id)
    store.kem_private(l3.key_id)
    with pytest.raises(PrekeyNotFound):
        store.kem_private(l1.key_id)


def test_round_trip_is_exact():
    store = full_store()
    blob = store.serialize()
    again = PrekeyStore.deserialize(blob)
    assert again.serialize() == blob
    assert again.current_signed_prekey == store.current_signed_prekey


def test_every_truncation_is_state_corrupt():
    blob = full_store().serialize()
    for n in range(len(blob)):
        with pytest.raises(StateCorrupt):
            PrekeyStore.deserialize(blob[:n])


def test_every_bit_flip_is_state_corrupt():
    blob = full_store().serialize()
    for i in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(StateCorrupt):
            PrekeyStore.deserialize(bytes(flipped))


def test_trailing_bytes_and_wrong_version_are_state_corrupt():
    blob = full_store().serialize()
    with pytest.raises(StateCorrupt):
        PrekeyStore.deserialize(blob + b"\x00")
    outer = unpack(blob, what="t")
    with pytest.raises(StateCorrupt):
        PrekeyStore.deserialize(pack([2, outer[1], outer[2]]))


def test_inconsistent_content_with_valid_checksum_is_state_corrupt():
    store = full_store()
    body = unpack(unpack(store.serialize(), what="t")[1], what="t")
    assert PrekeyStore.deserialize(reseal(body)).serialize() == store.serialize()

    def broken(index, value):
        fields = list(body)
        fields[index] = value
        return reseal(fields)

    spk_bytes, spk_private = body[3][0]
    cases = [
        broken(0, 1),                                               # counter behind the signed key id
        broken(1, 0),                                               # counter out of range
        broken(3, [[spk_bytes, bytes(32)]]),                        # private half does not match
        broken(3, [[spk_bytes, spk_private]] * 3),                  # more than two signed prekeys
        broken(4, [body[4][0], body[4][0]]),                        # duplicate one-time id
        broken(4, [[body[4][0][0], b"short"]]),                     # bad key length
        broken(5, [[body[6][0][0], bytes(64)]]),                    # KEM id used twice
        broken(6, [[99, bytes(64)]]),                               # id beyond the counter
        broken(6, "not a list"),
        reseal(body[:-1]),                                          # missing field
    ]
    for blob in cases:
        with pytest.raises(StateCorrupt):
            PrekeyStore.deserialize(blob)


def test_repr_hides_private_keys():
    store = full_store()
    text = repr(store)
    body = unpack(unpack(store.serialize(), what="t")[1], what="t")
    assert body[3][0][1].hex() not in text
    assert "hidden" in text


def test_pools_are_bounded_oldest_dropped_first(monkeypatch):
    from cipherpost.crypto import prekey_store

    monkeypatch.setattr(prekey_store, "MAX_POOL", 5)
    opks, store = PrekeyStore.empty().new_one_time_prekeys(4)
    more, store = store.new_one_time_prekeys(3)
    assert store.one_time_count == 5
    with pytest.raises(PrekeyNotFound):
        store.one_time_private(opks[0].key_id)
    with pytest.raises(PrekeyNotFound):
        store.one_time_private(opks[1].key_id)
    for k in opks[2:] + more:
        store.one_time_private(k.key_id)
    kems, store = store.new_kem_prekeys(BOB, 5)
    more_kems, store = store.new_kem_prekeys(BOB, 1)
    assert store.kem_one_time_count() == 5
    with pytest.raises(PrekeyNotFound):
        store.kem_private(kems[0].key_id)
    store.kem_private(more_kems[0].key_id)


def test_invalid_counts_are_rejected():
    with pytest.raises(ValueError):
        PrekeyStore.empty().new_one_time_prekeys(-1)
    with pytest.raises(ValueError):
        PrekeyStore.empty().new_kem_prekeys(BOB, 10_001)
