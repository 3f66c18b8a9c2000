"""One-shot public-key encryption (sealed envelopes, sealed sender): HPKE, RFC 9180, Base mode.

Built on :mod:`cryptography.hazmat.primitives.hpke` (single-shot ``Suite.encrypt``/``decrypt``,
RFC 9180 section 6.1). Two suites:

* ``SealSuite.X25519``: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.
* ``SealSuite.MLKEM768_X25519``: the ML-KEM-768 + X25519 hybrid KEM (X-Wing style), HKDF-SHA256,
  ChaCha20-Poly1305: confidential unless *both* ML-KEM-768 and X25519 are broken.

Associated data. pyca's public one-shot API takes ``info`` but no AAD, so the caller's ``aad`` is
folded into the HPKE ``info`` as ``context("sealed") + pack([info, aad])``. ``info`` enters the key
schedule (RFC 9180 section 5.1, ``info_hash = LabeledExtract("", "info_hash", info)``), so a
different ``info`` *or* ``aad`` yields a different key and the AEAD tag fails: the aad is
authenticated, and the msgpack array keeps the two fields unambiguous (no ``info``/``aad`` split
can collide with another).

Wire format (msgpack)::

    [1, suite_id, hpke_ciphertext]      hpke_ciphertext = enc || AEAD ciphertext (pyca's layout)

Key bytes (pyca has no serialization for the hybrid key objects, so we store the parts):

* X25519: private = 32-byte raw X25519 key; public = 32-byte raw X25519 public key.
* MLKEM768_X25519: private = ML-KEM-768 seed (64, FIPS 203 ``d || z``) || X25519 private (32);
  public = ML-KEM-768 encapsulation key (1184) || X25519 public (32), the X-Wing order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from .encoding import context, expect_array, expect_bytes, expect_int, pack, unpack
from .errors import DecryptionError, EncodingError

SEALED_VERSION = 1
MAX_SEALED = 1 << 20

_X25519_LEN = 32
_MLKEM768_SEED_LEN = 64
_MLKEM768_PUBLIC_LEN = 1184
_AEAD_TAG_LEN = 16

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()


@dataclass(frozen=True, slots=True)
class _SuiteSpec:
    suite_id: int
    kem: hpke.KEM
    private_len: int
    public_len: int


class SealSuite(enum.Enum):
    """An HPKE ciphersuite. ``value`` is the suite id written into sealed envelopes."""

    X25519 = 1
    MLKEM768_X25519 = 2

    @property
    def _spec(self) -> _SuiteSpec:
        return _SPECS[self]

    @property
    def private_len(self) -> int:
        return self._spec.private_len

    @property
    def public_len(self) -> int:
        return self._spec.public_len

    def _hpke_suite(self) -> hpke.Suite:
        return hpke.Suite(self._spec.kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


_SPECS = {
    SealSuite.X25519: _SuiteSpec(1, hpke.KEM.X25519, _X25519_LEN, _X25519_LEN),
    SealSuite.MLKEM768_X25519: _SuiteSpec(
        2, hpke.KEM.MLKEM768_X25519, _MLKEM768_SEED_LEN + _X25519_LEN, _MLKEM768_PUBLIC_LEN + _X25519_LEN
    ),
}


def _full_info(info: bytes, aad: bytes) -> bytes:
    # RFC 9180 section 5.1: info is bound into the key schedule, so binding aad here authenticates it.
    if not isinstance(info, bytes) or not isinstance(aad, bytes):
        raise TypeError("info and aad must be bytes")
    return context("sealed") + pack([info, aad])


def _public_key(suite: SealSuite, data: bytes) -> Any:
    expect_bytes(data, what="sealed: recipient public key", length=suite.public_len)
    try:
        if suite is SealSuite.X25519:
            return x25519.X25519PublicKey.from_public_bytes(data)
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(data[:_MLKEM768_PUBLIC_LEN]),
            x25519.X25519PublicKey.from_public_bytes(data[_MLKEM768_PUBLIC_LEN:]),
        )
    except ValueError:
        raise EncodingError("sealed: invalid recipient public key") from None


def _private_key(suite: SealSuite, data: bytes) -> Any:
    expect_bytes(data, what="sealed: private key", length=suite.private_len)
    try:
        if suite is SealSuite.X25519:
            return x25519.X25519PrivateKey.from_private_bytes(data)
        return hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(data[:_MLKEM768_SEED_LEN]),
            x25519.X25519PrivateKey.from_private_bytes(data[_MLKEM768_SEED_LEN:]),
        )
    except ValueError:
        raise EncodingError("sealed: invalid private key") from None


def generate_seal_keypair(suite: SealSuite) -> tuple[bytes, bytes]:
    """A fresh recipient key pair for ``suite``: ``(private_bytes, public_bytes)`` (formats above)."""
    dh = x25519.X25519PrivateKey.generate()
    dh_priv = dh.private_bytes(_RAW, _RAW_PRIV, _NOENC)
    dh_pub = dh.public_key().public_bytes(_RAW, _RAW_PUB)
    if suite is SealSuite.X25519:
        return dh_priv, dh_pub
    kem = mlkem.MLKEM768PrivateKey.generate()
    return kem.private_bytes_raw() + dh_priv, kem.public_key().public_bytes_raw() + dh_pub


def seal_public_from_private(suite: SealSuite, recipient_private: bytes) -> bytes:
    """The public bytes belonging to ``recipient_private`` (lets a key store keep only the private)."""
    expect_bytes(recipient_private, what="sealed: private key", length=suite.private_len)
    try:
        if suite is SealSuite.X25519:
            return x25519.X25519PrivateKey.from_private_bytes(recipient_private).public_key().public_bytes(
                _RAW, _RAW_PUB)
        kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(recipient_private[:_MLKEM768_SEED_LEN])
        dh = x25519.X25519PrivateKey.from_private_bytes(recipient_private[_MLKEM768_SEED_LEN:])
    except ValueError:
        raise EncodingError("sealed: invalid private key") from None
    return kem.public_key().public_bytes_raw() + dh.public_key().public_bytes(_RAW, _RAW_PUB)


def seal(suite: SealSuite, recipient_public: bytes, plaintext: bytes, *, info: bytes,
         aad: bytes = b"") -> bytes:
    """Encrypt ``plaintext`` to ``recipient_public`` (RFC 9180 section 6.1 SealBase).

    ``info`` names the purpose (e.g. ``b"sealed-sender"``); ``aad`` is authenticated, not encrypted,
    and is bound through the HPKE ``info`` (see module docstring). Raises EncodingError for a
    malformed public key.
    """
    if not isinstance(plaintext, bytes):
        raise TypeError("plaintext must be bytes")
    full_info = _full_info(info, aad)
    key = _public_key(suite, recipient_public)
    try:
        ciphertext = suite._hpke_suite().encrypt(plaintext, key, info=full_info)
    except ValueError:
        # e.g. an X25519 public key of small order (all-zero shared secret, RFC 9180 section 7.1.4)
        raise EncodingError("sealed: unusable recipient public key") from None
    return pack([SEALED_VERSION, suite.value, ciphertext])


def open_sealed(suite: SealSuite, recipient_private: bytes, sealed: bytes, *, info: bytes,
                aad: bytes = b"") -> bytes:
    """Decrypt a :func:`seal` output (RFC 9180 section 6.1 OpenBase).

    Raises EncodingError if ``sealed`` is malformed or made for another suite, and DecryptionError
    if it was tampered with, sealed to another key, or ``info``/``aad`` differ.
    """
    full_info = _full_info(info, aad)
    arr = expect_array(unpack(sealed, what="sealed", max_size=MAX_SEALED), what="sealed",
                       version=SEALED_VERSION, length=3)
    suite_id = expect_int(arr[1], what="sealed: suite id", hi=255)
    if suite_id != suite.value:
        raise EncodingError("sealed: envelope is for another suite")
    ciphertext = expect_bytes(arr[2], what="sealed: ciphertext", max_len=MAX_SEALED)
    if len(ciphertext) < suite._spec.kem.enc_length() + _AEAD_TAG_LEN:
        raise EncodingError("sealed: ciphertext truncated")
    key = _private_key(suite, recipient_private)
    try:
        return suite._hpke_suite().decrypt(ciphertext, key, info=full_info)
    except (InvalidTag, ValueError):
        raise DecryptionError("sealed: authentication failed") from None
