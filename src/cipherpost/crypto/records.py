"""Per-record encryption for the client's local database: AES-256-GCM with a random nonce.

Each row is stored as ``nonce(12) || AES-256-GCM(key, nonce, plaintext, aad)``. The ``aad`` names the
row (``b"session:alice"``, ``b"message:<id>"``) so a ciphertext copied into another row fails to
decrypt. Random 96-bit nonces are safe for up to 2**32 encryptions under one key (NIST SP 800-38D
section 8.3); a local message database stays far below that.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import DecryptionError

RECORD_KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16


class RecordCipher:
    """Encrypts and decrypts database rows under one 32-byte key. ``repr`` never shows the key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != RECORD_KEY_LEN:
            raise ValueError(f"record key must be {RECORD_KEY_LEN} bytes")
        self._aead = AESGCM(key)

    @staticmethod
    def new_key() -> bytes:
        """A fresh random record key (kept inside the key store)."""
        return AESGCM.generate_key(bit_length=256)

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, *, aad: bytes) -> bytes:
        """Raises DecryptionError if the blob is truncated, tampered with, or belongs to another row."""
        if not isinstance(blob, bytes) or len(blob) < NONCE_LEN + TAG_LEN:
            raise DecryptionError("record: ciphertext truncated")
        try:
            return self._aead.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
        except InvalidTag:
            raise DecryptionError("record: authentication failed") from None

    def __repr__(self) -> str:
        return "RecordCipher(key=<hidden>)"
