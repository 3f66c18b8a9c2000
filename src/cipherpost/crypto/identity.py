"""Long-term identities: an Ed25519 signing key plus an X25519 key bound to it by a signature.

Signal's PQXDH uses one X25519 identity key with XEdDSA signatures; pyca/cryptography has no
XEdDSA, so (as DESIGN.md fixes) an identity is two keys: Ed25519 signs, X25519 does the DH1/DH2
exchanges of PQXDH (spec section 3.3), and the Ed25519 key signs the X25519 public key so the pair
cannot be split. The public identity encodes as::

    [1, ed25519_pub(32), x25519_pub(32), sig(64)]   sig = Ed25519(context("identity-binding") || x25519_pub)

Its fingerprint is SHA-256 of that encoding.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature as _PycaInvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from .encoding import context, expect_array, expect_bytes, pack, unpack
from .errors import EncodingError, InvalidSignature

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()

IDENTITY_VERSION = 1


def signing_input(label: str, payload: bytes) -> bytes:
    """What is actually signed for ``label``: the domain-separation context, then the payload."""
    return context(label) + payload


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """The public half of an identity, as published and pinned by contacts."""

    sign_pub: bytes
    dh_pub: bytes
    binding_sig: bytes

    def encode(self) -> bytes:
        return pack([IDENTITY_VERSION, self.sign_pub, self.dh_pub, self.binding_sig])

    @classmethod
    def decode(cls, data: bytes) -> PublicIdentity:
        """Decode and check the binding signature; raises EncodingError or InvalidSignature."""
        arr = expect_array(unpack(data, what="identity", max_size=512), what="identity",
                           version=IDENTITY_VERSION, length=4)
        ident = cls(
            sign_pub=expect_bytes(arr[1], what="identity.sign_pub", length=32),
            dh_pub=expect_bytes(arr[2], what="identity.dh_pub", length=32),
            binding_sig=expect_bytes(arr[3], what="identity.binding_sig", length=64),
        )
        ident.verify("identity-binding", ident.dh_pub, ident.binding_sig)
        return ident

    def verify(self, label: str, payload: bytes, signature: bytes) -> None:
        """Check an Ed25519 signature made with :meth:`IdentityKeyPair.sign` under ``label``."""
        if not isinstance(signature, bytes) or len(signature) != 64:
            raise InvalidSignature(f"{label}: malformed signature")
        try:
            key = ed25519.Ed25519PublicKey.from_public_bytes(self.sign_pub)
            key.verify(signature, signing_input(label, payload))
        except _PycaInvalidSignature:
            raise InvalidSignature(f"{label}: signature does not verify") from None
        except ValueError:
            raise EncodingError("identity: invalid Ed25519 public key") from None

    def fingerprint(self) -> bytes:
        """SHA-256 of the encoded public identity (32 bytes)."""
        return hashlib.sha256(self.encode()).digest()

    def fingerprint_text(self) -> str:
        """Human form: ``SHA256:`` + unpadded base32 of the fingerprint, grouped for reading."""
        b32 = base64.b32encode(self.fingerprint()).decode("ascii").rstrip("=").lower()
        return "SHA256:" + "-".join(b32[i : i + 4] for i in range(0, len(b32), 4))

    def short_id(self) -> str:
        """First 8 hex characters of the fingerprint, for logs and --explain (not for trust)."""
        return self.fingerprint()[:4].hex()


class IdentityKeyPair:
    """A private identity. ``repr`` never shows key material."""

    __slots__ = ("_dh", "_sign", "public")

    def __init__(self, sign_key: ed25519.Ed25519PrivateKey, dh_key: x25519.X25519PrivateKey):
        self._sign = sign_key
        self._dh = dh_key
        sign_pub = sign_key.public_key().public_bytes(_RAW, _RAW_PUB)
        dh_pub = dh_key.public_key().public_bytes(_RAW, _RAW_PUB)
        sig = sign_key.sign(signing_input("identity-binding", dh_pub))
        self.public = PublicIdentity(sign_pub, dh_pub, sig)

    @classmethod
    def generate(cls) -> IdentityKeyPair:
        return cls(ed25519.Ed25519PrivateKey.generate(), x25519.X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, sign_priv: bytes, dh_priv: bytes) -> IdentityKeyPair:
        """Rebuild from the two raw 32-byte private keys (key store, test vectors)."""
        try:
            return cls(
                ed25519.Ed25519PrivateKey.from_private_bytes(sign_priv),
                x25519.X25519PrivateKey.from_private_bytes(dh_priv),
            )
        except ValueError:
            raise EncodingError("identity: invalid private key bytes") from None

    def private_bytes(self) -> tuple[bytes, bytes]:
        """The raw private keys ``(ed25519, x25519)``; only for the encrypted key store."""
        return (
            self._sign.private_bytes(_RAW, _RAW_PRIV, _NOENC),
            self._dh.private_bytes(_RAW, _RAW_PRIV, _NOENC),
        )

    def sign(self, label: str, payload: bytes) -> bytes:
        """Ed25519 signature over ``context(label) || payload``."""
        return self._sign.sign(signing_input(label, payload))

    def dh(self, peer_public: bytes) -> bytes:
        """X25519 with the identity DH key (PQXDH DH1/DH2)."""
        try:
            return self._dh.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            raise EncodingError("invalid X25519 public key") from None

    def __repr__(self) -> str:
        return f"IdentityKeyPair(public={self.public.short_id()}, private=<hidden>)"
