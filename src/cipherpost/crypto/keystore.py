"""Private key material at rest: a passphrase-derived key (Argon2id, RFC 9106) and AES-256-GCM.

Blob format (msgpack)::

    [1, [memory_kib, iterations, lanes], salt(16), nonce(12), ciphertext]

    key        = Argon2id(NFC(passphrase) as UTF-8, salt, t=iterations, m=memory_kib, p=lanes, T=32)
    ciphertext = AES-256-GCM(key, nonce, plaintext, aad = pack([1, [memory_kib, iterations, lanes], salt]))

The header (version, parameters, salt) is the GCM associated data, so nobody can lower the cost
parameters or swap the salt of a stored blob without the tag failing. Opening a blob honours the
parameters it names, within bounds (:data:`MAX_MEMORY_KIB` and friends), so a corrupted or hostile
file cannot make us allocate absurd amounts of memory. :func:`keystore_params` lets the caller see
whether a blob was sealed with weaker parameters than it now wants, and re-seal it.

The salt is random per sealing (RFC 9106 section 3.1: 128 bits recommended), the nonce is random
per sealing; every re-seal draws both afresh.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from .encoding import pack, unpack
from .errors import EncodingError, StateCorrupt, WrongPassphrase

KEYSTORE_VERSION = 1
SALT_LEN = 16
NONCE_LEN = 12
KEY_LEN = 32
MAX_KEYSTORE = 16 << 20

# Bounds checked on open (and seal). The upper bounds sit at or above RFC 9106's first
# recommendation (2 GiB, t=1, p=4) and well above what any sane setting would use.
MIN_ITERATIONS, MAX_ITERATIONS = 1, 64
MIN_LANES, MAX_LANES = 1, 64
MAX_MEMORY_KIB = 4 * 1024 * 1024  # 4 GiB


@dataclass(frozen=True, slots=True)
class Argon2Params:
    """Argon2id cost parameters (RFC 9106 section 3.1: m in KiB, t passes, p lanes)."""

    memory_kib: int
    iterations: int
    lanes: int

    def check(self) -> None:
        """Raise ValueError unless the parameters lie within the accepted bounds."""
        for value in (self.memory_kib, self.iterations, self.lanes):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError("Argon2 parameters must be integers")
        if not MIN_LANES <= self.lanes <= MAX_LANES:
            raise ValueError(f"Argon2 lanes must be in [{MIN_LANES}, {MAX_LANES}]")
        if not MIN_ITERATIONS <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(f"Argon2 iterations must be in [{MIN_ITERATIONS}, {MAX_ITERATIONS}]")
        # RFC 9106 section 3.1: m must be at least 8*p KiB.
        if not 8 * self.lanes <= self.memory_kib <= MAX_MEMORY_KIB:
            raise ValueError(f"Argon2 memory must be in [8*lanes, {MAX_MEMORY_KIB}] KiB")

    def weaker_than(self, other: Argon2Params) -> bool:
        """True if this costs less memory or fewer passes than ``other`` (time to re-seal)."""
        return self.memory_kib < other.memory_kib or self.iterations < other.iterations

    def encode(self) -> list[int]:
        return [self.memory_kib, self.iterations, self.lanes]


# RFC 9106 section 4, second recommended option (for memory-constrained settings):
# Argon2id, t=3, m=64 MiB, p=4, 128-bit salt, 256-bit tag. About 0.2 s on the development machine.
RFC9106_SECOND_RECOMMENDED = Argon2Params(memory_kib=65536, iterations=3, lanes=4)
# RFC 9106 section 4, first recommended option: t=1, m=2 GiB, p=4 (for machines that can afford it).
RFC9106_FIRST_RECOMMENDED = Argon2Params(memory_kib=2 * 1024 * 1024, iterations=1, lanes=4)


def derive_argon2id(password: bytes, salt: bytes, params: Argon2Params, *, length: int = KEY_LEN,
                    secret: bytes | None = None, ad: bytes | None = None) -> bytes:
    """Argon2id (RFC 9106 section 3) via pyca; the single place parameters are passed to it."""
    return Argon2id(
        salt=salt, length=length, iterations=params.iterations, lanes=params.lanes,
        memory_cost=params.memory_kib, secret=secret, ad=ad,
    ).derive(password)


def _passphrase_bytes(passphrase: str) -> bytes:
    # NFC so the same passphrase typed on systems that compose differently gives the same key.
    if not isinstance(passphrase, str):
        raise TypeError("passphrase must be str")
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def _header(params: Argon2Params, salt: bytes) -> bytes:
    return pack([KEYSTORE_VERSION, params.encode(), salt])


def seal_keystore(passphrase: str, plaintext: bytes, *, params: Argon2Params = RFC9106_SECOND_RECOMMENDED,
                  salt: bytes | None = None) -> bytes:
    """Encrypt ``plaintext`` under ``passphrase``. ``salt`` is random unless given (tests only)."""
    params.check()
    if salt is None:
        salt = os.urandom(SALT_LEN)
    elif not isinstance(salt, bytes) or len(salt) != SALT_LEN:
        raise ValueError(f"salt must be {SALT_LEN} bytes")
    key = derive_argon2id(_passphrase_bytes(passphrase), salt, params)
    nonce = os.urandom(NONCE_LEN)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, _header(params, salt))
    return pack([KEYSTORE_VERSION, params.encode(), salt, nonce, ciphertext])


def _parse(blob: bytes) -> tuple[Argon2Params, bytes, bytes, bytes]:
    try:
        obj: Any = unpack(blob, what="key store", max_size=MAX_KEYSTORE)
    except EncodingError:
        raise StateCorrupt("key store: not a valid key store file") from None
    if not isinstance(obj, list) or len(obj) != 5:
        raise StateCorrupt("key store: wrong structure")
    version, raw_params, salt, nonce, ciphertext = obj
    if version != KEYSTORE_VERSION or isinstance(version, bool):
        raise StateCorrupt(f"key store: unsupported version {version!r}")
    if not isinstance(raw_params, list) or len(raw_params) != 3:
        raise StateCorrupt("key store: malformed parameters")
    params = Argon2Params(*raw_params)
    try:
        params.check()
    except ValueError as exc:
        raise StateCorrupt(f"key store: parameters out of bounds ({exc})") from None
    if not isinstance(salt, bytes) or len(salt) != SALT_LEN:
        raise StateCorrupt("key store: malformed salt")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_LEN:
        raise StateCorrupt("key store: malformed nonce")
    if not isinstance(ciphertext, bytes) or len(ciphertext) < 16:
        raise StateCorrupt("key store: ciphertext truncated")
    return params, salt, nonce, ciphertext


def keystore_params(blob: bytes) -> Argon2Params:
    """The Argon2 parameters a blob was sealed with (StateCorrupt if the blob is malformed)."""
    return _parse(blob)[0]


def open_keystore(passphrase: str, blob: bytes) -> bytes:
    """Decrypt a :func:`seal_keystore` blob.

    Raises StateCorrupt if the blob is malformed or names out-of-bounds parameters, and
    WrongPassphrase if authentication fails (a wrong passphrase, or a modified file: GCM cannot
    tell the two apart).
    """
    params, salt, nonce, ciphertext = _parse(blob)
    key = derive_argon2id(_passphrase_bytes(passphrase), salt, params)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, _header(params, salt))
    except InvalidTag:
        raise WrongPassphrase("key store: wrong passphrase (or the key store file was modified)") from None


def reseal_keystore(old_passphrase: str, new_passphrase: str, blob: bytes, *,
                    params: Argon2Params | None = None) -> bytes:
    """Open ``blob`` with the old passphrase and seal the same plaintext under the new one (fresh
    salt and nonce). The parameters are the blob's own, or ``params`` if given and not weaker:
    changing the passphrase never lowers the cost of guessing it. Raises as :func:`open_keystore`."""
    current = keystore_params(blob)
    plaintext = open_keystore(old_passphrase, blob)
    chosen = current if params is None or params.weaker_than(current) else params
    return seal_keystore(new_passphrase, plaintext, params=chosen)
