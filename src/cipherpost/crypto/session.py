"""Sessions: PQXDH to start, the Double Ratchet for every message, and the envelope encoding.

This is what the client uses. A :class:`Session` is immutable; :func:`encrypt` / :func:`decrypt`
return a new one, which the client persists (before transmitting / before acknowledging).

Envelope (msgpack)::

    [1, session_id(16), initial_message|nil, header, ciphertext]

- ``session_id = SHA-256(context("session-id") || EK_A || AD)[:16]``: both sides compute it from the
  initial message, so the recipient can route an envelope to its session before decrypting.
- ``initial_message`` (:meth:`InitialMessage.encode`) is carried by every envelope the initiator
  sends until it has decrypted a first reply (PQXDH spec 3.3: Alice sends the initial message
  with her first ciphertext; repeating it lets any of those envelopes start the session, whichever
  arrives first). The responder checks that a repeated copy is byte-identical to the one that
  started the session.
- ``header`` is :meth:`Header.encode`, ``ciphertext`` the AES-256-GCM output of the ratchet; the
  ratchet's associated data is the PQXDH AD (``Encode(IK_A) || Encode(IK_B)``), spec 3.3 / Double
  Ratchet 5.1.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from .encoding import context, expect_array, expect_bool, expect_bytes, pack, unpack
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import CryptoError, DecryptionError, EncodingError, StateCorrupt
from .identity import IdentityKeyPair, PublicIdentity
from .pqxdh import InitialMessage, initiate, respond
from .prekey_store import PrekeyStore
from .prekeys import PrekeyBundle
from .ratchet import Header, RatchetState, init_receiver, init_sender, ratchet_decrypt, ratchet_encrypt

ENVELOPE_VERSION = 1
SESSION_VERSION = 1
SESSION_ID_LEN = 16
MAX_ENVELOPE = 1 << 20
_SESSION_ID_LABEL = context("session-id")
_CHECKSUM_LABEL = context("state-checksum/session")
_RAW = serialization.Encoding.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()


def session_id_for(ephemeral: bytes, ad: bytes) -> bytes:
    """``SHA-256(context("session-id") || EK_A || AD)[:16]``."""
    return hashlib.sha256(_SESSION_ID_LABEL + ephemeral + ad).digest()[:SESSION_ID_LEN]


@dataclass(frozen=True, slots=True, repr=False)
class Session:
    """One end of a conversation. Immutable; ``repr`` hides every key."""

    session_id: bytes
    peer: PublicIdentity
    ad: bytes                       # PQXDH associated data, the ratchet's AD
    initiator: bool
    ratchet: RatchetState
    pending_initial: bytes | None   # encoded InitialMessage, initiator only, until a reply decrypts
    initial_digest: bytes           # SHA-256 of the encoded InitialMessage that started the session

    @property
    def awaiting_reply(self) -> bool:
        """True while our envelopes still carry the initial message (initiator before any reply)."""
        return self.pending_initial is not None

    def serialize(self) -> bytes:
        """``[1, body, SHA-256(context("state-checksum/session") || body)]``, see docs/protocol.md."""
        body = pack([self.session_id, self.peer.encode(), self.ad, self.initiator, self.pending_initial,
                     self.initial_digest, self.ratchet.serialize()])
        return pack([SESSION_VERSION, body, hashlib.sha256(_CHECKSUM_LABEL + body).digest()])

    @classmethod
    def deserialize(cls, data: bytes) -> Session:
        """Rebuild a session; :class:`StateCorrupt` on any defect, never a partly loaded session."""
        try:
            return cls._deserialize(data)
        except StateCorrupt:
            raise
        except (CryptoError, ValueError, TypeError) as exc:
            raise StateCorrupt(f"session: {exc}") from None

    @classmethod
    def _deserialize(cls, data: bytes) -> Session:
        outer = expect_array(unpack(data, what="session", max_size=2 << 20), what="session",
                             version=SESSION_VERSION, length=3)
        body = expect_bytes(outer[1], what="session body", max_len=2 << 20)
        checksum = expect_bytes(outer[2], what="session checksum", length=32)
        if not hmac.compare_digest(hashlib.sha256(_CHECKSUM_LABEL + body).digest(), checksum):
            raise StateCorrupt("session: checksum mismatch")
        a = unpack(body, what="session body", max_size=2 << 20)
        if not isinstance(a, list) or len(a) != 7:
            raise StateCorrupt("session: wrong structure")
        peer_bytes = expect_bytes(a[1], what="session peer", max_len=512)
        ad = expect_bytes(a[2], what="session AD", max_len=1024)
        initiator = expect_bool(a[3], what="session initiator")
        # The AD is Encode(IK_A) || Encode(IK_B): the peer is the second half for the initiator.
        if not (ad.endswith(peer_bytes) if initiator else ad.startswith(peer_bytes)):
            raise StateCorrupt("session: AD does not name the peer")
        pending = None if a[4] is None else expect_bytes(a[4], what="session initial message", max_len=4096)
        if pending is not None and not initiator:
            raise StateCorrupt("session: responder with a pending initial message")
        return cls(
            session_id=expect_bytes(a[0], what="session id", length=SESSION_ID_LEN),
            peer=PublicIdentity.decode(peer_bytes),
            ad=ad,
            initiator=initiator,
            ratchet=RatchetState.deserialize(expect_bytes(a[6], what="session ratchet")),
            pending_initial=pending,
            initial_digest=expect_bytes(a[5], what="session initial digest", length=32),
        )

    def __repr__(self) -> str:
        return (f"Session(id={self.session_id.hex()}, peer={self.peer.short_id()}, "
                f"initiator={self.initiator}, awaiting_reply={self.awaiting_reply}, {self.ratchet!r})")


@dataclass(frozen=True, slots=True)
class EnvelopeInfo:
    session_id: bytes
    initial: InitialMessage | None


@dataclass(frozen=True, slots=True)
class _Envelope:
    session_id: bytes
    initial: bytes | None
    header: Header
    ciphertext: bytes


def initiate_session(me: IdentityKeyPair, bundle: PrekeyBundle, *, psk: bytes | None = None,
                     entropy: Entropy = SYSTEM_ENTROPY) -> Session:
    """Alice: PQXDH spec 3.3, then Double Ratchet spec 3.3 RatchetInitAlice with Bob's SPK."""
    sk, ad, msg = initiate(me, bundle, psk=psk, entropy=entropy)
    ratchet = init_sender(sk, bundle.signed_prekey.public, entropy=entropy)
    initial = msg.encode()
    return Session(
        session_id=session_id_for(msg.ephemeral, ad), peer=bundle.identity, ad=ad, initiator=True,
        ratchet=ratchet, pending_initial=initial, initial_digest=hashlib.sha256(initial).digest(),
    )


def encrypt(session: Session, plaintext: bytes, *,
            entropy: Entropy = SYSTEM_ENTROPY) -> tuple[bytes, Session]:
    """Encrypt one message; returns the envelope and the advanced session."""
    header, ciphertext, ratchet = ratchet_encrypt(session.ratchet, plaintext, session.ad, entropy=entropy)
    envelope = pack([ENVELOPE_VERSION, session.session_id, session.pending_initial, header.encode(),
                     ciphertext])
    return envelope, Session(session.session_id, session.peer, session.ad, session.initiator, ratchet,
                             session.pending_initial, session.initial_digest)


def decrypt(session: Session, envelope: bytes, *,
            entropy: Entropy = SYSTEM_ENTROPY) -> tuple[bytes, Session]:
    """Decrypt one envelope of this session (EncodingError, DecryptionError and its subclasses)."""
    env = _parse(envelope)
    if not hmac.compare_digest(env.session_id, session.session_id):
        raise DecryptionError("envelope belongs to another session")
    if env.initial is not None and (
        session.initiator or not hmac.compare_digest(hashlib.sha256(env.initial).digest(),
                                                     session.initial_digest)):
        raise DecryptionError("envelope carries an initial message that did not start this session")
    plaintext, ratchet = ratchet_decrypt(session.ratchet, env.header, env.ciphertext, session.ad,
                                         entropy=entropy)
    # Once the initiator has decrypted a reply, the responder provably holds the session.
    return plaintext, Session(session.session_id, session.peer, session.ad, session.initiator, ratchet,
                              None, session.initial_digest)


def accept_session(me: IdentityKeyPair, store: PrekeyStore, envelope: bytes, *, psk: bytes | None = None,
                   entropy: Entropy = SYSTEM_ENTROPY) -> tuple[bytes, Session, PrekeyStore]:
    """Bob: PQXDH spec 3.4, RatchetInitBob with the SPK, then decrypt the carried message.

    Returns ``(plaintext, session, new store)``; the new store lacks the used one-time prekeys, so
    a replayed initial envelope raises PrekeyNotFound. The caller persists session and store together.
    """
    env = _parse(envelope)
    if env.initial is None:
        raise EncodingError("envelope does not carry an initial message")
    msg = InitialMessage.decode(env.initial)
    sk, ad, new_store = respond(me, store, msg, psk=psk)
    if not hmac.compare_digest(session_id_for(msg.ephemeral, ad), env.session_id):
        raise DecryptionError("envelope session id does not match its initial message")
    spk_private = store.signed_prekey_private(msg.signed_prekey_id).private_bytes(_RAW, _RAW_PRIV, _NOENC)
    ratchet = init_receiver(sk, spk_private)
    plaintext, ratchet = ratchet_decrypt(ratchet, env.header, env.ciphertext, ad, entropy=entropy)
    session = Session(
        session_id=env.session_id, peer=msg.identity, ad=ad, initiator=False, ratchet=ratchet,
        pending_initial=None, initial_digest=hashlib.sha256(env.initial).digest(),
    )
    return plaintext, session, new_store


def inspect_envelope(envelope: bytes) -> EnvelopeInfo:
    """Parse without decrypting (EncodingError on any defect), so the client can route it."""
    env = _parse(envelope)
    return EnvelopeInfo(env.session_id, None if env.initial is None else InitialMessage.decode(env.initial))


def envelope_session_id(envelope: bytes) -> bytes:
    """The session id alone (EncodingError on a malformed envelope): unlike ``inspect_envelope`` it
    does not decode (and verify the identity in) a carried initial message, so routing a message of
    a known session costs no signature check (nor a header decode: ``decrypt`` parses it all)."""
    a = expect_array(unpack(envelope, what="envelope", max_size=MAX_ENVELOPE), what="envelope",
                     version=ENVELOPE_VERSION, length=5)
    return expect_bytes(a[1], what="envelope session id", length=SESSION_ID_LEN)


def _parse(envelope: bytes) -> _Envelope:
    a = expect_array(unpack(envelope, what="envelope", max_size=MAX_ENVELOPE), what="envelope",
                     version=ENVELOPE_VERSION, length=5)
    return _Envelope(
        session_id=expect_bytes(a[1], what="envelope session id", length=SESSION_ID_LEN),
        initial=None if a[2] is None else expect_bytes(a[2], what="envelope initial message", max_len=4096),
        header=Header.decode(expect_bytes(a[3], what="envelope header", max_len=128)),
        ciphertext=expect_bytes(a[4], what="envelope ciphertext", max_len=MAX_ENVELOPE),
    )
