"""The private halves of our published prekeys (PQXDH spec section 2.5 "Keys", 3.2 "Publishing keys").

A :class:`PrekeyStore` is immutable: every operation returns the public prekeys to upload and a
*new* store; the caller persists the new store before uploading (so a crash never publishes a key
whose private half is lost). Contents:

- the last two signed X25519 prekeys (current + previous, so initial messages in flight still
  decrypt after a rotation; spec 3.2 recommends keeping the old private key "for some period");
- one-time X25519 prekeys and one-time ML-KEM-768 prekeys, deleted when used (spec 3.4), at most
  :data:`MAX_POOL` of each kind (the oldest dropped first: keys handed out but never used);
- the last two last-resort ML-KEM-768 prekeys (never deleted by use, replaced by rotation);
- three monotonically increasing key-id counters (signed, one-time X25519, ML-KEM), so no id is
  ever reused within its namespace.

ML-KEM private keys are kept as their 64-byte seeds (FIPS 203 ``d || z``), X25519 as 32 raw bytes.

Serialization (version 1)::

    [1, body: bin, checksum: bin(32)]   checksum = SHA-256(context("state-checksum/prekey-store") || body)
    body = [next_signed_id, next_one_time_id, next_kem_id,
            [[signed_prekey.encode(), x25519_priv(32)], ...],   # oldest first, at most 2
            [[key_id, x25519_priv(32)], ...],                   # one-time X25519
            [[key_id, mlkem_seed(64)], ...],                    # one-time ML-KEM
            [[key_id, mlkem_seed(64)], ...]]                    # last-resort ML-KEM, oldest first, at most 2

The checksum is not a security mechanism (the key store encrypts blobs with an AEAD); it makes every
truncation or bit flip of a stored blob a :class:`StateCorrupt` instead of a silently wrong key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import replace as _replace
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .encoding import context, expect_array, expect_bytes, expect_int, pack, unpack
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import CryptoError, PrekeyNotFound, StateCorrupt
from .identity import IdentityKeyPair
from .prekeys import MAX_KEY_ID, KemPrekey, OneTimePrekey, SignedPrekey

STORE_VERSION = 1
KEEP_SIGNED_PREKEYS = 2
KEEP_LAST_RESORT_KEM_PREKEYS = 2
MLKEM_SEED_LEN = 64
MAX_POOL = 10_000  # one-time keys kept per kind; the oldest are dropped beyond it

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()
_CHECKSUM_LABEL = context("state-checksum/prekey-store")


def _x25519_raw(key: X25519PrivateKey) -> tuple[bytes, bytes]:
    return key.private_bytes(_RAW, _RAW_PRIV, _NOENC), key.public_key().public_bytes(_RAW, _RAW_PUB)


def _frozen(d: dict[int, bytes]) -> Mapping[int, bytes]:
    return MappingProxyType(d)


@dataclass(frozen=True, slots=True, repr=False)
class PrekeyStore:
    """Private prekeys, immutable. Use the methods; the fields are an implementation detail."""

    next_signed_id: int
    next_one_time_id: int
    next_kem_id: int
    signed: tuple[tuple[SignedPrekey, bytes], ...]
    one_time: Mapping[int, bytes]
    kem_one_time: Mapping[int, bytes]
    kem_last_resort: tuple[tuple[int, bytes], ...]

    @classmethod
    def empty(cls) -> PrekeyStore:
        return cls(1, 1, 1, (), _frozen({}), _frozen({}), ())

    # -- generating prekeys (spec 3.2) ---------------------------------------------------------

    def rotate_signed_prekey(self, identity: IdentityKeyPair, now: int, *,
                             entropy: Entropy = SYSTEM_ENTROPY) -> tuple[SignedPrekey, PrekeyStore]:
        """A new signed X25519 prekey; the previous one is kept for initial messages in flight."""
        key_id = _check_id(self.next_signed_id)
        private, public = _x25519_raw(entropy.x25519_private())
        spk = SignedPrekey.create(identity, key_id, public, now)
        signed = (*self.signed, (spk, private))[-KEEP_SIGNED_PREKEYS:]
        return spk, _replace(self, next_signed_id=key_id + 1, signed=signed)

    def new_one_time_prekeys(self, n: int, *,
                             entropy: Entropy = SYSTEM_ENTROPY) -> tuple[list[OneTimePrekey], PrekeyStore]:
        _check_count(n)
        pool = dict(self.one_time)
        out: list[OneTimePrekey] = []
        key_id = self.next_one_time_id
        for _ in range(n):
            _check_id(key_id)
            private, public = _x25519_raw(entropy.x25519_private())
            pool[key_id] = private
            out.append(OneTimePrekey(key_id, public))
            key_id += 1
        return out, _replace(self, next_one_time_id=key_id, one_time=_frozen(_bounded(pool)))

    def new_kem_prekeys(self, identity: IdentityKeyPair, n: int, *,
                        entropy: Entropy = SYSTEM_ENTROPY) -> tuple[list[KemPrekey], PrekeyStore]:
        """One-time ML-KEM-768 prekeys, signed (spec 3.2: "signed one-time pqkem prekeys")."""
        _check_count(n)
        pool = dict(self.kem_one_time)
        out: list[KemPrekey] = []
        key_id = self.next_kem_id
        for _ in range(n):
            _check_id(key_id)
            seed, public = _new_mlkem(entropy)
            pool[key_id] = seed
            out.append(KemPrekey.create(identity, key_id, public, last_resort=False))
            key_id += 1
        return out, _replace(self, next_kem_id=key_id, kem_one_time=_frozen(_bounded(pool)))

    def new_last_resort_kem_prekey(self, identity: IdentityKeyPair, *,
                                   entropy: Entropy = SYSTEM_ENTROPY) -> tuple[KemPrekey, PrekeyStore]:
        """A new last-resort ML-KEM-768 prekey (spec 3.2); the previous one stays usable."""
        key_id = _check_id(self.next_kem_id)
        seed, public = _new_mlkem(entropy)
        kp = KemPrekey.create(identity, key_id, public, last_resort=True)
        last = (*self.kem_last_resort, (key_id, seed))[-KEEP_LAST_RESORT_KEM_PREKEYS:]
        return kp, _replace(self, next_kem_id=key_id + 1, kem_last_resort=last)

    # -- inspecting ----------------------------------------------------------------------------

    @property
    def current_signed_prekey(self) -> SignedPrekey | None:
        return self.signed[-1][0] if self.signed else None

    @property
    def one_time_count(self) -> int:
        return len(self.one_time)

    def kem_one_time_count(self) -> int:
        return len(self.kem_one_time)

    # -- used by PQXDH respond (spec 3.4) --------------------------------------------------------

    def signed_prekey_private(self, key_id: int) -> X25519PrivateKey:
        for spk, private in self.signed:
            if spk.key_id == key_id:
                return X25519PrivateKey.from_private_bytes(private)
        raise PrekeyNotFound(f"signed prekey {key_id} not held")

    def one_time_private(self, key_id: int) -> X25519PrivateKey:
        private = self.one_time.get(key_id)
        if private is None:
            raise PrekeyNotFound(f"one-time prekey {key_id} not held (used or unknown)")
        return X25519PrivateKey.from_private_bytes(private)

    def kem_private(self, key_id: int) -> tuple[MLKEM768PrivateKey, bool]:
        """The ML-KEM private key with this id and whether it is a one-time key."""
        seed = self.kem_one_time.get(key_id)
        if seed is not None:
            return MLKEM768PrivateKey.from_seed_bytes(seed), True
        for last_id, last_seed in self.kem_last_resort:
            if last_id == key_id:
                return MLKEM768PrivateKey.from_seed_bytes(last_seed), False
        raise PrekeyNotFound(f"KEM prekey {key_id} not held (used or unknown)")

    def without_one_time(self, one_time_id: int | None, kem_one_time_id: int | None) -> PrekeyStore:
        """A copy with the given one-time prekeys deleted (spec 3.4: "Bob deletes any one-time prekey")."""
        one_time, kem = self.one_time, self.kem_one_time
        if one_time_id is not None and one_time_id in one_time:
            d = dict(one_time)
            del d[one_time_id]
            one_time = _frozen(d)
        if kem_one_time_id is not None and kem_one_time_id in kem:
            d = dict(kem)
            del d[kem_one_time_id]
            kem = _frozen(d)
        return _replace(self, one_time=one_time, kem_one_time=kem)

    # -- serialization ---------------------------------------------------------------------------

    def serialize(self) -> bytes:
        body = pack([
            self.next_signed_id, self.next_one_time_id, self.next_kem_id,
            [[spk.encode(), private] for spk, private in self.signed],
            [[k, v] for k, v in sorted(self.one_time.items())],
            [[k, v] for k, v in sorted(self.kem_one_time.items())],
            [[k, v] for k, v in self.kem_last_resort],
        ])
        return pack([STORE_VERSION, body, hashlib.sha256(_CHECKSUM_LABEL + body).digest()])

    @classmethod
    def deserialize(cls, data: bytes) -> PrekeyStore:
        """Rebuild a store; :class:`StateCorrupt` on any defect, never a partly loaded store."""
        try:
            return cls._deserialize(data)
        except StateCorrupt:
            raise
        except (CryptoError, ValueError, TypeError) as exc:
            raise StateCorrupt(f"prekey store: {exc}") from None

    @classmethod
    def _deserialize(cls, data: bytes) -> PrekeyStore:
        outer = expect_array(unpack(data, what="prekey store", max_size=64 << 20), what="prekey store",
                             version=STORE_VERSION, length=3)
        body = expect_bytes(outer[1], what="prekey store body", max_len=64 << 20)
        checksum = expect_bytes(outer[2], what="prekey store checksum", length=32)
        if not hmac.compare_digest(hashlib.sha256(_CHECKSUM_LABEL + body).digest(), checksum):
            raise StateCorrupt("prekey store: checksum mismatch")
        a = unpack(body, what="prekey store body", max_size=64 << 20)
        if not isinstance(a, list) or len(a) != 7:
            raise StateCorrupt("prekey store: wrong structure")
        next_signed = expect_int(a[0], what="next signed id", lo=1, hi=MAX_KEY_ID + 1)
        next_one_time = expect_int(a[1], what="next one-time id", lo=1, hi=MAX_KEY_ID + 1)
        next_kem = expect_int(a[2], what="next KEM id", lo=1, hi=MAX_KEY_ID + 1)

        signed: list[tuple[SignedPrekey, bytes]] = []
        for item in _pairs(a[3], "signed prekeys", KEEP_SIGNED_PREKEYS):
            spk = SignedPrekey.decode(expect_bytes(item[0], what="signed prekey"))
            private = expect_bytes(item[1], what="signed prekey private", length=32)
            if _x25519_raw(X25519PrivateKey.from_private_bytes(private))[1] != spk.public:
                raise StateCorrupt("prekey store: signed prekey halves do not match")
            signed.append((spk, private))
        _check_ids([spk.key_id for spk, _ in signed], next_signed, ordered=True)

        one_time = _id_map(a[4], "one-time prekeys", 32, next_one_time)
        kem_one_time = _id_map(a[5], "KEM prekeys", MLKEM_SEED_LEN, next_kem)
        last = [(k, v) for k, v in _id_map(a[6], "last-resort KEM prekeys", MLKEM_SEED_LEN, next_kem).items()]
        if len(last) > KEEP_LAST_RESORT_KEM_PREKEYS:
            raise StateCorrupt("prekey store: too many last-resort KEM prekeys")
        _check_ids([k for k, _ in last], next_kem, ordered=True)
        if set(kem_one_time) & {k for k, _ in last}:
            raise StateCorrupt("prekey store: KEM prekey id used twice")
        return cls(next_signed, next_one_time, next_kem, tuple(signed), _frozen(one_time),
                   _frozen(kem_one_time), tuple(last))

    def __repr__(self) -> str:
        return (f"PrekeyStore(signed={[spk.key_id for spk, _ in self.signed]}, "
                f"one_time={len(self.one_time)}, kem_one_time={len(self.kem_one_time)}, "
                f"last_resort={[k for k, _ in self.kem_last_resort]}, private=<hidden>)")


def _new_mlkem(entropy: Entropy) -> tuple[bytes, bytes]:
    seed = entropy.random_bytes(MLKEM_SEED_LEN)
    if len(seed) != MLKEM_SEED_LEN:
        raise CryptoError("entropy returned a short ML-KEM seed")
    return seed, MLKEM768PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()


def _check_id(key_id: int) -> int:
    if key_id > MAX_KEY_ID:
        raise CryptoError("prekey id space exhausted")
    return key_id


def _check_count(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_POOL:
        raise ValueError(f"prekey count must be in [0, {MAX_POOL}]")


def _bounded(pool: dict[int, bytes]) -> dict[int, bytes]:
    """Drop the oldest (lowest-id) keys beyond MAX_POOL.

    One-time keys the server handed out in a bundle that was never used stay here forever
    otherwise; the oldest are the likeliest to be such strays.
    """
    overflow = len(pool) - MAX_POOL
    if overflow > 0:
        for key_id in sorted(pool)[:overflow]:
            del pool[key_id]
    return pool


def _pairs(value: Any, what: str, max_items: int) -> list[list[Any]]:
    if not isinstance(value, list) or len(value) > max_items:
        raise StateCorrupt(f"prekey store: bad {what} list")
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise StateCorrupt(f"prekey store: bad {what} entry")
    return value


def _id_map(value: Any, what: str, key_len: int, next_id: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for item in _pairs(value, what, MAX_POOL):
        key_id = expect_int(item[0], what=f"{what} id", lo=1, hi=next_id - 1)
        if key_id in out:
            raise StateCorrupt(f"prekey store: duplicate id in {what}")
        out[key_id] = expect_bytes(item[1], what=f"{what} private", length=key_len)
    return out


def _check_ids(ids: list[int], next_id: int, *, ordered: bool) -> None:
    if any(not 1 <= k < next_id for k in ids) or (ordered and ids != sorted(set(ids))):
        raise StateCorrupt("prekey store: key ids out of order or beyond the counter")
