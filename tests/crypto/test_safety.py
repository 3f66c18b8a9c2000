"""Safety numbers: Signal's construction, fixed vectors, symmetry, and comparison."""

from __future__ import annotations

import pytest

from cipherpost.crypto.encoding import unpack
from cipherpost.crypto.identity import IdentityKeyPair, PublicIdentity
from cipherpost.crypto.safety import (
    SafetyNumber,
    displayable_digits,
    iterated_fingerprint,
    safety_number,
)

ALICE = IdentityKeyPair.from_private_bytes(b"\x01" * 32, b"\x02" * 32).public
BOB = IdentityKeyPair.from_private_bytes(b"\x03" * 32, b"\x04" * 32).public
MALLORY = IdentityKeyPair.from_private_bytes(b"\x05" * 32, b"\x06" * 32).public

# Recorded from this implementation for the fixed identities above (changes only if the
# construction, the identity encoding or the iteration count changes).
FIXED_DIGITS = "558100359583893836959390305467720372854766894401961419389255"
FIXED_QR = (
    "9301c42073f7023422e9c046298bba0f3402d5515deed32f77fdbc724f24f7a8019b5878c4207fabfa92852d3ac21e2305e3c6"
    "668e22678335647f666aaed1bfd75c13673c26"
)


def test_libsignal_vector() -> None:
    """libsignal's fingerprint_test_v1 (rust/protocol/src/fingerprint.rs): same construction, same digits."""
    alice_key = bytes.fromhex("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868")
    bob_key = bytes.fromhex("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b")
    fa = iterated_fingerprint(alice_key, b"+14152222222")
    fb = iterated_fingerprint(bob_key, b"+14153333333")
    assert "".join(sorted([displayable_digits(fa), displayable_digits(fb)])) == (
        "300354477692869396892869876765458257569162576843440918079131"
    )
    assert fa[:32].hex() == "1e301a0353dce3dbe7684cb8336e85136cdc0ee96219494ada305d62a7bd61df"
    assert fb[:32].hex() == "d62cbf73a11592015b6b9f1682ac306fea3aaf3885b84d12bca631e9d4fb3a4d"


def test_fixed_vector() -> None:
    number = safety_number("alice", ALICE, "bob", BOB)
    assert number.digits == FIXED_DIGITS
    assert number.qr_payload().hex() == FIXED_QR


def test_symmetric() -> None:
    ab = safety_number("alice", ALICE, "bob", BOB)
    ba = safety_number("bob", BOB, "alice", ALICE)
    assert ab == ba
    assert ba.matches_qr(ab.qr_payload()) and ab.matches_digits(str(ba))


def test_structure() -> None:
    number = safety_number("alice", ALICE, "bob", BOB)
    assert len(number.digits) == 60 and number.digits.isdigit()
    groups = number.groups()
    assert len(groups) == 12 and all(len(g) == 5 for g in groups)
    assert "".join(groups) == number.digits and str(number) == " ".join(groups)
    version, low, high = unpack(number.qr_payload(), what="qr")
    assert version == 1 and len(low) == len(high) == 32 and low < high


@pytest.mark.parametrize(
    "other",
    [("alice", MALLORY, "bob", BOB), ("alice", ALICE, "bob", MALLORY), ("alicia", ALICE, "bob", BOB),
     ("alice", ALICE, "bobby", BOB)],
)
def test_changes_with_either_identity_or_name(other: tuple[str, PublicIdentity, str, PublicIdentity]) -> None:
    base = safety_number("alice", ALICE, "bob", BOB)
    changed = safety_number(*other)
    assert changed.digits != base.digits
    assert not base.matches_digits(changed.digits)
    assert not base.matches_qr(changed.qr_payload())


def test_mitm_substitution_is_visible() -> None:
    # The relay gave Alice Mallory's key for "bob": Alice's screen and Bob's screen differ.
    alice_view = safety_number("alice", ALICE, "bob", MALLORY)
    bob_view = safety_number("bob", BOB, "alice", ALICE)
    assert not alice_view.matches_digits(bob_view.digits)
    assert not bob_view.matches_qr(alice_view.qr_payload())


def test_matches_digits_accepts_formatting_only() -> None:
    number = safety_number("alice", ALICE, "bob", BOB)
    assert number.matches_digits(number.digits)
    assert number.matches_digits(str(number))
    assert number.matches_digits("-".join(number.groups()))
    assert number.matches_digits("\n".join(" ".join(number.groups()[i : i + 4]) for i in (0, 4, 8)))
    off_by_one = number.digits[:-1] + str((int(number.digits[-1]) + 1) % 10)
    bad = [off_by_one, number.digits[:-1], number.digits + "0", "", "x" * 60,
           number.digits.replace("5", "\u0665"),  # Arabic-Indic five: not ASCII
           number.digits[:30]]
    for text in bad:
        assert not number.matches_digits(text)
    assert not number.matches_digits(None)  # type: ignore[arg-type]


def test_matches_qr_rejects_garbage() -> None:
    number = safety_number("alice", ALICE, "bob", BOB)
    assert number.matches_qr(number.qr_payload())
    assert number.matches_qr(bytearray(number.qr_payload()))
    for payload in (b"", number.qr_payload()[:-1], number.qr_payload() + b"\x00", FIXED_DIGITS.encode()):
        assert not number.matches_qr(payload)
    assert not number.matches_qr("text")  # type: ignore[arg-type]


def test_dataclass_is_frozen() -> None:
    number = safety_number("alice", ALICE, "bob", BOB)
    with pytest.raises(AttributeError):
        number.digits = "0" * 60  # type: ignore[misc]
    assert isinstance(number, SafetyNumber)
