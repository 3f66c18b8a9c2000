"""Server pins: the SHA-256 of a certificate's public key (SPKI), as HTTP public key pinning defines it.

A pin of the public key survives certificate renewals that keep the key (a public CA renews every 90
days at most; certbot ``--reuse-key``), where a pin of the whole certificate breaks at each one.
The login signature still covers SHA-256 of the whole certificate (docs/wire.md, channel binding):
that is what a machine in the middle cannot reuse. RFC 7469 section 2.4 ("pin-sha256": SHA-256 over
the DER of the SubjectPublicKeyInfo).
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def spki_sha256(cert_der: bytes) -> bytes:
    """SHA-256 of the certificate's SubjectPublicKeyInfo (DER), RFC 7469 section 2.4."""
    spki = x509.load_der_x509_certificate(cert_der).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def check_pin(pinned: bytes, cert_der: bytes) -> tuple[bool, bool]:
    """``(matches, by_certificate)``: whether ``pinned`` is this certificate's public key pin, or (a pin
    made before public-key pins) the SHA-256 of the whole certificate. Constant-time comparisons."""
    by_key = hmac.compare_digest(pinned, spki_sha256(cert_der))
    by_certificate = hmac.compare_digest(pinned, hashlib.sha256(cert_der).digest())
    return by_key or by_certificate, by_certificate and not by_key
