"""Local database row encryption: AES-256-GCM, aad names the row."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cipherpost.crypto.errors import DecryptionError
from cipherpost.crypto.records import RecordCipher

KEY = bytes(range(32))


def test_round_trip_and_layout() -> None:
    cipher = RecordCipher(KEY)
    blob = cipher.encrypt(b"ratchet state", aad=b"session:alice")
    assert cipher.decrypt(blob, aad=b"session:alice") == b"ratchet state"
    assert len(blob) == 12 + len(b"ratchet state") + 16
    # Layout as documented: nonce || AES-256-GCM ciphertext.
    assert AESGCM(KEY).decrypt(blob[:12], blob[12:], b"session:alice") == b"ratchet state"
    assert cipher.decrypt(cipher.encrypt(b"", aad=b"x"), aad=b"x") == b""


def test_nonce_is_fresh() -> None:
    cipher = RecordCipher(KEY)
    blobs = {cipher.encrypt(b"same", aad=b"r") for _ in range(50)}
    assert len(blobs) == 50
    assert len({b[:12] for b in blobs}) == 50


def test_rows_cannot_be_swapped() -> None:
    cipher = RecordCipher(KEY)
    blob = cipher.encrypt(b"alice's state", aad=b"session:alice")
    with pytest.raises(DecryptionError):
        cipher.decrypt(blob, aad=b"session:bob")


def test_wrong_key() -> None:
    blob = RecordCipher(KEY).encrypt(b"m", aad=b"r")
    with pytest.raises(DecryptionError):
        RecordCipher(RecordCipher.new_key()).decrypt(blob, aad=b"r")


def test_every_byte_is_authenticated() -> None:
    cipher = RecordCipher(KEY)
    blob = cipher.encrypt(b"payload", aad=b"r")
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0x80
        with pytest.raises(DecryptionError):
            cipher.decrypt(bytes(bad), aad=b"r")
    for cut in range(len(blob)):
        with pytest.raises(DecryptionError):
            cipher.decrypt(blob[:cut], aad=b"r")


def test_key_checks_and_repr() -> None:
    key = RecordCipher.new_key()
    assert len(key) == 32 and key != RecordCipher.new_key()
    cipher = RecordCipher(key)
    assert key.hex() not in repr(cipher) and str(key) not in repr(cipher)
    assert "hidden" in repr(cipher)
    for bad in (b"", bytes(16), bytes(33)):
        with pytest.raises(ValueError):
            RecordCipher(bad)
