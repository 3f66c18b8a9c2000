"""Typed errors of the crypto layer.

Messages name what failed, never secret values. Callers can catch :class:`CryptoError` for all.
"""


class CryptoError(Exception):
    """Base class of every error raised by :mod:`cipherpost.crypto`."""


class EncodingError(CryptoError):
    """Bytes do not decode to the expected structure (wrong type, length, version, truncated)."""


class InvalidSignature(CryptoError):
    """An Ed25519 signature does not verify against the claimed identity."""


class BundleError(CryptoError):
    """A prekey bundle is malformed, signed by another identity, or otherwise unusable."""


class PrekeyNotFound(CryptoError):
    """An initial message names a prekey we do not hold (already used, rotated away, unknown)."""


class DecryptionError(CryptoError):
    """A message failed authentication (tampered, truncated, wrong key). State is unchanged."""


class DuplicateMessage(DecryptionError):
    """The message was already decrypted once (its key is gone). State is unchanged."""


class TooManySkipped(DecryptionError):
    """Decrypting would skip more message keys than the bound allows. State is unchanged."""


class StateCorrupt(CryptoError):
    """A serialized state blob is truncated, corrupted, or of an unknown version."""


class WrongPassphrase(CryptoError):
    """The key store could not be opened with the given passphrase."""


class VerificationFailed(CryptoError):
    """A contact verification (PAKE key confirmation or safety-number comparison) failed."""


class RecoveryCodeError(CryptoError):
    """A typed recovery code is malformed or mistyped (its check characters do not match)."""
