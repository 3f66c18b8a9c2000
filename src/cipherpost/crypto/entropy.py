"""Injectable randomness, so every operation that draws random values can be replayed exactly.

Production code uses :data:`SYSTEM_ENTROPY` (the operating system's CSPRNG through pyca's own
``generate()`` / ``encapsulate()``). The known-answer vectors in ``tests/vectors/`` pass a scripted
implementation instead, which hands out recorded keys and a recorded ML-KEM encapsulation, so the
whole PQXDH + Double Ratchet transcript is reproducible byte for byte.
"""

from __future__ import annotations

import os
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey


class Entropy(Protocol):
    """Where fresh key material comes from."""

    def x25519_private(self) -> X25519PrivateKey:
        """A fresh X25519 private key (ephemeral, ratchet or prekey)."""
        ...

    def ed25519_private(self) -> Ed25519PrivateKey:
        """A fresh Ed25519 signing key (a group sender key's signing key)."""
        ...

    def mlkem_encapsulate(self, public: MLKEM768PublicKey) -> tuple[bytes, bytes]:
        """ML-KEM-768 encapsulation to ``public``: ``(shared_secret, ciphertext)``."""
        ...

    def random_bytes(self, n: int) -> bytes:
        """``n`` uniformly random bytes (ML-KEM key seeds, identifiers)."""
        ...


class SystemEntropy:
    """The operating system's randomness, through pyca/cryptography."""

    __slots__ = ()

    def x25519_private(self) -> X25519PrivateKey:
        return X25519PrivateKey.generate()

    def ed25519_private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.generate()

    def mlkem_encapsulate(self, public: MLKEM768PublicKey) -> tuple[bytes, bytes]:
        shared_secret, ciphertext = public.encapsulate()
        return shared_secret, ciphertext

    def random_bytes(self, n: int) -> bytes:
        return os.urandom(n)

    def __repr__(self) -> str:
        return "SystemEntropy()"


SYSTEM_ENTROPY: Entropy = SystemEntropy()
