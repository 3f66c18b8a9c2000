"""Fuzz targets: every decoder that reads bytes from the network or the disk, one function each.

Shared by the Hypothesis tests in this folder (quick, in the normal suite) and by
``bench/fuzz.py`` (long coverage-guided campaigns with atheris). A target takes ``bytes``, feeds
them to one decoder and lets through only the error types that decoder documents; anything else
(``IndexError``, ``KeyError``, ``ValueError``, ``TypeError``, ``OverflowError``, ``RecursionError``
...) escapes and is a finding. Each target also names valid inputs (``seeds``), which the tests
mutate and the campaigns start their corpus from.

Checksummed state blobs get two targets: the blob as stored (a mutation almost always only trips
the checksum) and ``*_body``, which wraps the fuzzed bytes in a correct checksum so the structural
checks behind it are reached too.

The fixtures (identities, sessions, prekeys) are made once per process, from fixed private keys
where the API allows it; ML-KEM encapsulation is random in pyca, so session ciphertexts differ
between runs (a crash in a decrypting target is reproduced by its exception, not byte for byte).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cipherpost.client.verification import PakeMailbox
from cipherpost.crypto import sender_keys as SK
from cipherpost.crypto import session as S
from cipherpost.crypto import stream
from cipherpost.crypto.encoding import context, pack, unpack
from cipherpost.crypto.errors import (
    BundleError,
    CryptoError,
    DecryptionError,
    EncodingError,
    InvalidSignature,
    StateCorrupt,
    StreamError,
    VerificationFailed,
    WrongPassphrase,
)
from cipherpost.crypto.identity import IdentityKeyPair, PublicIdentity
from cipherpost.crypto.keystore import Argon2Params, keystore_params, open_keystore, seal_keystore
from cipherpost.crypto.pake import PakeVerifier
from cipherpost.crypto.pqxdh import InitialMessage
from cipherpost.crypto.prekey_store import PrekeyStore
from cipherpost.crypto.prekeys import KemPrekey, OneTimePrekey, PrekeyBundle, SignedPrekey
from cipherpost.crypto.ratchet import Header, RatchetState
from cipherpost.crypto.records import RecordCipher
from cipherpost.crypto.sealed import SealSuite, generate_seal_keypair, open_sealed, seal
from cipherpost.protocol import frames as F
from cipherpost.protocol.errors import ProtocolError

# Key store blobs naming more than this are only parsed, not opened: honouring the parameters a
# blob names is the documented behaviour (bounded by keystore.MAX_MEMORY_KIB, 4 GiB), and a campaign
# must not spend minutes in one Argon2 call.
FUZZ_MAX_ARGON2_KIB = 256
FUZZ_MAX_ARGON2_PASSES = 2
PASSPHRASE = "correct horse battery staple"
RECORD_AAD = b"session:alice"
SEAL_INFO = b"fuzz"


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    run: Callable[[bytes], Any]              # feeds the decoder; returns its result (or None)
    allowed: tuple[type[BaseException], ...]  # what the decoder documents it raises
    seeds: Callable[[], list[bytes]]         # valid inputs (each must decode without error)
    slow: bool = False                       # milliseconds per input (pure-Python SPAKE2): fewer examples

    def check(self, data: bytes) -> Any:
        """Run the decoder; swallow only the documented errors (anything else propagates)."""
        try:
            return self.run(data)
        except self.allowed:
            return None


# --- fixtures (made once per process) -------------------------------------------------------------

ALICE = IdentityKeyPair.from_private_bytes(b"\x11" * 32, b"\x12" * 32)
BOB = IdentityKeyPair.from_private_bytes(b"\x21" * 32, b"\x22" * 32)


@dataclass(frozen=True, slots=True)
class World:
    bundle: PrekeyBundle
    bundle_parts: tuple[bytes, bytes, bytes, bytes | None]
    store: PrekeyStore                   # Bob's store before the first message
    initial_envelopes: list[bytes]       # Alice -> Bob, each carrying the initial message
    alice: S.Session                     # after Bob's reply was decrypted
    bob: S.Session
    envelopes_to_bob: list[bytes]        # later envelopes, in order (not yet decrypted by ``bob``)
    envelopes_to_alice: list[bytes]


@functools.cache
def world() -> World:
    store = PrekeyStore.empty()
    spk, store = store.rotate_signed_prekey(BOB, 1_700_000_000)
    opks, store = store.new_one_time_prekeys(2)
    kems, store = store.new_kem_prekeys(BOB, 1)
    _, store = store.new_last_resort_kem_prekey(BOB)
    bundle = PrekeyBundle(BOB.public, spk, kems[0], opks[0])
    parts = (BOB.public.encode(), spk.encode(), kems[0].encode(), opks[0].encode())
    alice = S.initiate_session(ALICE, bundle)
    initial = []
    for text in (b"hello", b"again"):
        env, alice = S.encrypt(alice, text)
        initial.append(env)
    _, bob, _ = S.accept_session(BOB, store, initial[0])
    _, bob = S.decrypt(bob, initial[1])
    reply, bob = S.encrypt(bob, b"hi alice")
    _, alice = S.decrypt(alice, reply)
    to_bob, to_alice = [], []
    for i in range(3):
        env, alice = S.encrypt(alice, b"to bob %d" % i)
        to_bob.append(env)
    for i in range(2):
        env, bob = S.encrypt(bob, b"to alice %d" % i)
        to_alice.append(env)
    return World(bundle, parts, store, initial, alice, bob, to_bob, to_alice)


def _with_checksum(label: str, version: int, body: bytes) -> bytes:
    return pack([version, body, hashlib.sha256(context(label) + body).digest()])


def _body_of(blob: bytes) -> bytes:
    body = unpack(blob, what="seed")[1]
    assert isinstance(body, bytes)
    return body


# --- wire frames (protocol/frames.py) --------------------------------------------------------------

def frame_samples() -> list[F.Frame]:
    """One valid frame of every type, both directions (used as seeds and in round-trip tests)."""
    w = world()
    b = w.bundle_parts
    msg = F.DeliveredMessage(seq=7, sender="alice", id=b"\x01" * 16, kind="msg",
                             body=w.envelopes_to_bob[0], ts=1_700_000_000_000)
    return [
        F.Register(rid=1, username="alice", identity=ALICE.public.encode(), sig=b"\x02" * 64,
                   invite="inv-123"),
        F.Auth(rid=2, username="alice", sig=b"\x03" * 64),
        F.UploadPrekeys(rid=3, signed_prekey=b[1], one_time=[b[3] or b""], kem_one_time=[b[2]],
                        kem_last_resort=b[2], replace=True),
        F.FetchBundle(rid=4, username="bob"),
        F.Send(rid=5, to="bob", id=b"\x04" * 16, kind="msg", body=w.envelopes_to_bob[0]),
        F.Send(rid=6, to="bob", id=b"\x05" * 16, kind="pake", body=b"\x94\x01"),
        F.Ack(seqs=[1, 2, 3]),
        F.Ping(rid=7),
        F.Block(rid=14, username="mallory", on=True),
        F.SendMany(rid=15, id=b"\x08" * 16, kind="msg", body=b"\x01" * 40, to=["bob", "carol"]),
        F.Hello(nonce=b"\x06" * 32, server="cipherpost", limits=F.Limits(262144, 65536),
                caps=["block", "send_many"]),
        F.Results(rid=16, id=b"\x08" * 16, status=["accepted", "mailbox_full"]),
        F.Auth(rid=17, username="alice", sig=b"\x03" * 64, counter=12),
        F.Register(rid=18, username="alice", identity=ALICE.public.encode(), sig=b"\x02" * 64,
                   recovery_public=b"\x08" * 32),
        F.SetRecovery(rid=19, recovery_public=b"\x08" * 32, sig=b"\x09" * 64),
        F.Recover(rid=20, username="alice", identity=ALICE.public.encode(), recovery_sig=b"\x0a" * 64,
                  sig=b"\x0b" * 64),
        F.DeleteAccount(rid=21, sig=b"\x0c" * 64),
        F.Hello(nonce=b"\x06" * 32, server="cipherpost", limits=F.Limits(262144, 65536),
                caps=["accounts", "login_counter", "epoch"], epoch=b"\x0d" * 16),
        F.Ok(rid=8, username="alice", prekeys=F.PrekeyCounts(one_time=5, kem=2)),
        F.Ok(rid=9),
        F.Bundle(rid=10, username="bob", identity=b[0], signed_prekey=b[1], kem_prekey=b[2],
                 one_time_prekey=b[3]),
        F.Accepted(rid=11, id=b"\x07" * 16),
        F.Pong(rid=12),
        F.Deliver(messages=[msg, msg]),
        F.PrekeysLow(one_time=1, kem=0),
        F.Drained(),
        F.Error(rid=None, code="bad_frame", message="nope"),
        F.Error(rid=13, code="rate_limited", message="slow down"),
        # cap "blobs" (issue 13): a 16-byte blob id, chunks of opaque ciphertext
        F.BlobBegin(rid=17, id=b"\x09" * 16, size=200_000, chunk_size=65_552),
        F.BlobPut(rid=18, id=b"\x09" * 16, index=0, data=b"\x0a" * 300),
        F.BlobHeld(rid=19, id=b"\x09" * 16),
        F.BlobCommit(rid=20, id=b"\x09" * 16, to=["bob", "carol"]),
        F.BlobGet(rid=21, id=b"\x09" * 16, index=2),
        F.BlobRelease(rid=22, id=b"\x09" * 16),
        F.BlobState(rid=17, id=b"\x09" * 16, size=200_000, chunk_size=65_552, held=3, committed=False),
        F.BlobData(rid=21, id=b"\x09" * 16, index=2, data=b"\x0b" * 300),
        # cap "batch" (issue 11): several envelopes in one send frame, one reply
        F.SendBatch(rid=23, envelopes=[F.Envelope(to="bob", id=b"\x0c" * 16, kind="msg", body=b"\x01" * 40),
                                       F.Envelope(to="carol", id=b"\x0d" * 16, kind="msg", body=b"")]),
        F.AcceptedMany(rid=23, ids=[b"\x0c" * 16, b"\x0d" * 16], status=["accepted", "mailbox_full"]),
    ]


def _frame(data: bytes) -> F.Frame:
    frame = F.decode_frame(data)
    # The fast paths must agree with the per-field decoders they mirror.
    if isinstance(frame, F.Send | F.Ack):
        m = unpack(data, what="frame", max_size=F.DEFAULT_MAX_FRAME)
        slow = F._DECODERS[frame.t](F._Fields(frame.t, m, None))
        assert slow == frame, "fast path and per-field decoder disagree"
    return frame


def _fields_of(t: str) -> Callable[[bytes], F.Frame]:
    """A frame of type ``t`` built around fuzzed field values: reaches the fast paths of the relay's
    two hottest decodes (``send``, ``ack``) and the per-field checks behind them."""
    def run(data: bytes) -> F.Frame:
        try:
            m = unpack(data, what="fields", max_size=F.DEFAULT_MAX_FRAME)
        except EncodingError:
            m = data
        fields = m if isinstance(m, dict) else {"seqs" if t == "ack" else "to": m}
        return _frame(pack(dict(fields, v=1, t=t)))
    return run


def _bundle(data: bytes) -> PrekeyBundle | None:
    """``PrekeyBundle.from_parts`` on four fields as a bundle frame carries them (bytes; the last
    may be missing): the frame decoder has already checked their types."""
    try:
        parts = unpack(data, what="bundle parts")
    except EncodingError:
        return None
    if not (isinstance(parts, list) and len(parts) == 4 and all(type(p) is bytes for p in parts[:3])
            and (parts[3] is None or type(parts[3]) is bytes)):
        return None
    return PrekeyBundle.from_parts(*parts)


# --- envelopes and sessions (crypto/session.py, crypto/pqxdh.py) -----------------------------------

def _envelope_decrypt(data: bytes) -> bytes:
    w = world()
    return S.decrypt(w.bob, data)[0]


def _envelope_accept(data: bytes) -> bytes:
    w = world()
    return S.accept_session(BOB, w.store, data)[0]


# --- key store (crypto/keystore.py) ----------------------------------------------------------------

FUZZ_KEYSTORE_PARAMS = Argon2Params(memory_kib=64, iterations=1, lanes=1)


def _keystore(data: bytes) -> bytes | None:
    params = keystore_params(data)
    if params.memory_kib > FUZZ_MAX_ARGON2_KIB or params.iterations > FUZZ_MAX_ARGON2_PASSES:
        return None
    return open_keystore(PASSPHRASE, data)


@functools.cache
def _keystore_seeds() -> list[bytes]:
    return [seal_keystore(PASSPHRASE, pack([1, "alice", b"\x01" * 32, b"\x02" * 32, b"\x03" * 32]),
                          params=FUZZ_KEYSTORE_PARAMS),
            seal_keystore(PASSPHRASE, b"", params=Argon2Params(memory_kib=32, iterations=1, lanes=4))]


# --- records, sealed HPKE ---------------------------------------------------------------------------

RECORD_KEY = b"\x33" * 32
_RECORDS = RecordCipher(RECORD_KEY)


@functools.cache
def _seal_keys() -> dict[SealSuite, tuple[bytes, bytes]]:
    return {suite: generate_seal_keypair(suite) for suite in SealSuite}


def _sealed(suite: SealSuite) -> Callable[[bytes], bytes]:
    def run(data: bytes) -> bytes:
        return open_sealed(suite, _seal_keys()[suite][0], data, info=SEAL_INFO)
    return run


def _sealed_seeds(suite: SealSuite) -> Callable[[], list[bytes]]:
    def seeds() -> list[bytes]:
        public = _seal_keys()[suite][1]
        return [seal(suite, public, pt, info=SEAL_INFO) for pt in (b"", b"sealed sender")]
    return seeds


# --- PAKE (crypto/pake.py, client/verification.py) ---------------------------------------------------

def _pake_finish(data: bytes) -> bytes:
    v = PakeVerifier("pw", "alice", ALICE.public, "bob", BOB.public)
    v.start()
    return v.finish(data)


@functools.cache
def _pake_peer_message() -> bytes:
    return PakeVerifier("pw", "bob", BOB.public, "alice", ALICE.public).start()


PEER_MAC = b"<the peer's real confirmation MAC>"


def _pake_confirm(data: bytes) -> bytes:
    """An honest exchange (SPAKE2 draws its own randomness, so a fresh one per call), then our
    side checks ``data`` as the peer's confirmation; the seed :data:`PEER_MAC` stands for the real one."""
    alice = PakeVerifier("pw", "alice", ALICE.public, "bob", BOB.public)
    bob = PakeVerifier("pw", "bob", BOB.public, "alice", ALICE.public)
    msg_a, msg_b = alice.start(), bob.start()
    alice.finish(msg_b)
    real = bob.finish(msg_a)
    return alice.confirm(real if data == PEER_MAC else data)


def _pake_mailbox(data: bytes) -> str | None:
    return PakeMailbox().put("bob", data, 0)


# --- file streams (crypto/stream.py) -----------------------------------------------------------------

STREAM_KEY = b"\x44" * 32


def _stream(data: bytes) -> bytes:
    """Decrypt ``data`` as a whole age payload (16-byte nonce then chunks of up to 64 KiB + 16)."""
    return stream.decrypt_payload(STREAM_KEY, data)


def _stream_seeds() -> list[bytes]:
    nonce = b"\x55" * stream.PAYLOAD_NONCE_LEN
    return [stream.encrypt_payload(STREAM_KEY, pt, nonce=nonce)
            for pt in (b"", b"x", bytes(range(256)) * 300)]


# --- group sender keys (crypto/sender_keys.py) -------------------------------------------------------

GROUP_AD = b"group id || alice"


@dataclass(frozen=True, slots=True)
class Group:
    sender: SK.SenderKeyRecord
    member: SK.SenderKeyRecord           # holds the distribution, has decrypted messages[2] only
    distribution: bytes
    messages: list[bytes]


@functools.cache
def group() -> Group:
    sender = SK.create_sender_key(b"\x66" * 16)
    distribution = SK.distribution_message(sender)
    member = SK.process_distribution(None, distribution)
    messages = []
    for i in range(4):
        msg, sender = SK.group_encrypt(sender, b"group message %d" % i, GROUP_AD)
        messages.append(msg)
    _, member = SK.group_decrypt(member, messages[2], GROUP_AD)
    return Group(sender, member, distribution.encode(), messages)


def _group_decrypt(data: bytes) -> bytes:
    return SK.group_decrypt(group().member, data, GROUP_AD)[0]


# --- the table ----------------------------------------------------------------------------------------

def _w(f: Callable[[World], list[bytes]]) -> Callable[[], list[bytes]]:
    return lambda: f(world())


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("frame", _frame, (ProtocolError,),
           lambda: [F.encode_frame(f) for f in frame_samples()]),
    Target("frame_send_fields", _fields_of("send"), (ProtocolError,),
           lambda: [pack({"rid": 1, "to": "bob", "id": b"\x01" * 16, "kind": "msg", "body": b"x"})]),
    Target("frame_ack_fields", _fields_of("ack"), (ProtocolError,),
           lambda: [pack({"seqs": [1, 2, (1 << 63) - 1]}), pack({"seqs": []})]),
    Target("envelope_inspect", S.inspect_envelope, (EncodingError,),
           _w(lambda w: w.initial_envelopes + w.envelopes_to_bob)),
    Target("envelope_decrypt", _envelope_decrypt, (EncodingError, DecryptionError),
           _w(lambda w: w.envelopes_to_bob)),
    # accept_session documents EncodingError, DecryptionError and PrekeyNotFound (its pqxdh.respond).
    Target("envelope_accept", _envelope_accept, (CryptoError,), _w(lambda w: w.initial_envelopes)),
    Target("initial_message", InitialMessage.decode, (EncodingError,),
           _w(lambda w: [S.inspect_envelope(w.initial_envelopes[0]).initial.encode()])),  # type: ignore[union-attr]
    Target("ratchet_header", Header.decode, (EncodingError,),
           lambda: [Header(b"\x09" * 32, 3, 4).encode(), Header(b"\x00" * 32, 0, 2**32 - 1).encode()]),
    Target("session_blob", S.Session.deserialize, (StateCorrupt,),
           _w(lambda w: [w.alice.serialize(), w.bob.serialize()])),
    Target("session_body",
           lambda d: S.Session.deserialize(_with_checksum("state-checksum/session", 1, d)), (StateCorrupt,),
           _w(lambda w: [_body_of(w.alice.serialize()), _body_of(w.bob.serialize())])),
    Target("ratchet_body",
           lambda d: RatchetState.deserialize(_with_checksum("state-checksum/ratchet", 1, d)),
           (StateCorrupt,),
           _w(lambda w: [_body_of(w.alice.ratchet.serialize()), _body_of(w.bob.ratchet.serialize())])),
    Target("prekey_store_blob", PrekeyStore.deserialize, (StateCorrupt,),
           _w(lambda w: [w.store.serialize(), PrekeyStore.empty().serialize()])),
    Target("prekey_store_body",
           lambda d: PrekeyStore.deserialize(_with_checksum("state-checksum/prekey-store", 1, d)),
           (StateCorrupt,), _w(lambda w: [_body_of(w.store.serialize())])),
    Target("identity", PublicIdentity.decode, (EncodingError, InvalidSignature),
           lambda: [ALICE.public.encode(), BOB.public.encode()]),
    Target("signed_prekey", SignedPrekey.decode, (EncodingError,), _w(lambda w: [w.bundle_parts[1]])),
    Target("kem_prekey", KemPrekey.decode, (EncodingError,), _w(lambda w: [w.bundle_parts[2]])),
    Target("one_time_prekey", OneTimePrekey.decode, (EncodingError,),
           _w(lambda w: [w.bundle_parts[3] or b""])),
    Target("bundle", _bundle, (BundleError,), _w(lambda w: [pack(list(w.bundle_parts))])),
    Target("keystore", _keystore, (StateCorrupt, WrongPassphrase), _keystore_seeds),
    Target("record", lambda d: _RECORDS.decrypt(d, aad=RECORD_AAD), (DecryptionError,),
           lambda: [_RECORDS.encrypt(b"", aad=RECORD_AAD), _RECORDS.encrypt(b"row" * 20, aad=RECORD_AAD)]),
    Target("sealed_x25519", _sealed(SealSuite.X25519), (EncodingError, DecryptionError),
           _sealed_seeds(SealSuite.X25519)),
    Target("sealed_hybrid", _sealed(SealSuite.MLKEM768_X25519), (EncodingError, DecryptionError),
           _sealed_seeds(SealSuite.MLKEM768_X25519)),
    Target("pake_finish", _pake_finish, (VerificationFailed,), lambda: [_pake_peer_message()], slow=True),
    Target("pake_confirm", _pake_confirm, (VerificationFailed,), lambda: [PEER_MAC], slow=True),
    Target("pake_mailbox", _pake_mailbox, (), lambda: [pack([1, "spake2", b"t" * 16, b"x" * 33])]),
    Target("stream", _stream, (StreamError,), _stream_seeds),
    Target("group_message", _group_decrypt, (EncodingError, InvalidSignature, DecryptionError),
           lambda: [m for i, m in enumerate(group().messages) if i != 2]),
    Target("sender_key_distribution", SK.SenderKeyDistribution.decode, (EncodingError,),
           lambda: [group().distribution]),
    Target("sender_key_record", SK.SenderKeyRecord.deserialize, (StateCorrupt,),
           lambda: [group().sender.serialize(), group().member.serialize()]),
    Target("sender_key_record_body",
           lambda d: SK.SenderKeyRecord.deserialize(_with_checksum("state-checksum/sender-keys", 1, d)),
           (StateCorrupt,), lambda: [_body_of(r.serialize()) for r in (group().sender, group().member)]),
]}
