"""Public prekeys and the prekey bundle a server hands to someone starting a session.

Signal PQXDH specification, section 2.5 ("Keys") and 3.2 ("Publishing keys"): a signed curve
prekey SPK, optional one-time curve prekeys OPK, and a signed post-quantum prekey PQPK which is
either one-time or the last-resort key. Our encodings (msgpack arrays, first element the version)::

    SignedPrekey  [1, key_id, x25519_pub(32), created_at, sig]  sig over pack([key_id, pub, created_at])
    OneTimePrekey [1, key_id, x25519_pub(32)]                     (unsigned, as in the spec)
    KemPrekey     [1, key_id, mlkem768_pub(1184), last_resort, sig]  sig over pack([key_id, pub, last_resort])

Signatures are Ed25519 by the identity under the labels ``signed-prekey`` and ``kem-prekey``
(see :func:`cipherpost.crypto.identity.signing_input`). The spec requires Bob's signatures to be
verified before use (section 3.3); :meth:`PrekeyBundle.verify` does that.

The private halves live in :mod:`cipherpost.crypto.prekey_store`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .encoding import (
    expect_array,
    expect_bool,
    expect_bytes,
    expect_int,
    pack,
    unpack,
)
from .errors import BundleError, CryptoError
from .identity import IdentityKeyPair, PublicIdentity

PREKEY_VERSION = 1
X25519_LEN = 32
MLKEM768_PUBLIC_LEN = 1184
MLKEM768_CIPHERTEXT_LEN = 1088
MAX_KEY_ID = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class SignedPrekey:
    key_id: int
    public: bytes
    created_at: int
    signature: bytes

    @staticmethod
    def signed_payload(key_id: int, public: bytes, created_at: int) -> bytes:
        return pack([key_id, public, created_at])

    @classmethod
    def create(cls, identity: IdentityKeyPair, key_id: int, public: bytes, created_at: int) -> SignedPrekey:
        sig = identity.sign("signed-prekey", cls.signed_payload(key_id, public, created_at))
        return cls(key_id, public, created_at, sig)

    def verify(self, identity: PublicIdentity) -> None:
        identity.verify("signed-prekey", self.signed_payload(self.key_id, self.public, self.created_at),
                        self.signature)

    def encode(self) -> bytes:
        return pack([PREKEY_VERSION, self.key_id, self.public, self.created_at, self.signature])

    @classmethod
    def decode(cls, data: bytes) -> SignedPrekey:
        a = expect_array(unpack(data, what="signed prekey", max_size=256), what="signed prekey",
                         version=PREKEY_VERSION, length=5)
        return cls(
            key_id=expect_int(a[1], what="signed prekey id", hi=MAX_KEY_ID),
            public=expect_bytes(a[2], what="signed prekey", length=X25519_LEN),
            created_at=expect_int(a[3], what="signed prekey created_at"),
            signature=expect_bytes(a[4], what="signed prekey signature", length=64),
        )


@dataclass(frozen=True, slots=True)
class OneTimePrekey:
    key_id: int
    public: bytes

    def encode(self) -> bytes:
        return pack([PREKEY_VERSION, self.key_id, self.public])

    @classmethod
    def decode(cls, data: bytes) -> OneTimePrekey:
        a = expect_array(unpack(data, what="one-time prekey", max_size=128), what="one-time prekey",
                         version=PREKEY_VERSION, length=3)
        return cls(
            key_id=expect_int(a[1], what="one-time prekey id", hi=MAX_KEY_ID),
            public=expect_bytes(a[2], what="one-time prekey", length=X25519_LEN),
        )


@dataclass(frozen=True, slots=True)
class KemPrekey:
    key_id: int
    public: bytes
    last_resort: bool
    signature: bytes

    @staticmethod
    def signed_payload(key_id: int, public: bytes, last_resort: bool) -> bytes:
        return pack([key_id, public, last_resort])

    @classmethod
    def create(cls, identity: IdentityKeyPair, key_id: int, public: bytes, last_resort: bool) -> KemPrekey:
        sig = identity.sign("kem-prekey", cls.signed_payload(key_id, public, last_resort))
        return cls(key_id, public, last_resort, sig)

    def verify(self, identity: PublicIdentity) -> None:
        identity.verify("kem-prekey", self.signed_payload(self.key_id, self.public, self.last_resort),
                        self.signature)

    def encode(self) -> bytes:
        return pack([PREKEY_VERSION, self.key_id, self.public, self.last_resort, self.signature])

    @classmethod
    def decode(cls, data: bytes) -> KemPrekey:
        a = expect_array(unpack(data, what="KEM prekey", max_size=2048), what="KEM prekey",
                         version=PREKEY_VERSION, length=5)
        return cls(
            key_id=expect_int(a[1], what="KEM prekey id", hi=MAX_KEY_ID),
            public=expect_bytes(a[2], what="KEM prekey", length=MLKEM768_PUBLIC_LEN),
            last_resort=expect_bool(a[3], what="KEM prekey last_resort"),
            signature=expect_bytes(a[4], what="KEM prekey signature", length=64),
        )


@dataclass(frozen=True, slots=True)
class PrekeyBundle:
    """What Alice fetches for Bob (PQXDH section 3.3): IK_B, SPK_B, PQPK_B and maybe OPK_B."""

    identity: PublicIdentity
    signed_prekey: SignedPrekey
    kem_prekey: KemPrekey
    one_time_prekey: OneTimePrekey | None = None

    @classmethod
    def from_parts(cls, identity: bytes, signed_prekey: bytes, kem_prekey: bytes,
                   one_time_prekey: bytes | None) -> PrekeyBundle:
        """Decode the parts as the server sends them and verify every signature."""
        try:
            bundle = cls(
                identity=PublicIdentity.decode(identity),
                signed_prekey=SignedPrekey.decode(signed_prekey),
                kem_prekey=KemPrekey.decode(kem_prekey),
                one_time_prekey=None if one_time_prekey is None else OneTimePrekey.decode(one_time_prekey),
            )
        except CryptoError as exc:
            raise BundleError(f"prekey bundle rejected: {exc}") from None
        bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check both prekey signatures against the bundle's identity; raise BundleError if not."""
        try:
            self.signed_prekey.verify(self.identity)
            self.kem_prekey.verify(self.identity)
        except CryptoError as exc:
            raise BundleError(f"prekey bundle rejected: {exc}") from None
