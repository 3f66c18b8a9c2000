"""The Double Ratchet, Signal specification revision 4 (https://signal.org/docs/specifications/doubleratchet/).

Implements section 3 (without header encryption): 3.2 state variables, 3.3 initialization,
3.4 encrypting, 3.5 decrypting with skipped message keys. Cryptographic choices follow the spec's
recommendations (section 5.2), every primitive from pyca/cryptography:

- GENERATE_DH / DH: X25519.
- KDF_RK(rk, dh_out) = HKDF-SHA256(salt=rk, ikm=dh_out, info=context("ratchet-root"), L=64)
  -> (new rk = first 32 bytes, chain key = last 32 bytes).
- KDF_CK(ck): message key = HMAC-SHA256(ck, 0x01), next chain key = HMAC-SHA256(ck, 0x02).
- ENCRYPT(mk, pt, ad): HKDF-SHA256(salt=32 zero bytes, ikm=mk, info=context("message-keys"), L=44)
  -> AES-256-GCM key (32) || nonce (12); AEAD associated data = ad || header.encode().
  Each message key encrypts exactly one message, so a derived nonce never repeats under a key.
- Header (spec 3.1 HEADER): ``[1, dh(32), pn, n]`` (msgpack).

State is immutable: every function returns a new :class:`RatchetState`, and on any error it raises
before anything is returned, so the caller's state is untouched (no half-advanced chains).

Skipped message keys (spec 3.5, "MAX_SKIP"): at most :data:`MAX_SKIP_PER_CHAIN` keys are skipped
in one chain at once; at most :data:`MAX_SKIPPED_TOTAL` are stored, the oldest dropped first. A used
skipped key is deleted. To tell a replay from a forgery, the last :data:`KEEP_PREVIOUS_CHAINS`
receiving ratchet keys are remembered: a message of an earlier chain whose key is not stored was
already decrypted (or its key expired) and raises :class:`DuplicateMessage`.
"""

from __future__ import annotations

import hashlib
import hmac as _stdlib_hmac
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .encoding import context, expect_array, expect_bytes, expect_int, pack, unpack
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import (
    CryptoError,
    DecryptionError,
    DuplicateMessage,
    StateCorrupt,
    TooManySkipped,
)

HEADER_VERSION = 1
STATE_VERSION = 1
MAX_SKIP_PER_CHAIN = 1000
MAX_SKIPPED_TOTAL = 2000
KEEP_PREVIOUS_CHAINS = 64
MAX_COUNTER = (1 << 32) - 1

ROOT_INFO = context("ratchet-root")
MESSAGE_KEYS_INFO = context("message-keys")
_MK_INPUT = b"\x01"
_CK_INPUT = b"\x02"
_ZERO_SALT = b"\x00" * 32
_ZERO_DH = b"\x00" * 32
_SHA256 = hashes.SHA256()
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()
_CHECKSUM_LABEL = context("state-checksum/ratchet")
_EMPTY: Mapping[tuple[bytes, int], bytes] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Header:
    """Spec 3.1 HEADER(dh_pair, pn, n): the sender's ratchet public key and two counters."""

    dh: bytes
    pn: int
    n: int

    def encode(self) -> bytes:
        return pack([HEADER_VERSION, self.dh, self.pn, self.n])

    @classmethod
    def decode(cls, data: bytes) -> Header:
        a = expect_array(unpack(data, what="header", max_size=128), what="header",
                         version=HEADER_VERSION, length=4)
        return cls(
            dh=expect_bytes(a[1], what="header dh", length=32),
            pn=expect_int(a[2], what="header pn", hi=MAX_COUNTER),
            n=expect_int(a[3], what="header n", hi=MAX_COUNTER),
        )


@dataclass(frozen=True, slots=True, repr=False)
class RatchetState:
    """Spec 3.2 state variables. Immutable; ``repr`` hides every key."""

    dhs_private: bytes                        # DHs (private half, raw 32 bytes)
    dhs_public: bytes                         # DHs (public half)
    dhr: bytes | None                         # DHr
    rk: bytes                                 # RK
    cks: bytes | None                         # CKs
    ckr: bytes | None                         # CKr
    ns: int                                   # Ns
    nr: int                                   # Nr
    pn: int                                   # PN
    skipped: Mapping[tuple[bytes, int], bytes]  # MKSKIPPED, oldest first
    previous_dhr: tuple[bytes, ...]           # earlier DHr values, newest last (replay detection)

    def serialize(self) -> bytes:
        """``[1, body, SHA-256(context("state-checksum/ratchet") || body)]``, see docs/protocol.md."""
        body = pack([self.dhs_private, self.dhs_public, self.dhr, self.rk, self.cks, self.ckr,
                     self.ns, self.nr, self.pn, [[dh, n, mk] for (dh, n), mk in self.skipped.items()],
                     list(self.previous_dhr)])
        return pack([STATE_VERSION, body, hashlib.sha256(_CHECKSUM_LABEL + body).digest()])

    @classmethod
    def deserialize(cls, data: bytes) -> RatchetState:
        """Rebuild a state; :class:`StateCorrupt` on any defect."""
        try:
            return cls._deserialize(data)
        except StateCorrupt:
            raise
        except (CryptoError, ValueError, TypeError) as exc:
            raise StateCorrupt(f"ratchet state: {exc}") from None

    @classmethod
    def _deserialize(cls, data: bytes) -> RatchetState:
        outer = expect_array(unpack(data, what="ratchet state", max_size=1 << 20), what="ratchet state",
                             version=STATE_VERSION, length=3)
        body = expect_bytes(outer[1], what="ratchet state body")
        checksum = expect_bytes(outer[2], what="ratchet state checksum", length=32)
        if not _stdlib_hmac.compare_digest(hashlib.sha256(_CHECKSUM_LABEL + body).digest(), checksum):
            raise StateCorrupt("ratchet state: checksum mismatch")
        a = unpack(body, what="ratchet state body")
        if not isinstance(a, list) or len(a) != 11:
            raise StateCorrupt("ratchet state: wrong structure")
        dhs_private = expect_bytes(a[0], what="DHs private", length=32)
        dhs_public = expect_bytes(a[1], what="DHs public", length=32)
        if _public_of(X25519PrivateKey.from_private_bytes(dhs_private)) != dhs_public:
            raise StateCorrupt("ratchet state: DHs halves do not match")

        def opt32(v: Any, what: str) -> bytes | None:
            return None if v is None else expect_bytes(v, what=what, length=32)

        skipped_list = a[9]
        if not isinstance(skipped_list, list) or len(skipped_list) > MAX_SKIPPED_TOTAL:
            raise StateCorrupt("ratchet state: bad skipped-key list")
        skipped: dict[tuple[bytes, int], bytes] = {}
        for item in skipped_list:
            if not isinstance(item, list) or len(item) != 3:
                raise StateCorrupt("ratchet state: bad skipped-key entry")
            k = (expect_bytes(item[0], what="skipped dh", length=32),
                 expect_int(item[1], what="skipped n", hi=MAX_COUNTER))
            if k in skipped:
                raise StateCorrupt("ratchet state: duplicate skipped key")
            skipped[k] = expect_bytes(item[2], what="skipped key", length=32)
        prev = a[10]
        if not isinstance(prev, list) or len(prev) > KEEP_PREVIOUS_CHAINS:
            raise StateCorrupt("ratchet state: bad previous-chain list")
        state = cls(
            dhs_private=dhs_private, dhs_public=dhs_public, dhr=opt32(a[2], "DHr"),
            rk=expect_bytes(a[3], what="RK", length=32), cks=opt32(a[4], "CKs"), ckr=opt32(a[5], "CKr"),
            ns=expect_int(a[6], what="Ns", hi=MAX_COUNTER), nr=expect_int(a[7], what="Nr", hi=MAX_COUNTER),
            pn=expect_int(a[8], what="PN", hi=MAX_COUNTER),
            skipped=MappingProxyType(skipped) if skipped else _EMPTY,
            previous_dhr=tuple(expect_bytes(p, what="previous DHr", length=32) for p in prev),
        )
        if state.ckr is not None and state.dhr is None:
            raise StateCorrupt("ratchet state: receiving chain inconsistent")
        return state

    def __repr__(self) -> str:
        return (f"RatchetState(ns={self.ns}, nr={self.nr}, pn={self.pn}, "
                f"skipped={len(self.skipped)}, keys=<hidden>)")


def init_sender(sk: bytes, peer_ratchet_pub: bytes, *, entropy: Entropy = SYSTEM_ENTROPY) -> RatchetState:
    """Spec 3.3 RatchetInitAlice: ``peer_ratchet_pub`` is Bob's signed prekey (spec 5.1 / PQXDH 3.3)."""
    _check_key(sk, "SK")
    dhs = entropy.x25519_private()
    rk, cks = _kdf_rk(sk, _dh(dhs, peer_ratchet_pub, DecryptionError))
    return RatchetState(
        dhs_private=dhs.private_bytes(_RAW, _RAW_PRIV, _NOENC), dhs_public=_public_of(dhs),
        dhr=peer_ratchet_pub, rk=rk, cks=cks, ckr=None, ns=0, nr=0, pn=0,
        skipped=_EMPTY, previous_dhr=(),
    )


def init_receiver(sk: bytes, own_ratchet_private: bytes) -> RatchetState:
    """Spec 3.3 RatchetInitBob: Bob's first ratchet key pair is his signed prekey."""
    _check_key(sk, "SK")
    _check_key(own_ratchet_private, "ratchet private key")
    public = _public_of(X25519PrivateKey.from_private_bytes(own_ratchet_private))
    return RatchetState(
        dhs_private=own_ratchet_private, dhs_public=public, dhr=None, rk=sk, cks=None, ckr=None,
        ns=0, nr=0, pn=0, skipped=_EMPTY, previous_dhr=(),
    )


def ratchet_encrypt(state: RatchetState, plaintext: bytes, ad: bytes, *,
                    entropy: Entropy = SYSTEM_ENTROPY) -> tuple[Header, bytes, RatchetState]:
    """Spec 3.4 RatchetEncrypt. ``entropy`` is unused (sending never draws randomness); it is
    accepted so callers can treat both directions alike."""
    del entropy
    cks = state.cks
    if cks is None:
        # Spec 3.3: Bob cannot send before he has received (he has no sending chain yet).
        raise CryptoError("no sending chain yet: the responder must receive first")
    if state.ns >= MAX_COUNTER:
        raise CryptoError("sending chain exhausted")
    mk, next_ck = _kdf_ck(cks)
    header = Header(state.dhs_public, state.pn, state.ns)
    ciphertext = _encrypt(mk, plaintext, ad + header.encode())
    new_state = RatchetState(
        state.dhs_private, state.dhs_public, state.dhr, state.rk, next_ck, state.ckr,
        state.ns + 1, state.nr, state.pn, state.skipped, state.previous_dhr,
    )
    return header, ciphertext, new_state


def ratchet_decrypt(state: RatchetState, header: Header, ciphertext: bytes, ad: bytes, *,
                    entropy: Entropy = SYSTEM_ENTROPY) -> tuple[bytes, RatchetState]:
    """Spec 3.5 RatchetDecrypt. Raises DecryptionError / DuplicateMessage / TooManySkipped; the
    input state is never modified."""
    full_ad = ad + header.encode()
    key = (header.dh, header.n)

    # TrySkippedMessageKeys: a stored key is used once, then deleted.
    mk = state.skipped.get(key)
    if mk is not None:
        plaintext = _decrypt(mk, ciphertext, full_ad)
        remaining = dict(state.skipped)
        del remaining[key]
        return plaintext, RatchetState(
            state.dhs_private, state.dhs_public, state.dhr, state.rk, state.cks, state.ckr,
            state.ns, state.nr, state.pn, MappingProxyType(remaining) if remaining else _EMPTY,
            state.previous_dhr,
        )

    if state.ckr is not None and state.dhr is not None and _stdlib_hmac.compare_digest(header.dh, state.dhr):
        # Same receiving chain. (Alice's initial DHr, Bob's signed prekey, has no receiving chain:
        # a header naming it takes the DH-step path below and fails authentication.)
        if header.n < state.nr:
            raise DuplicateMessage("message already decrypted (or its key expired)")
        _check_skip(state.nr, header.n)
        new_skipped, ckr = _skip(state.skipped, state.ckr, state.dhr, state.nr, header.n)
        mk, next_ckr = _kdf_ck(ckr)
        plaintext = _decrypt(mk, ciphertext, full_ad)
        return plaintext, RatchetState(
            state.dhs_private, state.dhs_public, state.dhr, state.rk, state.cks, next_ckr,
            state.ns, header.n + 1, state.pn, new_skipped, state.previous_dhr,
        )

    if header.dh in state.previous_dhr:
        raise DuplicateMessage("message of an earlier chain already decrypted (or its key expired)")

    # A new ratchet public key from the peer: skip the rest of the current receiving chain, then
    # DHRatchet (spec 3.5), then skip within the new chain.
    if state.ckr is not None:
        _check_skip(state.nr, header.pn)
    _check_skip(0, header.n)
    skipped = state.skipped
    previous = state.previous_dhr
    if state.ckr is not None and state.dhr is not None:
        skipped, _ = _skip(skipped, state.ckr, state.dhr, state.nr, header.pn)
        previous = (*previous, state.dhr)[-KEEP_PREVIOUS_CHAINS:]
    dhs_old = X25519PrivateKey.from_private_bytes(state.dhs_private)
    rk, ckr = _kdf_rk(state.rk, _dh(dhs_old, header.dh, DecryptionError))
    dhs_new = entropy.x25519_private()
    rk, cks = _kdf_rk(rk, _dh(dhs_new, header.dh, DecryptionError))
    skipped, ckr = _skip(skipped, ckr, header.dh, 0, header.n)
    mk, next_ckr = _kdf_ck(ckr)
    plaintext = _decrypt(mk, ciphertext, full_ad)
    return plaintext, RatchetState(
        dhs_new.private_bytes(_RAW, _RAW_PRIV, _NOENC), _public_of(dhs_new), header.dh, rk, cks,
        next_ckr, 0, header.n + 1, state.ns, skipped, previous,
    )


# -- helpers ---------------------------------------------------------------------------------------

def _kdf_rk(rk: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    out = HKDF(_SHA256, 64, salt=rk, info=ROOT_INFO).derive(dh_out)
    return out[:32], out[32:]


def _kdf_ck(ck: bytes) -> tuple[bytes, bytes]:
    h = HMAC(ck, _SHA256)
    h2 = h.copy()
    h.update(_MK_INPUT)
    h2.update(_CK_INPUT)
    return h.finalize(), h2.finalize()


def _message_key_material(mk: bytes) -> tuple[bytes, bytes]:
    out = HKDF(_SHA256, 44, salt=_ZERO_SALT, info=MESSAGE_KEYS_INFO).derive(mk)
    return out[:32], out[32:]


def _encrypt(mk: bytes, plaintext: bytes, ad: bytes) -> bytes:
    key, nonce = _message_key_material(mk)
    return AESGCM(key).encrypt(nonce, plaintext, ad)


def _decrypt(mk: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    key, nonce = _message_key_material(mk)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, ad)
    except InvalidTag:
        raise DecryptionError("message failed authentication") from None


def _check_skip(nr: int, until: int) -> None:
    # Spec 3.5 SkipMessageKeys: "if state.Nr + MAX_SKIP < until: raise Error".
    if until - nr > MAX_SKIP_PER_CHAIN:
        raise TooManySkipped(f"would skip {until - nr} message keys (limit {MAX_SKIP_PER_CHAIN})")


def _skip(skipped: Mapping[tuple[bytes, int], bytes], ck: bytes, dh: bytes, nr: int,
          until: int) -> tuple[Mapping[tuple[bytes, int], bytes], bytes]:
    """Store the message keys ``nr .. until-1`` of chain ``dh``; return (new store, chain key)."""
    if until <= nr:
        return skipped, ck
    d = dict(skipped)
    for n in range(nr, until):
        mk, ck = _kdf_ck(ck)
        d[(dh, n)] = mk
    overflow = len(d) - MAX_SKIPPED_TOTAL
    if overflow > 0:  # drop the oldest keys first
        for old in list(d)[:overflow]:
            del d[old]
    return MappingProxyType(d), ck


def _dh(private: X25519PrivateKey, peer_public: bytes, error: type[CryptoError]) -> bytes:
    try:
        out = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise error("invalid or low-order ratchet public key") from None
    if _stdlib_hmac.compare_digest(out, _ZERO_DH):
        raise error("X25519 produced an all-zero shared secret")
    return out


def _public_of(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(_RAW, _RAW_PUB)


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError(f"{what} must be 32 bytes")


__all__ = [
    "MAX_SKIPPED_TOTAL", "MAX_SKIP_PER_CHAIN", "Header", "RatchetState",
    "init_receiver", "init_sender", "ratchet_decrypt", "ratchet_encrypt",
]
