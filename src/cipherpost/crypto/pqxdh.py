"""PQXDH key agreement, Signal specification revision 3 (https://signal.org/docs/specifications/pqxdh/).

Parameters (spec 2.1): curve = curve25519 (X25519), hash = SHA-256, pqkem = ML-KEM-768,
info = ``b"cipherpost/v1/PQXDH_CURVE25519_SHA-256_ML-KEM-768"``. EncodeEC is the raw 32-byte X25519
public key, EncodeKEM the raw 1184-byte ML-KEM-768 public key.

Difference forced by pyca/cryptography (no XEdDSA): an identity is an Ed25519 signing key plus an
X25519 key bound to it by a signature (see :mod:`cipherpost.crypto.identity`); the X25519 identity key
is used for DH1 and DH2, and "Encode(IK)" in the associated data is :meth:`PublicIdentity.encode`,
which covers both keys and the binding signature.

Extension: an optional 32-byte pre-shared key (the output of a password verification, see
docs/verification.md) replaces the all-zero HKDF salt, as TLS 1.3 and Noise ``psk`` modes mix a PSK
into the key schedule. Without a PSK the KDF is exactly the spec's.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .encoding import context, expect_array, expect_bytes, expect_int, pack, unpack
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import BundleError, CryptoError, DecryptionError, EncodingError, InvalidSignature
from .identity import IdentityKeyPair, PublicIdentity
from .prekey_store import PrekeyStore
from .prekeys import MAX_KEY_ID, MLKEM768_CIPHERTEXT_LEN, X25519_LEN, PrekeyBundle

INITIAL_MESSAGE_VERSION = 1
INFO = b"cipherpost/v1/PQXDH_CURVE25519_SHA-256_ML-KEM-768"
# Spec 2.2: for curve25519, F is 32 0xFF bytes, prepended to the KDF input for domain separation
# from XEdDSA; the salt is a zero-filled byte sequence as long as the hash output.
_F = b"\xff" * 32
_ZERO_SALT = b"\x00" * 32
_ZERO_DH = b"\x00" * 32
SK_LEN = 32
PSK_LEN = 32
PSK_ID_LEN = 16

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw


@dataclass(frozen=True, slots=True)
class InitialMessage:
    """Spec 3.3: IK_A, EK_A, the PQKEM ciphertext and the identifiers of Bob's prekeys used.

    Encoding: ``[1, identity.encode(), ephemeral(32), signed_prekey_id, one_time_prekey_id|nil,
    kem_prekey_id, kem_ciphertext(1088), psk_id(16)|nil]``.
    """

    identity: PublicIdentity
    ephemeral: bytes
    signed_prekey_id: int
    one_time_prekey_id: int | None
    kem_prekey_id: int
    kem_ciphertext: bytes
    psk_id: bytes | None

    def encode(self) -> bytes:
        return pack([INITIAL_MESSAGE_VERSION, self.identity.encode(), self.ephemeral, self.signed_prekey_id,
                     self.one_time_prekey_id, self.kem_prekey_id, self.kem_ciphertext, self.psk_id])

    @classmethod
    def decode(cls, data: bytes) -> InitialMessage:
        """Parse and check lengths and the identity's binding signature (EncodingError)."""
        a = expect_array(unpack(data, what="initial message", max_size=4096), what="initial message",
                         version=INITIAL_MESSAGE_VERSION, length=8)
        try:
            identity = PublicIdentity.decode(expect_bytes(a[1], what="initial message identity", max_len=512))
        except InvalidSignature:
            raise EncodingError("initial message: identity binding signature does not verify") from None
        return cls(
            identity=identity,
            ephemeral=expect_bytes(a[2], what="initial message ephemeral", length=X25519_LEN),
            signed_prekey_id=expect_int(a[3], what="signed prekey id", hi=MAX_KEY_ID),
            one_time_prekey_id=None if a[4] is None else expect_int(a[4], what="one-time prekey id",
                                                                   hi=MAX_KEY_ID),
            kem_prekey_id=expect_int(a[5], what="KEM prekey id", hi=MAX_KEY_ID),
            kem_ciphertext=expect_bytes(a[6], what="KEM ciphertext", length=MLKEM768_CIPHERTEXT_LEN),
            psk_id=None if a[7] is None else expect_bytes(a[7], what="psk id", length=PSK_ID_LEN),
        )


def psk_id(psk: bytes) -> bytes:
    """16-byte public identifier of a pre-shared key, so the responder can pick the right one."""
    _check_psk(psk)
    return HKDF(hashes.SHA256(), PSK_ID_LEN, salt=None, info=context("psk-id")).derive(psk)


def initiate(me: IdentityKeyPair, bundle: PrekeyBundle, *, psk: bytes | None = None,
             entropy: Entropy = SYSTEM_ENTROPY) -> tuple[bytes, bytes, InitialMessage]:
    """Spec 3.3 (Alice): returns ``(SK, AD, initial message)``. Raises BundleError on a bad bundle."""
    # Spec 3.3: "Alice verifies the prekey signatures and aborts the protocol if verification fails."
    bundle.verify()
    if psk is not None:
        _check_psk(psk)
    try:
        spk_b = X25519PublicKey.from_public_bytes(bundle.signed_prekey.public)
        ik_b = X25519PublicKey.from_public_bytes(bundle.identity.dh_pub)
        opk_b = (None if bundle.one_time_prekey is None
                 else X25519PublicKey.from_public_bytes(bundle.one_time_prekey.public))
        pqpk_b = MLKEM768PublicKey.from_public_bytes(bundle.kem_prekey.public)
    except ValueError:
        raise BundleError("prekey bundle contains an invalid public key") from None

    ek_a = entropy.x25519_private()
    try:
        dh1 = me.dh(bundle.signed_prekey.public)          # DH1 = DH(IK_A, SPK_B)
        dh2 = ek_a.exchange(ik_b)                          # DH2 = DH(EK_A, IK_B)
        dh3 = ek_a.exchange(spk_b)                         # DH3 = DH(EK_A, SPK_B)
        dh4 = b"" if opk_b is None else ek_a.exchange(opk_b)  # DH4 = DH(EK_A, OPK_B), if present
    except (ValueError, EncodingError):
        raise BundleError("prekey bundle contains a low-order X25519 key") from None
    _reject_zero(dh1, dh2, dh3, dh4, error=BundleError)
    ss, ct = entropy.mlkem_encapsulate(pqpk_b)              # (CT, SS) = PQKEM-ENC(PQPK_B)

    sk = _kdf(dh1 + dh2 + dh3 + dh4 + ss, psk)
    ad = me.public.encode() + bundle.identity.encode()     # AD = Encode(IK_A) || Encode(IK_B)
    msg = InitialMessage(
        identity=me.public,
        ephemeral=ek_a.public_key().public_bytes(_RAW, _RAW_PUB),
        signed_prekey_id=bundle.signed_prekey.key_id,
        one_time_prekey_id=None if bundle.one_time_prekey is None else bundle.one_time_prekey.key_id,
        kem_prekey_id=bundle.kem_prekey.key_id,
        kem_ciphertext=ct,
        psk_id=None if psk is None else psk_id(psk),
    )
    # Spec 3.3 asks Alice to delete EK_A and the DH outputs; they go out of scope here (Python
    # cannot wipe memory reliably).
    return sk, ad, msg


def respond(me: IdentityKeyPair, store: PrekeyStore, msg: InitialMessage, *,
            psk: bytes | None = None) -> tuple[bytes, bytes, PrekeyStore]:
    """Spec 3.4 (Bob): returns ``(SK, AD, store without the used one-time prekeys)``.

    Raises PrekeyNotFound if a named prekey is not held (already used: a replay, or unknown), and
    DecryptionError if the pre-shared keys of the two sides do not match.
    """
    if (psk is None) != (msg.psk_id is None):
        raise DecryptionError("pre-shared key expected on exactly one side")
    if psk is not None and msg.psk_id is not None and not hmac.compare_digest(psk_id(psk), msg.psk_id):
        raise DecryptionError("pre-shared key does not match the initial message")

    spk_b = store.signed_prekey_private(msg.signed_prekey_id)
    opk_b = None if msg.one_time_prekey_id is None else store.one_time_private(msg.one_time_prekey_id)
    pqsk_b, kem_is_one_time = store.kem_private(msg.kem_prekey_id)
    try:
        ek_a = X25519PublicKey.from_public_bytes(msg.ephemeral)
        dh1 = spk_b.exchange(X25519PublicKey.from_public_bytes(msg.identity.dh_pub))  # DH(SPK_B, IK_A)
        dh2 = me.dh(msg.ephemeral)                                                       # DH(IK_B, EK_A)
        dh3 = spk_b.exchange(ek_a)                                                       # DH(SPK_B, EK_A)
        dh4 = b"" if opk_b is None else opk_b.exchange(ek_a)                             # DH(OPK_B, EK_A)
        ss = pqsk_b.decapsulate(msg.kem_ciphertext)                                      # PQKEM-DEC
    except (ValueError, EncodingError):
        raise EncodingError("initial message contains an invalid or low-order key") from None
    _reject_zero(dh1, dh2, dh3, dh4, error=EncodingError)

    sk = _kdf(dh1 + dh2 + dh3 + dh4 + ss, psk)
    ad = msg.identity.encode() + me.public.encode()
    # Spec 3.4: "Bob then deletes any one-time prekey private key that was used" (the last-resort
    # KEM prekey is kept).
    new_store = store.without_one_time(msg.one_time_prekey_id,
                                       msg.kem_prekey_id if kem_is_one_time else None)
    return sk, ad, new_store


def _kdf(km: bytes, psk: bytes | None) -> bytes:
    # Spec 2.2 KDF: HKDF(salt = zeros(32) [our PSK extension: the PSK], ikm = F || KM, info).
    salt = _ZERO_SALT if psk is None else psk
    return HKDF(hashes.SHA256(), SK_LEN, salt=salt, info=INFO).derive(_F + km)


def _reject_zero(*outputs: bytes, error: type[CryptoError]) -> None:
    # An all-zero X25519 output means a low-order peer key (RFC 7748 section 6.1); pyca already
    # raises for it, checked again so the property does not rest on a library detail.
    for out in outputs:
        if out and hmac.compare_digest(out, _ZERO_DH):
            raise error("X25519 produced an all-zero shared secret")


def _check_psk(psk: bytes) -> None:
    if not isinstance(psk, bytes) or len(psk) != PSK_LEN:
        raise ValueError("pre-shared key must be 32 bytes")


__all__ = ["INFO", "InitialMessage", "initiate", "psk_id", "respond"]
