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


class UnknownSenderKey(DecryptionError):
    """A group message names a sender-key chain we do not hold (a missed or not yet processed
    distribution, or one rotated out): ask the sender to resend its key. State is unchanged."""


class StateCorrupt(CryptoError):
    """A serialized state blob is truncated, corrupted, or of an unknown version."""


class WrongPassphrase(CryptoError):
    """The key store could not be opened with the given passphrase."""


class VerificationFailed(CryptoError):
    """A contact verification (PAKE key confirmation or safety-number comparison) failed."""


class RecoveryCodeError(CryptoError):
    """A typed recovery code is malformed or mistyped (its check characters do not match)."""


class StreamError(CryptoError):
    """A file stream (crypto/stream.py) failed: a chunk is tampered with, reordered, of the wrong
    size or from another stream, or the stream was used out of order. State is unchanged."""


class StreamTruncated(StreamError):
    """The stream ended without a valid final chunk (a truncated file). State is unchanged."""


class StreamExtended(StreamError):
    """Data follows the final chunk, or a chunk was offered after the stream finished."""
