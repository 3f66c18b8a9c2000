"""Group sender keys: Signal's Sender Keys, as in signalapp/libsignal ``rust/protocol/src/sender_keys.rs``
(``SenderKeyState``, ``SenderKeyRecord``, ``SenderChainKey``, ``SenderMessageKey``) and
``group_cipher.rs`` (``create_sender_key_distribution_message``, ``process_sender_key_distribution_message``,
``group_encrypt``, ``group_decrypt``).

Each member has, per group, a sending chain: a 32-byte chain key stepped as the Double Ratchet's
symmetric chain (``ratchet._kdf_ck``: message key seed = HMAC-SHA256(ck, 0x01), next chain key =
HMAC-SHA256(ck, 0x02); libsignal's ``SenderChainKey`` uses the same two constants), an iteration
counter, a random 31-bit chain id, and an Ed25519 signing key. The member sends
:class:`SenderKeyDistribution` (chain id, iteration, chain key, public signing key) to every other
member over the pairwise sessions; each of them keeps it in a :class:`SenderKeyRecord` for that
sender and group.

Differences from libsignal, all in the message layer: the message key seed is expanded with
``HKDF-SHA256(salt = 32 zero bytes, ikm = seed, info = context("sender-message-keys"), L = 44)`` into
an AES-256-GCM-SIV key and nonce (libsignal: "WhisperGroup" into an AES-256-CBC key and IV); the
AEAD authenticates the caller's associated data and the message header; Ed25519 signs
``context("sender-key-message") || header || ciphertext``. AES-GCM-SIV (RFC 8452) is
nonce-misuse-resistant: a state restored from a backup that re-encrypts under a used message key
reveals at most whether two plaintexts were equal, never the plaintexts.

Encodings (msgpack)::

    SenderKeyDistribution [1, distribution_id(16), chain_id, iteration, chain_key(32), signing_public(32)]
    GroupMessage          [1, distribution_id(16), chain_id, iteration, ciphertext, signature(64)]
    header (AD and signed) pack([1, distribution_id, chain_id, iteration])

Bounds (libsignal ``consts::limits``): at most :data:`MAX_SENDER_KEY_STATES` chains per record
(the newest kept: messages in flight during a rotation still decrypt), at most
:data:`MAX_MESSAGE_KEYS` skipped message keys per chain (the oldest dropped), at most
:data:`MAX_FORWARD_JUMP` keys skipped by one message (libsignal allows 25,000; we use the pairwise
ratchet's bound). A message key is used once and deleted.

State is a value: every function returns a new :class:`SenderKeyRecord` and raises before returning,
so a refused message (bad signature, tampered, duplicate, too far ahead, unknown chain) leaves the
caller's record untouched. The signature is checked before any key is derived or stored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import InvalidSignature as _PycaInvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .encoding import context, expect_array, expect_bytes, expect_int, pack, unpack
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import (
    CryptoError,
    DecryptionError,
    DuplicateMessage,
    EncodingError,
    InvalidSignature,
    StateCorrupt,
    TooManySkipped,
    UnknownSenderKey,
)
from .ratchet import _kdf_ck

SENDER_KEY_VERSION: Final = 1
RECORD_VERSION: Final = 1
DISTRIBUTION_ID_LEN: Final = 16
CHAIN_KEY_LEN: Final = 32
SIGNATURE_LEN: Final = 64
MAX_SENDER_KEY_STATES: Final = 5      # libsignal consts::limits::MAX_SENDER_KEY_STATES
MAX_MESSAGE_KEYS: Final = 2000        # libsignal consts::limits::MAX_MESSAGE_KEYS (per chain)
MAX_FORWARD_JUMP: Final = 1000        # keys one message may skip (ratchet.MAX_SKIP_PER_CHAIN)
MAX_ITERATION: Final = (1 << 32) - 1  # libsignal: u32 iterations
MAX_CHAIN_ID: Final = (1 << 31) - 1   # libsignal: a random u32 with the top bit cleared
MAX_GROUP_MESSAGE: Final = 1 << 20

MESSAGE_KEYS_INFO: Final = context("sender-message-keys")
_SIGNATURE_LABEL: Final = context("sender-key-message")
_CHECKSUM_LABEL: Final = context("state-checksum/sender-keys")
_ZERO_SALT: Final = b"\x00" * 32
_SHA256: Final = hashes.SHA256()
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()
_EMPTY: Mapping[int, bytes] = MappingProxyType({})


# --- messages -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, repr=False)
class SenderKeyDistribution:
    """libsignal ``SenderKeyDistributionMessage``: what a member sends each other member, pairwise.
    It carries a chain key: only ever inside a pairwise session; ``repr`` hides it."""

    distribution_id: bytes
    chain_id: int
    iteration: int
    chain_key: bytes
    signing_public: bytes

    def encode(self) -> bytes:
        return pack([SENDER_KEY_VERSION, self.distribution_id, self.chain_id, self.iteration,
                     self.chain_key, self.signing_public])

    @classmethod
    def decode(cls, data: bytes) -> SenderKeyDistribution:
        a = expect_array(unpack(data, what="sender key distribution", max_size=256),
                         what="sender key distribution", version=SENDER_KEY_VERSION, length=6)
        signing_public = expect_bytes(a[5], what="sender signing key", length=32)
        _public_key(signing_public)
        return cls(
            distribution_id=expect_bytes(a[1], what="distribution id", length=DISTRIBUTION_ID_LEN),
            chain_id=expect_int(a[2], what="chain id", hi=MAX_CHAIN_ID),
            iteration=expect_int(a[3], what="iteration", hi=MAX_ITERATION),
            chain_key=expect_bytes(a[4], what="chain key", length=CHAIN_KEY_LEN),
            signing_public=signing_public,
        )

    def __repr__(self) -> str:
        return (f"SenderKeyDistribution(chain_id={self.chain_id}, iteration={self.iteration}, "
                f"chain_key=<hidden>)")


@dataclass(frozen=True, slots=True)
class GroupMessage:
    """libsignal ``SenderKeyMessage``: one ciphertext for the whole group, signed by the sender."""

    distribution_id: bytes
    chain_id: int
    iteration: int
    ciphertext: bytes
    signature: bytes

    def header(self) -> bytes:
        return pack([SENDER_KEY_VERSION, self.distribution_id, self.chain_id, self.iteration])

    def signed_part(self) -> bytes:
        return _SIGNATURE_LABEL + self.header() + self.ciphertext

    def encode(self) -> bytes:
        return pack([SENDER_KEY_VERSION, self.distribution_id, self.chain_id, self.iteration,
                     self.ciphertext, self.signature])

    @classmethod
    def decode(cls, data: bytes) -> GroupMessage:
        a = expect_array(unpack(data, what="group message", max_size=MAX_GROUP_MESSAGE),
                         what="group message", version=SENDER_KEY_VERSION, length=6)
        return cls(
            distribution_id=expect_bytes(a[1], what="distribution id", length=DISTRIBUTION_ID_LEN),
            chain_id=expect_int(a[2], what="chain id", hi=MAX_CHAIN_ID),
            # A sender's last message is MAX_ITERATION - 1 (group_encrypt stops there), so the
            # receiving chain's next iteration stays within what a record can store.
            iteration=expect_int(a[3], what="iteration", hi=MAX_ITERATION - 1),
            ciphertext=expect_bytes(a[4], what="group ciphertext", max_len=MAX_GROUP_MESSAGE),
            signature=expect_bytes(a[5], what="group signature", length=SIGNATURE_LEN),
        )


# --- state ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, repr=False)
class SenderKeyState:
    """libsignal ``SenderKeyState``: one chain of one sender. ``repr`` hides every key."""

    chain_id: int
    iteration: int                   # of the next message key (libsignal SenderChainKey.iteration)
    chain_key: bytes                 # CK at ``iteration``
    signing_public: bytes
    signing_private: bytes | None    # only in our own sending chain
    skipped: Mapping[int, bytes]     # iteration -> message key seed, oldest first

    def __repr__(self) -> str:
        return (f"SenderKeyState(chain_id={self.chain_id}, iteration={self.iteration}, "
                f"skipped={len(self.skipped)}, own={self.signing_private is not None}, keys=<hidden>)")


@dataclass(frozen=True, slots=True, repr=False)
class SenderKeyRecord:
    """libsignal ``SenderKeyRecord``: the chains of one sender in one group (one distribution id),
    newest last, at most :data:`MAX_SENDER_KEY_STATES`. Immutable; ``repr`` hides every key."""

    distribution_id: bytes
    states: tuple[SenderKeyState, ...]

    @property
    def current(self) -> SenderKeyState:
        if not self.states:
            raise UnknownSenderKey("no sender key state")
        return self.states[-1]

    def state_for(self, chain_id: int) -> SenderKeyState | None:
        for state in self.states:
            if state.chain_id == chain_id:
                return state
        return None

    def serialize(self) -> bytes:
        """``[1, body, SHA-256(context("state-checksum/sender-keys") || body)]``."""
        body = pack([self.distribution_id, [
            [s.chain_id, s.iteration, s.chain_key, s.signing_public, s.signing_private,
             [[i, mk] for i, mk in s.skipped.items()]] for s in self.states]])
        return pack([RECORD_VERSION, body, hashlib.sha256(_CHECKSUM_LABEL + body).digest()])

    @classmethod
    def deserialize(cls, data: bytes) -> SenderKeyRecord:
        """Rebuild a record; :class:`StateCorrupt` on any defect, never a partly loaded record."""
        try:
            return cls._deserialize(data)
        except StateCorrupt:
            raise
        except (CryptoError, ValueError, TypeError) as exc:
            raise StateCorrupt(f"sender key record: {exc}") from None

    @classmethod
    def _deserialize(cls, data: bytes) -> SenderKeyRecord:
        outer = expect_array(unpack(data, what="sender key record", max_size=1 << 20),
                             what="sender key record", version=RECORD_VERSION, length=3)
        body = expect_bytes(outer[1], what="sender key record body")
        checksum = expect_bytes(outer[2], what="sender key record checksum", length=32)
        if not hmac.compare_digest(hashlib.sha256(_CHECKSUM_LABEL + body).digest(), checksum):
            raise StateCorrupt("sender key record: checksum mismatch")
        a = unpack(body, what="sender key record body")
        if not isinstance(a, list) or len(a) != 2 or not isinstance(a[1], list) \
                or len(a[1]) > MAX_SENDER_KEY_STATES:
            raise StateCorrupt("sender key record: wrong structure")
        states = tuple(_state_from(item) for item in a[1])
        if len({s.chain_id for s in states}) != len(states):
            raise StateCorrupt("sender key record: chain id used twice")
        return cls(expect_bytes(a[0], what="distribution id", length=DISTRIBUTION_ID_LEN), states)

    def __repr__(self) -> str:
        return (f"SenderKeyRecord(distribution={self.distribution_id.hex()[:8]}, "
                f"chains={[s.chain_id for s in self.states]}, keys=<hidden>)")


def _state_from(item: Any) -> SenderKeyState:
    if not isinstance(item, list) or len(item) != 6:
        raise StateCorrupt("sender key record: bad state")
    signing_public = expect_bytes(item[3], what="signing public key", length=32)
    private = None if item[4] is None else expect_bytes(item[4], what="signing private key", length=32)
    if private is not None and _public_of(Ed25519PrivateKey.from_private_bytes(private)) != signing_public:
        raise StateCorrupt("sender key record: signing key halves do not match")
    _public_key(signing_public)
    skipped_list = item[5]
    if not isinstance(skipped_list, list) or len(skipped_list) > MAX_MESSAGE_KEYS:
        raise StateCorrupt("sender key record: bad skipped-key list")
    iteration = expect_int(item[1], what="iteration", hi=MAX_ITERATION)
    skipped: dict[int, bytes] = {}
    for entry in skipped_list:
        if not isinstance(entry, list) or len(entry) != 2:
            raise StateCorrupt("sender key record: bad skipped-key entry")
        i = expect_int(entry[0], what="skipped iteration", hi=MAX_ITERATION)
        if i >= iteration or i in skipped:
            raise StateCorrupt("sender key record: skipped key out of range or repeated")
        skipped[i] = expect_bytes(entry[1], what="skipped key", length=32)
    return SenderKeyState(
        chain_id=expect_int(item[0], what="chain id", hi=MAX_CHAIN_ID), iteration=iteration,
        chain_key=expect_bytes(item[2], what="chain key", length=CHAIN_KEY_LEN),
        signing_public=signing_public, signing_private=private,
        skipped=MappingProxyType(skipped) if skipped else _EMPTY,
    )


# --- group_session_builder / group_cipher -----------------------------------------------------------

def create_sender_key(distribution_id: bytes, *, entropy: Entropy = SYSTEM_ENTROPY) -> SenderKeyRecord:
    """Our own sending chain for one group (libsignal ``create_sender_key_distribution_message``
    when no state exists): a random chain id, chain key and signing key, iteration 0."""
    expect_bytes(distribution_id, what="distribution id", length=DISTRIBUTION_ID_LEN)
    return SenderKeyRecord(distribution_id, (_new_own_state(entropy),))


def rotate_sender_key(record: SenderKeyRecord, *, entropy: Entropy = SYSTEM_ENTROPY) -> SenderKeyRecord:
    """A fresh sending chain (after a member's removal, issue 12): new chain id, chain key and
    signing key. Earlier chains are dropped from our own record: we never decrypt our own sends."""
    state = _new_own_state(entropy)
    while record.state_for(state.chain_id) is not None:  # 2^-31 per try; never reuse an id
        state = _new_own_state(entropy)
    return SenderKeyRecord(record.distribution_id, (state,))


def distribution_message(record: SenderKeyRecord) -> SenderKeyDistribution:
    """What to send the other members (libsignal ``create_sender_key_distribution_message``): the
    current chain at its current iteration, so a new member cannot read earlier messages."""
    state = record.current
    if state.signing_private is None:
        raise CryptoError("not our own sender key: only its owner distributes it")
    return SenderKeyDistribution(record.distribution_id, state.chain_id, state.iteration,
                                 state.chain_key, state.signing_public)


def process_distribution(record: SenderKeyRecord | None,
                         distribution: SenderKeyDistribution) -> SenderKeyRecord:
    """Store a member's sender key (libsignal ``process_sender_key_distribution_message`` and
    ``SenderKeyRecord::add_sender_key_state``).

    A chain we already hold under the same signing key keeps its progress (a replayed or resent
    distribution cannot rewind it, so it cannot make us accept a message twice); a chain id reused
    with another signing key replaces the old chain; at most :data:`MAX_SENDER_KEY_STATES` are kept.
    """
    if record is not None and not hmac.compare_digest(record.distribution_id, distribution.distribution_id):
        raise CryptoError("sender key distribution for another group or sender")
    states = [] if record is None else list(record.states)
    existing = next((s for s in states if s.chain_id == distribution.chain_id
                     and hmac.compare_digest(s.signing_public, distribution.signing_public)), None)
    states = [s for s in states if s.chain_id != distribution.chain_id]
    states.append(existing or SenderKeyState(
        distribution.chain_id, distribution.iteration, distribution.chain_key,
        distribution.signing_public, None, _EMPTY))
    return SenderKeyRecord(distribution.distribution_id, tuple(states[-MAX_SENDER_KEY_STATES:]))


def group_encrypt(record: SenderKeyRecord, plaintext: bytes, ad: bytes) -> tuple[bytes, SenderKeyRecord]:
    """libsignal ``group_encrypt``: encrypt with the current chain's next message key, sign, and
    step the chain. ``ad`` (e.g. the group id and the sender's name) is authenticated."""
    state = record.current
    if state.signing_private is None:
        raise CryptoError("not our own sender key: cannot send with it")
    if state.iteration >= MAX_ITERATION:
        raise CryptoError("sender chain exhausted: rotate the sender key")
    mk, next_ck = _kdf_ck(state.chain_key)
    unsigned = GroupMessage(record.distribution_id, state.chain_id, state.iteration, b"", b"")
    ciphertext = _encrypt(mk, plaintext, ad + unsigned.header())
    unsigned = GroupMessage(record.distribution_id, state.chain_id, state.iteration, ciphertext, b"")
    signature = Ed25519PrivateKey.from_private_bytes(state.signing_private).sign(unsigned.signed_part())
    message = GroupMessage(record.distribution_id, state.chain_id, state.iteration, ciphertext, signature)
    new_state = SenderKeyState(state.chain_id, state.iteration + 1, next_ck, state.signing_public,
                               state.signing_private, state.skipped)
    return message.encode(), _with_state(record, new_state)


def group_decrypt(record: SenderKeyRecord, data: bytes, ad: bytes) -> tuple[bytes, SenderKeyRecord]:
    """libsignal ``group_decrypt``: find the chain, check the signature, then get the message key
    (a stored skipped one, or by stepping the chain, storing the keys skipped). Raises
    EncodingError, UnknownSenderKey, InvalidSignature, DuplicateMessage, TooManySkipped or
    DecryptionError; the input record is never modified."""
    message = GroupMessage.decode(data)
    if not hmac.compare_digest(message.distribution_id, record.distribution_id):
        raise UnknownSenderKey("group message for another group or sender")
    state = record.state_for(message.chain_id)
    if state is None:
        raise UnknownSenderKey("no sender key for this chain (a missed distribution): ask the "
                               "sender to resend it")
    try:
        _public_key(state.signing_public).verify(message.signature, message.signed_part())
    except _PycaInvalidSignature:
        raise InvalidSignature("group message: signature does not verify") from None
    mk, new_state = _message_key(state, message.iteration)
    plaintext = _decrypt(mk, message.ciphertext, ad + message.header())
    return plaintext, _with_state(record, new_state)


# --- helpers ----------------------------------------------------------------------------------------

def _message_key(state: SenderKeyState, iteration: int) -> tuple[bytes, SenderKeyState]:
    """libsignal ``get_sender_key``: the message key seed for ``iteration`` and the new state."""
    if iteration < state.iteration:
        mk = state.skipped.get(iteration)
        if mk is None:
            raise DuplicateMessage("group message already decrypted (or its key expired)")
        remaining = {i: k for i, k in state.skipped.items() if i != iteration}
        return mk, SenderKeyState(state.chain_id, state.iteration, state.chain_key, state.signing_public,
                                  state.signing_private, MappingProxyType(remaining) if remaining else _EMPTY)
    if iteration - state.iteration > MAX_FORWARD_JUMP:
        raise TooManySkipped(f"would skip {iteration - state.iteration} group message keys "
                             f"(limit {MAX_FORWARD_JUMP})")
    ck = state.chain_key
    skipped = dict(state.skipped)
    for i in range(state.iteration, iteration):
        seed, ck = _kdf_ck(ck)
        skipped[i] = seed
    mk, ck = _kdf_ck(ck)
    overflow = len(skipped) - MAX_MESSAGE_KEYS
    if overflow > 0:  # drop the oldest keys first
        for old in list(skipped)[:overflow]:
            del skipped[old]
    return mk, SenderKeyState(state.chain_id, iteration + 1, ck, state.signing_public, state.signing_private,
                              MappingProxyType(skipped) if skipped else _EMPTY)


def _with_state(record: SenderKeyRecord, state: SenderKeyState) -> SenderKeyRecord:
    return SenderKeyRecord(record.distribution_id,
                           tuple(state if s.chain_id == state.chain_id else s for s in record.states))


def _new_own_state(entropy: Entropy) -> SenderKeyState:
    signing = entropy.ed25519_private()
    chain_key = entropy.random_bytes(CHAIN_KEY_LEN)
    chain_id = int.from_bytes(entropy.random_bytes(4), "big") & MAX_CHAIN_ID
    if len(chain_key) != CHAIN_KEY_LEN:
        raise CryptoError("entropy returned a short chain key")
    return SenderKeyState(chain_id, 0, chain_key, _public_of(signing),
                          signing.private_bytes(_RAW, _RAW_PRIV, _NOENC), _EMPTY)


def _message_key_material(mk: bytes) -> tuple[bytes, bytes]:
    out = HKDF(_SHA256, 44, salt=_ZERO_SALT, info=MESSAGE_KEYS_INFO).derive(mk)
    return out[:32], out[32:]


def _encrypt(mk: bytes, plaintext: bytes, ad: bytes) -> bytes:
    key, nonce = _message_key_material(mk)
    return AESGCMSIV(key).encrypt(nonce, plaintext, ad)


def _decrypt(mk: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    key, nonce = _message_key_material(mk)
    try:
        return AESGCMSIV(key).decrypt(nonce, ciphertext, ad)
    except InvalidTag:
        raise DecryptionError("group message failed authentication") from None


def _public_of(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(_RAW, _RAW_PUB)


def _public_key(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise EncodingError("invalid Ed25519 public key") from None


__all__ = [
    "MAX_FORWARD_JUMP", "MAX_MESSAGE_KEYS", "MAX_SENDER_KEY_STATES", "GroupMessage", "SenderKeyDistribution",
    "SenderKeyRecord", "SenderKeyState", "create_sender_key", "distribution_message", "group_decrypt",
    "group_encrypt", "process_distribution", "rotate_sender_key",
]
