"""The group record (client/group_store.py): round trip, and no key in its repr."""

from __future__ import annotations

import os

from cipherpost.client.group_state import sign_change
from cipherpost.client.group_store import GroupRecord
from cipherpost.crypto.identity import IdentityKeyPair


def _record() -> tuple[GroupRecord, bytes]:
    alice, bob = IdentityKeyPair.generate(), IdentityKeyPair.generate()
    members = [["alice", alice.public.encode()], ["bob", bob.public.encode()]]
    change = sign_change(alice, "alice", None, os.urandom(32), "create", ["team", members, ["alice"]])
    chain_key = os.urandom(32)
    rec = GroupRecord([change], rotate=True, distributed={"bob": 3}, snapshots={3: chain_key},
                      pending=[["bob", os.urandom(16), b"ciphertext", 5]], limits={"ask:bob": [1]})
    return rec, chain_key


def test_record_round_trips() -> None:
    rec, _ = _record()
    back = GroupRecord.decode(rec.encode())
    assert back.encode() == rec.encode()
    assert back.current.hash() == rec.current.hash() and back.snapshots == rec.snapshots


def test_repr_hides_chain_keys_and_ciphertexts() -> None:
    rec, chain_key = _record()
    text = repr(rec)
    assert chain_key.hex() not in text and repr(chain_key) not in text and "ciphertext" not in text
    assert "keys=<hidden>" in text
