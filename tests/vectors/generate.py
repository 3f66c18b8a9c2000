"""Known-answer vectors for PQXDH + Double Ratchet sessions: ``tests/vectors/pqxdh_ratchet.json``.

Run ``python tests/vectors/generate.py`` to (re)write the file. Every private key is derived from a
fixed seed; the only randomness pyca cannot take from us, the ML-KEM-768 encapsulation, is recorded
once (a fresh ``encapsulate()`` when the file does not exist yet, else the recorded pair is reused,
``--fresh`` forces a new one). ``tests/crypto/test_vectors.py`` imports :func:`compute` from here,
replays the recorded inputs and compares every output byte for byte. The format is described in
docs/protocol.md ("Known-answer vectors").
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from cipherpost.crypto import pqxdh, sender_keys
from cipherpost.crypto import session as sessions
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.prekey_store import PrekeyStore
from cipherpost.crypto.prekeys import PrekeyBundle

VECTOR_FILE = Path(__file__).with_name("pqxdh_ratchet.json")
SENDER_KEYS_FILE = Path(__file__).with_name("sender_keys.json")
FORMAT = 1
SEED = b"cipherpost/v1 known-answer vectors"
CREATED_AT = 1_700_000_000
# Who sends each message of the recorded conversation: consecutive messages and every direction change.
CONVERSATION = ["alice", "alice", "bob", "bob", "alice", "bob", "alice", "bob"]


class ScriptedEntropy:
    """Hands out recorded values in order; fails loudly if the code draws more or other values."""

    def __init__(self, x25519: list[bytes], encapsulations: list[tuple[bytes, bytes]] | None = None,
                 random: list[bytes] | None = None, ed25519: list[bytes] | None = None) -> None:
        self.x25519 = list(x25519)
        self.encapsulations = list(encapsulations or [])
        self.random = list(random or [])
        self.ed25519 = list(ed25519 or [])

    def x25519_private(self) -> X25519PrivateKey:
        if not self.x25519:
            raise AssertionError("scripted entropy: no X25519 key left")
        return X25519PrivateKey.from_private_bytes(self.x25519.pop(0))

    def ed25519_private(self) -> Ed25519PrivateKey:
        if not self.ed25519:
            raise AssertionError("scripted entropy: no Ed25519 key left")
        return Ed25519PrivateKey.from_private_bytes(self.ed25519.pop(0))

    def mlkem_encapsulate(self, public: MLKEM768PublicKey) -> tuple[bytes, bytes]:
        if not self.encapsulations:
            raise AssertionError("scripted entropy: no ML-KEM encapsulation left")
        return self.encapsulations.pop(0)

    def random_bytes(self, n: int) -> bytes:
        if not self.random or len(self.random[0]) != n:
            raise AssertionError(f"scripted entropy: no {n}-byte value left")
        return self.random.pop(0)

    def exhausted(self) -> bool:
        return not (self.x25519 or self.encapsulations or self.random or self.ed25519)


def derive(label: str, n: int = 32) -> bytes:
    """Fixed key material: SHA-256(SEED || label || counter) blocks."""
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(SEED + b"/" + label.encode() + bytes([counter])).digest()
        counter += 1
    return out[:n]


def base_inputs(name: str, *, one_time_prekey: bool, last_resort_kem: bool, psk: bool) -> dict[str, Any]:
    h = lambda label, n=32: derive(f"{name}/{label}", n).hex()  # noqa: E731
    return {
        "alice_identity": {"ed25519": h("alice-ed25519"), "x25519": h("alice-x25519")},
        "bob_identity": {"ed25519": h("bob-ed25519"), "x25519": h("bob-x25519")},
        "bob_signed_prekey_private": h("bob-spk"),
        "signed_prekey_created_at": CREATED_AT,
        "bob_one_time_prekey_private": h("bob-opk") if one_time_prekey else None,
        "bob_kem_prekey_seed": h("bob-kem-seed", 64),
        "kem_prekey_last_resort": last_resort_kem,
        "psk": h("psk") if psk else None,
        "alice_ephemeral_private": h("alice-ephemeral"),
        # Generously many; generate() trims both lists to what the conversation consumed.
        "alice_ratchet_privates": [h(f"alice-ratchet-{i}") for i in range(8)],
        "bob_ratchet_privates": [h(f"bob-ratchet-{i}") for i in range(8)],
        "messages": [{"from": who, "plaintext": f"{name} message {i} from {who}".encode().hex()}
                     for i, who in enumerate(CONVERSATION)],
        "kem_encapsulation": None,
    }


def kem_private(inputs: dict[str, Any]) -> MLKEM768PrivateKey:
    return MLKEM768PrivateKey.from_seed_bytes(bytes.fromhex(inputs["bob_kem_prekey_seed"]))


def compute(inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """Replay a case; returns (outputs, how many ratchet keys each side consumed)."""
    b = bytes.fromhex
    alice = IdentityKeyPair.from_private_bytes(b(inputs["alice_identity"]["ed25519"]),
                                               b(inputs["alice_identity"]["x25519"]))
    bob = IdentityKeyPair.from_private_bytes(b(inputs["bob_identity"]["ed25519"]),
                                             b(inputs["bob_identity"]["x25519"]))
    psk = None if inputs["psk"] is None else b(inputs["psk"])
    enc = inputs["kem_encapsulation"]
    encapsulation = (b(enc["shared_secret"]), b(enc["ciphertext"]))

    # Bob's prekeys, made through the store's own API with scripted key material.
    opk_private = inputs["bob_one_time_prekey_private"]
    bob_setup = ScriptedEntropy(
        [b(inputs["bob_signed_prekey_private"])] + ([] if opk_private is None else [b(opk_private)]),
        random=[b(inputs["bob_kem_prekey_seed"])])
    store = PrekeyStore.empty()
    spk, store = store.rotate_signed_prekey(bob, inputs["signed_prekey_created_at"], entropy=bob_setup)
    opk = None
    if opk_private is not None:
        opks, store = store.new_one_time_prekeys(1, entropy=bob_setup)
        opk = opks[0]
    if inputs["kem_prekey_last_resort"]:
        kem, store = store.new_last_resort_kem_prekey(bob, entropy=bob_setup)
    else:
        kems, store = store.new_kem_prekeys(bob, 1, entropy=bob_setup)
        kem = kems[0]
    assert bob_setup.exhausted()
    bundle = PrekeyBundle(bob.public, spk, kem, opk)

    # PQXDH alone, to record SK and AD, and Bob's side must agree.
    sk, ad, initial = pqxdh.initiate(alice, bundle, psk=psk, entropy=ScriptedEntropy(
        [b(inputs["alice_ephemeral_private"])], [encapsulation]))
    sk_b, ad_b, _ = pqxdh.respond(bob, store, initial, psk=psk)
    assert (sk_b, ad_b) == (sk, ad)

    # The same handshake through the session API, then the conversation.
    alice_entropy = ScriptedEntropy(
        [b(inputs["alice_ephemeral_private"])] + [b(k) for k in inputs["alice_ratchet_privates"]],
        [encapsulation])
    bob_entropy = ScriptedEntropy([b(k) for k in inputs["bob_ratchet_privates"]])
    alice_session = sessions.initiate_session(alice, bundle, psk=psk, entropy=alice_entropy)
    bob_session: sessions.Session | None = None
    envelopes: list[str] = []
    for message in inputs["messages"]:
        plaintext = b(message["plaintext"])
        if message["from"] == "alice":
            envelope, alice_session = sessions.encrypt(alice_session, plaintext, entropy=alice_entropy)
            if bob_session is None:
                got, bob_session, store = sessions.accept_session(bob, store, envelope, psk=psk,
                                                                  entropy=bob_entropy)
            else:
                got, bob_session = sessions.decrypt(bob_session, envelope, entropy=bob_entropy)
        else:
            assert bob_session is not None, "Bob cannot send first"
            envelope, bob_session = sessions.encrypt(bob_session, plaintext, entropy=bob_entropy)
            got, alice_session = sessions.decrypt(alice_session, envelope, entropy=alice_entropy)
        assert got == plaintext
        envelopes.append(envelope.hex())

    assert bob_session is not None
    outputs = {
        "alice_identity": alice.public.encode().hex(),
        "bob_identity": bob.public.encode().hex(),
        "signed_prekey": spk.encode().hex(),
        "one_time_prekey": None if opk is None else opk.encode().hex(),
        "kem_prekey": kem.encode().hex(),
        "psk_id": None if psk is None else pqxdh.psk_id(psk).hex(),
        "sk": sk.hex(),
        "ad": ad.hex(),
        "initial_message": initial.encode().hex(),
        "session_id": alice_session.session_id.hex(),
        "envelopes": envelopes,
    }
    assert bob_session.session_id == alice_session.session_id
    consumed = {
        "alice": 1 + len(inputs["alice_ratchet_privates"]) - len(alice_entropy.x25519),
        "bob": len(inputs["bob_ratchet_privates"]) - len(bob_entropy.x25519),
    }
    return outputs, consumed


CASES = [
    ("one-time-prekeys", {"one_time_prekey": True, "last_resort_kem": False, "psk": False}),
    ("last-resort-kem-with-psk", {"one_time_prekey": False, "last_resort_kem": True, "psk": True}),
]


def generate(*, fresh: bool = False) -> dict[str, Any]:
    recorded: dict[str, Any] = {}
    if VECTOR_FILE.exists() and not fresh:
        recorded = {c["name"]: c["inputs"]["kem_encapsulation"]
                    for c in json.loads(VECTOR_FILE.read_text())["cases"]}
    cases = []
    for name, options in CASES:
        inputs = base_inputs(name, **options)
        encapsulation = recorded.get(name)
        if encapsulation is None:
            ss, ct = kem_private(inputs).public_key().encapsulate()
            encapsulation = {"shared_secret": ss.hex(), "ciphertext": ct.hex()}
        inputs["kem_encapsulation"] = encapsulation
        _, consumed = compute(inputs)
        inputs["alice_ratchet_privates"] = inputs["alice_ratchet_privates"][: consumed["alice"] - 1]
        inputs["bob_ratchet_privates"] = inputs["bob_ratchet_privates"][: consumed["bob"]]
        outputs, _ = compute(inputs)
        cases.append({"name": name, "inputs": inputs, "outputs": outputs})
    return {
        "format": FORMAT,
        "description": "cipherpost/v1 PQXDH (X25519, ML-KEM-768, HKDF-SHA-256) + Double Ratchet "
                       "(AES-256-GCM) session transcripts; all byte strings hex; see docs/protocol.md",
        "cases": cases,
    }


# --- group sender keys (tests/vectors/sender_keys.json) -------------------------------------------

# Which chain each message is sent on (0: the first, 1: after the sender rotated) and the order in
# which the member receives them: in order, out of order within a chain, and a message of the old
# chain arriving after the rotation (in flight, kept by the record's earlier states).
SENDER_KEY_CASES = [
    ("in-order", {"chains": [0, 0, 0, 0], "delivery": [0, 1, 2, 3]}),
    ("out-of-order-and-rotation", {"chains": [0, 0, 0, 1, 1], "delivery": [1, 3, 0, 4, 2]}),
]


def sender_key_inputs(name: str, chains: list[int], delivery: list[int]) -> dict[str, Any]:
    h = lambda label, n=32: derive(f"sender-keys/{name}/{label}", n).hex()  # noqa: E731
    rotations = max(chains) + 1
    return {
        "distribution_id": h("distribution-id", 16),
        "ad": h("group-id-and-sender", 40),
        "signing_privates": [h(f"signing-{i}") for i in range(rotations)],
        "chain_keys": [h(f"chain-key-{i}") for i in range(rotations)],
        "chain_id_bytes": [h(f"chain-id-{i}", 4) for i in range(rotations)],
        "messages": [{"chain": c, "plaintext": f"{name} group message {i}".encode().hex()}
                     for i, c in enumerate(chains)],
        "delivery": delivery,
    }


def compute_sender_keys(inputs: dict[str, Any]) -> dict[str, Any]:
    """Replay one sender-key case: the sender's distributions and messages, then one member
    receiving them in the recorded order; returns every output as hex."""
    b = bytes.fromhex
    ad = b(inputs["ad"])
    rotations = len(inputs["signing_privates"])
    entropy = ScriptedEntropy([], ed25519=[b(k) for k in inputs["signing_privates"]],
                              random=[v for i in range(rotations)
                                      for v in (b(inputs["chain_keys"][i]), b(inputs["chain_id_bytes"][i]))])
    sender = sender_keys.create_sender_key(b(inputs["distribution_id"]), entropy=entropy)
    distributions = [sender_keys.distribution_message(sender)]
    messages: list[bytes] = []
    for message in inputs["messages"]:
        while message["chain"] >= len(distributions):
            sender = sender_keys.rotate_sender_key(sender, entropy=entropy)
            distributions.append(sender_keys.distribution_message(sender))
        out, sender = sender_keys.group_encrypt(sender, b(message["plaintext"]), ad)
        messages.append(out)
    assert entropy.exhausted()

    member: sender_keys.SenderKeyRecord | None = None
    for d in distributions:   # the member processes every distribution before any message
        member = sender_keys.process_distribution(member, d)
    assert member is not None
    for i in inputs["delivery"]:
        plaintext, member = sender_keys.group_decrypt(member, messages[i], ad)
        assert plaintext == b(inputs["messages"][i]["plaintext"])
    return {
        "distributions": [d.encode().hex() for d in distributions],
        "messages": [m.hex() for m in messages],
        "sender_record": sender.serialize().hex(),
        "member_record": member.serialize().hex(),
    }


def generate_sender_keys() -> dict[str, Any]:
    cases = []
    for name, options in SENDER_KEY_CASES:
        inputs = sender_key_inputs(name, **options)
        cases.append({"name": name, "inputs": inputs, "outputs": compute_sender_keys(inputs)})
    return {
        "format": FORMAT,
        "description": "cipherpost/v1 group sender keys (Signal Sender Keys: HMAC-SHA256 chain, "
                       "AES-256-GCM-SIV, Ed25519); all byte strings hex; see docs/protocol.md",
        "cases": cases,
    }


def main() -> None:
    data = generate(fresh="--fresh" in sys.argv[1:])
    VECTOR_FILE.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {VECTOR_FILE} ({len(data['cases'])} cases)")
    groups = generate_sender_keys()
    SENDER_KEYS_FILE.write_text(json.dumps(groups, indent=2) + "\n")
    print(f"wrote {SENDER_KEYS_FILE} ({len(groups['cases'])} cases)")


if __name__ == "__main__":
    main()
