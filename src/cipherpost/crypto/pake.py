"""Contact verification with a shared password: SPAKE2 plus explicit key confirmation.

Two people who share a short password (said aloud, or agreed in person) prove to each other that
each holds the identity key the other has pinned, through a relay that may be hostile:

1. Both run SPAKE2 in its symmetric form (``spake2.SPAKE2_Symmetric``, the way magic-wormhole uses
   it) with ``idSymmetric = context("pake") + pack(sorted([name_a, name_b]))``. Each side's message
   is ``X* = x*G + pw*S``; the result ``K`` is equal on both sides only if the passwords are equal.
2. Key confirmation (RFC 9382 section 4 does the same with its ``KcA``/``KcB``): ::

       transcript = pack([sorted([[name, identity.encode()], [name, identity.encode()]]),
                          min(msg1, msg2), max(msg1, msg2)])
       kc         = HKDF-SHA256(K, salt=none, info=context("pake-confirm"), 32)
       mac(name)  = HMAC-SHA256(kc, b"confirm" || pack(name) || transcript)

   Each side sends ``mac(my_name)`` and checks the peer's against ``mac(peer_name)``, so a
   reflected MAC fails. The transcript holds the identity keys *each side believes in*: if the relay
   substituted a key, the two transcripts differ and both confirmations fail, exactly as they do
   for a wrong password. The two failures are indistinguishable (same error, same message).
3. On success: ``psk = HKDF-SHA256(K, salt=none, info=context("pake-psk") || transcript, 32)``;
   the client mixes it into the next PQXDH session (see ``docs/verification.md``).

Sans-I/O: the caller carries the returned bytes between the two people. One instance runs once.
"""

from __future__ import annotations

import enum
import hmac
import unicodedata

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as pyca_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_Symmetric

from .encoding import context, pack
from .errors import VerificationFailed
from .identity import PublicIdentity

PSK_LEN = 32
MAC_LEN = 32
# spake2's Ed25519 group: one side byte (b"S" for the symmetric mode) and a 32-byte element.
SPAKE2_MESSAGE_LEN = 33
_SYMMETRIC_SIDE = b"S"

_FAILED = "contact verification failed: the password or a key does not match, or the exchange was altered"
_MALFORMED = "contact verification failed: malformed message from the peer"


class _State(enum.Enum):
    NEW = "new"
    STARTED = "started"
    FINISHED = "finished"
    CONFIRMED = "confirmed"
    FAILED = "failed"


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def _normalised_password(password: str) -> bytes:
    if not isinstance(password, str) or not password:
        raise ValueError("password must be a non-empty str")
    return unicodedata.normalize("NFC", password).encode("utf-8")


class PakeVerifier:
    """One side of one verification run. ``repr`` shows names and state, never secrets."""

    __slots__ = (
        "_kc",
        "_key",
        "_my_message",
        "_my_name",
        "_pairs",
        "_peer_name",
        "_spake",
        "_state",
        "_transcript",
    )

    def __init__(self, password: str, my_name: str, my_identity: PublicIdentity, peer_name: str,
                 peer_identity: PublicIdentity) -> None:
        if my_name == peer_name:
            raise ValueError("my_name and peer_name must differ")
        self._my_name = my_name
        self._peer_name = peer_name
        self._pairs = sorted([[my_name, my_identity.encode()], [peer_name, peer_identity.encode()]])
        id_symmetric = context("pake") + pack(sorted([my_name, peer_name]))
        self._spake: SPAKE2_Symmetric | None = SPAKE2_Symmetric(
            _normalised_password(password), idSymmetric=id_symmetric)
        self._my_message = b""
        self._key: bytes | None = None
        self._kc: bytes | None = None
        self._transcript = b""
        self._state = _State.NEW

    def start(self) -> bytes:
        """Our SPAKE2 message, to send to the peer."""
        if self._state is not _State.NEW or self._spake is None:
            raise RuntimeError("PakeVerifier.start() may only be called once, first")
        self._my_message = bytes(self._spake.start())
        self._state = _State.STARTED
        return self._my_message

    def finish(self, peer_message: bytes) -> bytes:
        """Process the peer's SPAKE2 message; returns our confirmation MAC to send to the peer.

        Raises VerificationFailed if the message is malformed (or our own, reflected back).
        """
        if self._state is not _State.STARTED or self._spake is None:
            raise RuntimeError("PakeVerifier.finish() must be called once, after start()")
        spake, self._spake = self._spake, None  # one use: the object holds the password
        if (not isinstance(peer_message, bytes) or len(peer_message) != SPAKE2_MESSAGE_LEN
                or peer_message[:1] != _SYMMETRIC_SIDE or peer_message == self._my_message):
            self._state = _State.FAILED
            raise VerificationFailed(_MALFORMED)
        try:
            key = bytes(spake.finish(peer_message))
        except Exception:  # spake2 raises ValueError/SPAKEError/... for bad group elements
            self._state = _State.FAILED
            raise VerificationFailed(_MALFORMED) from None
        low, high = sorted([self._my_message, peer_message])
        self._transcript = pack([self._pairs, low, high])
        self._key = key
        self._kc = _hkdf(key, context("pake-confirm"))
        self._state = _State.FINISHED
        return self._mac(self._my_name)

    def confirm(self, peer_confirmation: bytes) -> bytes:
        """Check the peer's confirmation MAC; returns the 32-byte PSK, else VerificationFailed."""
        if self._state is _State.FAILED:
            raise VerificationFailed(_FAILED)
        if self._state is not _State.FINISHED or self._key is None:
            raise RuntimeError("PakeVerifier.confirm() must be called once, after finish()")
        expected = self._mac(self._peer_name)
        key = self._key
        self._key = self._kc = None
        ok = isinstance(peer_confirmation, bytes) and hmac.compare_digest(peer_confirmation, expected)
        if not ok:
            self._state = _State.FAILED
            raise VerificationFailed(_FAILED)
        self._state = _State.CONFIRMED
        return _hkdf(key, context("pake-psk") + self._transcript)

    def _mac(self, name: str) -> bytes:
        if self._kc is None:
            raise RuntimeError("PakeVerifier: no confirmation key")
        mac = pyca_hmac.HMAC(self._kc, hashes.SHA256())
        mac.update(b"confirm" + pack(name) + self._transcript)
        return mac.finalize()

    def __repr__(self) -> str:
        return (f"PakeVerifier(me={self._my_name!r}, peer={self._peer_name!r}, "
                f"state={self._state.value}, secrets=<hidden>)")
