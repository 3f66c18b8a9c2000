"""Known-answer vectors: recompute every recorded session transcript and compare byte for byte.

Any change of a KDF label, an encoding, a field order or a key schedule changes an output here.
The vectors are produced by tests/vectors/generate.py (format: docs/protocol.md).
"""

import copy
import hmac
import importlib.util
import json
from pathlib import Path

import pytest

from cipherpost.crypto.identity import PublicIdentity
from cipherpost.crypto.pqxdh import InitialMessage
from cipherpost.crypto.session import inspect_envelope

VECTOR_DIR = Path(__file__).resolve().parent.parent / "vectors"


def _load_generator():
    spec = importlib.util.spec_from_file_location("cipherpost_vector_generator", VECTOR_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()
VECTORS = json.loads((VECTOR_DIR / "pqxdh_ratchet.json").read_text())
CASES = {case["name"]: case for case in VECTORS["cases"]}


def test_vector_file_format():
    assert VECTORS["format"] == 1
    assert set(CASES) == {"one-time-prekeys", "last-resort-kem-with-psk"}
    for case in CASES.values():
        assert len(case["outputs"]["envelopes"]) == len(case["inputs"]["messages"]) == 8
        senders = [m["from"] for m in case["inputs"]["messages"]]
        assert senders.count("alice") == senders.count("bob") == 4


@pytest.mark.parametrize("name", sorted(CASES))
def test_recorded_kem_encapsulation_decapsulates(name):
    inputs = CASES[name]["inputs"]
    enc = inputs["kem_encapsulation"]
    ss = GEN.kem_private(inputs).decapsulate(bytes.fromhex(enc["ciphertext"]))
    assert hmac.compare_digest(ss, bytes.fromhex(enc["shared_secret"]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_recompute_matches_byte_for_byte(name):
    case = CASES[name]
    outputs, consumed = GEN.compute(copy.deepcopy(case["inputs"]))
    # Compare field by field so a failure names what changed.
    for key, expected in case["outputs"].items():
        assert outputs[key] == expected, f"{name}: {key} differs from the recorded vector"
    assert set(outputs) == set(case["outputs"])
    # The code draws exactly the recorded keys, no more, no fewer.
    assert consumed == {"alice": 1 + len(case["inputs"]["alice_ratchet_privates"]),
                        "bob": len(case["inputs"]["bob_ratchet_privates"])}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recorded_envelopes_are_consistent(name):
    out = CASES[name]["outputs"]
    initial = InitialMessage.decode(bytes.fromhex(out["initial_message"]))
    assert initial.identity == PublicIdentity.decode(bytes.fromhex(out["alice_identity"]))
    assert out["ad"] == out["alice_identity"] + out["bob_identity"]
    assert len(bytes.fromhex(out["sk"])) == 32
    expected_psk_id = out["psk_id"]
    assert (initial.psk_id.hex() if initial.psk_id else None) == expected_psk_id
    for i, env in enumerate(out["envelopes"]):
        info = inspect_envelope(bytes.fromhex(env))
        assert info.session_id.hex() == out["session_id"]
        # Alice's envelopes carry the initial message until she has decrypted Bob's first reply.
        assert (info.initial is not None) == (i < 2)
        if info.initial is not None:
            assert info.initial.encode().hex() == out["initial_message"]


def test_generator_reproduces_the_file():
    assert GEN.generate() == VECTORS
