"""SPAKE2 contact verification: honest runs, wrong passwords, substituted keys, malformed input."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as pyca_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_Symmetric

from cipherpost.crypto.encoding import context, pack
from cipherpost.crypto.errors import VerificationFailed
from cipherpost.crypto.identity import IdentityKeyPair, PublicIdentity
from cipherpost.crypto.pake import PakeVerifier

ALICE = IdentityKeyPair.from_private_bytes(b"\x01" * 32, b"\x02" * 32).public
BOB = IdentityKeyPair.from_private_bytes(b"\x03" * 32, b"\x04" * 32).public
MALLORY = IdentityKeyPair.from_private_bytes(b"\x05" * 32, b"\x06" * 32).public


def run(alice: PakeVerifier, bob: PakeVerifier) -> tuple[bytes | Exception, bytes | Exception]:
    """Carry messages between the two sides; return each side's PSK or its exception."""
    msg_a, msg_b = alice.start(), bob.start()
    mac_a, mac_b = alice.finish(msg_b), bob.finish(msg_a)
    results: list[bytes | Exception] = []
    for side, mac in ((alice, mac_b), (bob, mac_a)):
        try:
            results.append(side.confirm(mac))
        except VerificationFailed as exc:
            results.append(exc)
    return results[0], results[1]


def pair(pw_a: str = "purple-otter-42", pw_b: str = "purple-otter-42", *,
         alice_sees_bob: PublicIdentity = BOB, bob_sees_alice: PublicIdentity = ALICE,
         alice_name_for_bob: str = "bob",
         bob_name_for_alice: str = "alice") -> tuple[PakeVerifier, PakeVerifier]:
    return (PakeVerifier(pw_a, "alice", ALICE, alice_name_for_bob, alice_sees_bob),
            PakeVerifier(pw_b, "bob", BOB, bob_name_for_alice, bob_sees_alice))


def test_honest_run_agrees_on_psk() -> None:
    psk_a, psk_b = run(*pair())
    assert isinstance(psk_a, bytes) and len(psk_a) == 32
    assert psk_a == psk_b


def test_fresh_psk_every_run() -> None:
    first, _ = run(*pair())
    second, _ = run(*pair())
    assert first != second


def test_nfc_normalised_password() -> None:
    psk_a, psk_b = run(*pair("Zo\u00eb", "Zoe\u0308"))
    assert isinstance(psk_a, bytes) and psk_a == psk_b


def assert_both_fail_alike(results: tuple[bytes | Exception, bytes | Exception], reference: str) -> None:
    for result in results:
        assert isinstance(result, VerificationFailed)
        assert str(result) == reference


def wrong_password_message() -> str:
    result, _ = run(*pair("purple-otter-42", "purple-otter-43"))
    assert isinstance(result, VerificationFailed)
    return str(result)


def test_wrong_password_both_fail() -> None:
    assert_both_fail_alike(run(*pair("purple-otter-42", "purple-otter-43")), wrong_password_message())


def test_substituted_peer_key_both_fail_like_wrong_password() -> None:
    # The relay told Alice that "bob" has Mallory's key; the password is right.
    assert_both_fail_alike(run(*pair(alice_sees_bob=MALLORY)), wrong_password_message())


def test_substituted_key_at_the_other_side_both_fail() -> None:
    assert_both_fail_alike(run(*pair(bob_sees_alice=MALLORY)), wrong_password_message())


def test_different_names_fail() -> None:
    assert_both_fail_alike(run(*pair(alice_name_for_bob="robert")), wrong_password_message())


def test_relay_in_the_middle_with_wrong_guess_fails() -> None:
    """Mallory runs SPAKE2 separately with each side, guessing the password: each side fails."""
    alice = PakeVerifier("purple-otter-42", "alice", ALICE, "bob", MALLORY)
    mallory_as_bob = PakeVerifier("guess", "bob", MALLORY, "alice", ALICE)
    result, _ = run(alice, mallory_as_bob)
    assert isinstance(result, VerificationFailed)


def test_reflected_confirmation_fails() -> None:
    alice, bob = pair()
    msg_a, msg_b = alice.start(), bob.start()
    mac_a = alice.finish(msg_b)
    assert mac_a != bob.finish(msg_a)
    with pytest.raises(VerificationFailed):
        alice.confirm(mac_a)  # Alice's own MAC echoed back to her


def test_reflected_spake2_message_fails() -> None:
    alice, _ = pair()
    own = alice.start()
    with pytest.raises(VerificationFailed):
        alice.finish(own)


def valid_point_message() -> bytes:
    return PakeVerifier("x", "p", ALICE, "q", BOB).start()


@pytest.mark.parametrize(
    "message",
    [b"", b"S", b"S" + bytes(31), b"S" + bytes(33), b"A" + valid_point_message()[1:],
     b"B" + valid_point_message()[1:], b"S" + b"\xff" * 32, b"S" + bytes(32),
     b"S" + bytes([1]) + bytes(31), "S" * 33],
)
def test_malformed_peer_message(message: bytes) -> None:
    alice, _ = pair()
    alice.start()
    with pytest.raises(VerificationFailed):
        alice.finish(message)
    with pytest.raises(VerificationFailed):
        alice.confirm(b"\x00" * 32)  # the run is dead


@pytest.mark.parametrize("confirmation", [b"", b"\x00" * 32, b"\x00" * 31, None])
def test_bad_confirmation(confirmation: bytes) -> None:
    alice, bob = pair()
    msg_a, msg_b = alice.start(), bob.start()
    alice.finish(msg_b)
    mac_b = bob.finish(msg_a)
    with pytest.raises(VerificationFailed):
        alice.confirm(confirmation)
    with pytest.raises(VerificationFailed):
        alice.confirm(mac_b)  # no second chance after a failure


def test_tampered_spake2_message_fails_confirmation() -> None:
    alice, bob = pair()
    msg_a, _ = alice.start(), bob.start()
    other = PakeVerifier("purple-otter-42", "bob", BOB, "alice", ALICE).start()
    mac_a = alice.finish(other)  # the relay swapped Bob's message for another run's
    mac_b = bob.finish(msg_a)
    with pytest.raises(VerificationFailed):
        alice.confirm(mac_b)
    with pytest.raises(VerificationFailed):
        bob.confirm(mac_a)


def test_construction_matches_documentation() -> None:
    """An independent SPAKE2 peer computes the MACs and PSK from the documented formulas."""
    names = sorted(["alice", "bob"])
    raw_bob = SPAKE2_Symmetric(b"purple-otter-42", idSymmetric=context("pake") + pack(names))
    alice = PakeVerifier("purple-otter-42", "alice", ALICE, "bob", BOB)
    msg_a, msg_b = alice.start(), raw_bob.start()
    mac_a = alice.finish(msg_b)
    key = raw_bob.finish(msg_a)
    transcript = pack([sorted([["alice", ALICE.encode()], ["bob", BOB.encode()]]), *sorted([msg_a, msg_b])])
    kc = HKDF(hashes.SHA256(), 32, None, context("pake-confirm")).derive(key)

    def mac(name: str) -> bytes:
        h = pyca_hmac.HMAC(kc, hashes.SHA256())
        h.update(b"confirm" + pack(name) + transcript)
        return h.finalize()

    assert mac_a == mac("alice")
    psk = alice.confirm(mac("bob"))
    assert psk == HKDF(hashes.SHA256(), 32, None, context("pake-psk") + transcript).derive(key)


def test_call_order_enforced() -> None:
    alice, bob = pair()
    with pytest.raises(RuntimeError):
        alice.finish(bob.start())
    with pytest.raises(RuntimeError):
        alice.confirm(b"\x00" * 32)
    alice.start()
    with pytest.raises(RuntimeError):
        alice.start()


def test_arguments_checked() -> None:
    with pytest.raises(ValueError):
        PakeVerifier("", "alice", ALICE, "bob", BOB)
    with pytest.raises(ValueError):
        PakeVerifier("pw", "alice", ALICE, "alice", BOB)


def test_repr_hides_secrets() -> None:
    alice, bob = pair("hunter2-secret", "hunter2-secret")
    msg_a, msg_b = alice.start(), bob.start()
    mac_a, mac_b = alice.finish(msg_b), bob.finish(msg_a)
    texts = [repr(alice), str(alice)]
    psk = alice.confirm(mac_b)
    texts += [repr(alice), repr(bob)]
    for text in texts:
        assert "hunter2" not in text
        for secret in (psk, mac_a, mac_b):
            assert secret.hex() not in text and repr(secret) not in text
    assert "alice" in repr(alice) and "hidden" in repr(alice)
