"""Safety numbers: a 60-digit fingerprint of two identities, Signal's NumericFingerprintGenerator.

Construction (libsignal ``fingerprint.rs``, the one Signal ships; 5200 iterations as Signal uses):

    h = SHA-512(version(2 bytes, 0x0000) || key || stable_id || key)    # iteration 0
    repeat 5199 times:  h = SHA-512(h || key)                           # iterations 1..5199

with ``key = PublicIdentity.encode()`` (both public keys and their binding signature) and
``stable_id`` the contact's canonical username in UTF-8. The first 30 bytes of ``h`` give six 5-byte
big-endian integers, each taken mod 100000 and written as 5 digits: 30 digits per identity. The
60-digit safety number is the two halves in ascending order, so both people see the same number.
The iteration makes a second-preimage search (a key with the same 30 digits) ~5200x more costly.

The QR payload is ``pack([1, fp_low, fp_high])``: the first 32 bytes of each side's ``h``, sorted,
so both screens show the same code. Scanning compares it in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from .encoding import pack
from .identity import PublicIdentity

FINGERPRINT_ITERATIONS = 5200
FINGERPRINT_HASH_VERSION = b"\x00\x00"  # Signal's fingerprint_version
QR_VERSION = 1
DIGITS_PER_IDENTITY = 30
SCANNABLE_LEN = 32


def iterated_fingerprint(key: bytes, stable_id: bytes, iterations: int = FINGERPRINT_ITERATIONS) -> bytes:
    """The 64-byte iterated SHA-512 of one identity (libsignal ``get_fingerprint``)."""
    if iterations < 2:
        raise ValueError("iterations must be at least 2")
    digest = hashlib.sha512(FINGERPRINT_HASH_VERSION + key + stable_id + key).digest()
    for _ in range(iterations - 1):
        digest = hashlib.sha512(digest + key).digest()
    return digest


def displayable_digits(fingerprint: bytes) -> str:
    """30 digits: six 5-byte big-endian chunks, each mod 100000, zero-padded to 5 digits."""
    chunks = (int.from_bytes(fingerprint[i : i + 5], "big") % 100_000 for i in range(0, 30, 5))
    return "".join(f"{chunk:05d}" for chunk in chunks)


@dataclass(frozen=True, slots=True)
class SafetyNumber:
    """What two people compare: ``digits`` (60) and a QR payload over both fingerprints."""

    digits: str
    fingerprints: tuple[bytes, bytes]  # the two 32-byte scannable fingerprints, ascending

    def groups(self) -> list[str]:
        """12 groups of 5 digits, the way Signal displays them."""
        return [self.digits[i : i + 5] for i in range(0, len(self.digits), 5)]

    def __str__(self) -> str:
        return " ".join(self.groups())

    def qr_payload(self) -> bytes:
        """``pack([1, fp_low(32), fp_high(32)])``: identical on both sides."""
        return pack([QR_VERSION, self.fingerprints[0], self.fingerprints[1]])

    def matches_digits(self, text: str) -> bool:
        """True if ``text`` (spaces and dashes ignored) is exactly these 60 digits. Constant-time."""
        if not isinstance(text, str):
            return False
        cleaned = "".join(ch for ch in text if ch not in " -\t\r\n")
        if not cleaned.isascii():
            return False
        return hmac.compare_digest(cleaned.encode("ascii"), self.digits.encode("ascii"))

    def matches_qr(self, payload: bytes) -> bool:
        """True if a scanned payload equals ours (the canonical encoding). Constant-time."""
        if not isinstance(payload, bytes | bytearray):
            return False
        return hmac.compare_digest(bytes(payload), self.qr_payload())


def safety_number(name_a: str, identity_a: PublicIdentity,
                  name_b: str, identity_b: PublicIdentity) -> SafetyNumber:
    """The safety number of two (canonical username, identity) pairs; symmetric in its arguments.

    Pass the names in their canonical (server-normalised) form: a different spelling gives a
    different number, which is a false alarm, never a false match.
    """
    full_a = iterated_fingerprint(identity_a.encode(), name_a.encode("utf-8"))
    full_b = iterated_fingerprint(identity_b.encode(), name_b.encode("utf-8"))
    digits = "".join(sorted([displayable_digits(full_a), displayable_digits(full_b)]))
    low, high = sorted([full_a[:SCANNABLE_LEN], full_b[:SCANNABLE_LEN]])
    return SafetyNumber(digits=digits, fingerprints=(low, high))
