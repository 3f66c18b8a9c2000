"""Recovery codes and keys (crypto/recovery.py): format, typo detection, derivation, signatures."""

from __future__ import annotations

import base64

import pytest

from cipherpost.crypto.errors import InvalidSignature, RecoveryCodeError
from cipherpost.crypto.recovery import (
    SECRET_LEN,
    RecoveryKey,
    format_code,
    parse_code,
    verify_recovery,
)


class FixedEntropy:
    def __init__(self, value: bytes) -> None:
        self.value = value

    def random_bytes(self, n: int) -> bytes:
        assert n == len(self.value)
        return self.value

    def x25519_private(self):  # type: ignore[no-untyped-def]
        raise AssertionError("not used")

    def mlkem_encapsulate(self, public):  # type: ignore[no-untyped-def]
        raise AssertionError("not used")


SECRET = bytes(range(SECRET_LEN))


def test_code_is_36_base32_characters_in_groups_of_four() -> None:
    code = format_code(SECRET)
    groups = code.split("-")
    assert len(groups) == 9 and all(len(g) == 4 for g in groups)
    assert "".join(groups)[:32] == base64.b32encode(SECRET).decode()
    assert parse_code(code) == SECRET


def test_parse_forgives_case_spaces_and_look_alike_digits() -> None:
    code = format_code(SECRET)
    sloppy = code.lower().replace("-", " ").replace("o", "0").replace("i", "1").replace("b", "8")
    assert parse_code("  " + sloppy + "\n") == SECRET


@pytest.mark.parametrize("position", range(36))
def test_every_single_character_typo_is_caught(position: int) -> None:
    chars = list(format_code(SECRET).replace("-", ""))
    chars[position] = "A" if chars[position] != "A" else "B"
    with pytest.raises(RecoveryCodeError) as info:
        parse_code("".join(chars))
    assert "".join(chars) not in str(info.value)   # a code is never echoed in an error


@pytest.mark.parametrize("text", ["", "ABCD", format_code(SECRET) + "A", "!" * 36, "9" * 36])
def test_malformed_codes_are_refused_with_a_clear_error(text: str) -> None:
    with pytest.raises(RecoveryCodeError):
        parse_code(text)


def test_key_is_derived_deterministically_from_the_code() -> None:
    key, code = RecoveryKey.generate(FixedEntropy(SECRET))  # type: ignore[arg-type]
    assert code == format_code(SECRET)
    assert RecoveryKey.from_code(code).public == key.public
    other, _ = RecoveryKey.generate()
    assert other.public != key.public and len(key.public) == 32


def test_signature_verifies_only_for_its_label_payload_and_key() -> None:
    key = RecoveryKey.from_code(format_code(SECRET))
    sig = key.sign("recover", b"payload")
    verify_recovery(key.public, "recover", b"payload", sig)
    other, _ = RecoveryKey.generate()
    for public, label, payload in ((other.public, "recover", b"payload"), (key.public, "auth", b"payload"),
                                   (key.public, "recover", b"payloaD")):
        with pytest.raises(InvalidSignature):
            verify_recovery(public, label, payload, sig)


def test_repr_hides_key_material() -> None:
    key, code = RecoveryKey.generate()
    assert repr(key) == "RecoveryKey(<hidden>)"
    assert code not in repr(key) and key.public.hex() not in repr(key)
