"""Account recovery keys: a secret written down once, an Ed25519 key derived from it (docs/accounts.md).

At ``init`` the client draws a recovery secret of :data:`SECRET_LEN` random bytes and shows it once
as a *recovery code*: RFC 4648 base32 of the secret plus :data:`CHECK_CHARS` check characters, in
groups of four::

    code   = group4(base32(secret) || base32(SHA-256(context("recovery-code-check") || secret))[:4])
    seed   = HKDF-SHA256(secret, salt=none, info=context("recovery-key"), 32)      (RFC 5869)
    key    = Ed25519PrivateKey.from_private_bytes(seed)                              (RFC 8032)

Only ``key.public`` reaches the relay. The secret is never stored: the user holds it, and it is
typed again for ``cipherpost recover``. 160 random bits make offline guessing hopeless, so a fast
KDF (HKDF, for domain separation) is right here; the relay limits *online* attempts.

The check characters catch typing mistakes before anything is sent (a wrong code would otherwise
count as a failed recovery attempt). Parsing forgives case, spaces, dashes and the look-alikes
0/O, 1/I, 8/B (none of 0, 1, 8 is a base32 digit). Sans-I/O: bytes and strings in and out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.exceptions import InvalidSignature as _PycaInvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .encoding import context
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import EncodingError, InvalidSignature, RecoveryCodeError
from .identity import signing_input

SECRET_LEN = 20          # 160 bits
CHECK_CHARS = 4          # 20 bits of check: a typo slips through about once in a million
PUBLIC_LEN = 32
_SECRET_CHARS = SECRET_LEN * 8 // 5   # 32 base32 characters, no padding
_CODE_CHARS = _SECRET_CHARS + CHECK_CHARS
_FORGIVE = str.maketrans({"0": "O", "1": "I", "8": "B"})


def _check(secret: bytes) -> str:
    digest = hashlib.sha256(context("recovery-code-check") + secret).digest()
    return base64.b32encode(digest).decode("ascii")[:CHECK_CHARS]


def format_code(secret: bytes) -> str:
    """The recovery code for ``secret``: 36 characters in groups of four, e.g. ``ABCD-EFGH-...``."""
    if len(secret) != SECRET_LEN:
        raise EncodingError(f"recovery secret must be {SECRET_LEN} bytes")
    chars = base64.b32encode(secret).decode("ascii") + _check(secret)
    return "-".join(chars[i:i + 4] for i in range(0, len(chars), 4))


def parse_code(text: str) -> bytes:
    """The secret in a typed recovery code; raises :class:`RecoveryCodeError` (never echoing it)."""
    chars = "".join(text.split()).replace("-", "").upper().translate(_FORGIVE)
    if len(chars) != _CODE_CHARS:
        raise RecoveryCodeError(f"a recovery code has {_CODE_CHARS} letters and digits (dashes and "
                                f"spaces aside); this one has {len(chars)}")
    try:
        secret = base64.b32decode(chars[:_SECRET_CHARS])
    except ValueError:
        raise RecoveryCodeError("a recovery code holds only the letters A-Z and the digits 2-7") from None
    if not hmac.compare_digest(_check(secret), chars[_SECRET_CHARS:]):
        raise RecoveryCodeError("the recovery code is mistyped (its check characters do not match)")
    return secret


class RecoveryKey:
    """The private recovery key; ``repr`` never shows key material. Made by :meth:`generate` or
    :meth:`from_code`; signs recovery requests (:meth:`sign`)."""

    __slots__ = ("_key", "public")

    def __init__(self, secret: bytes) -> None:
        seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=context("recovery-key")).derive(secret)
        self._key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        self.public: bytes = self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                 serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls, entropy: Entropy = SYSTEM_ENTROPY) -> tuple[RecoveryKey, str]:
        """A fresh key and its recovery code (to show once, never to store)."""
        secret = entropy.random_bytes(SECRET_LEN)
        return cls(secret), format_code(secret)

    @classmethod
    def from_code(cls, code: str) -> RecoveryKey:
        return cls(parse_code(code))

    def sign(self, label: str, payload: bytes) -> bytes:
        """Ed25519 over ``context(label) || payload``, like ``IdentityKeyPair.sign``."""
        return self._key.sign(signing_input(label, payload))

    def __repr__(self) -> str:
        return "RecoveryKey(<hidden>)"


def verify_recovery(public: bytes, label: str, payload: bytes, signature: bytes) -> None:
    """Check a :meth:`RecoveryKey.sign` signature; raises :class:`InvalidSignature` or EncodingError."""
    if len(public) != PUBLIC_LEN:
        raise EncodingError(f"recovery public key must be {PUBLIC_LEN} bytes")
    if len(signature) != 64:
        raise InvalidSignature(f"{label}: malformed signature")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, signing_input(label, payload))
    except _PycaInvalidSignature:
        raise InvalidSignature(f"{label}: signature does not verify") from None
    except ValueError:
        raise EncodingError("invalid Ed25519 recovery public key") from None
