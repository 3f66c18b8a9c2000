"""Valid inputs round-trip through every decoder: what the encoder writes, the decoder reads back
unchanged (frames of both directions, prekeys, headers, state blobs, sealed data, streams)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import FUZZ
from targets import (
    _RECORDS,
    PASSPHRASE,
    RECORD_AAD,
    SEAL_INFO,
    STREAM_KEY,
    TARGETS,
    _seal_keys,
    frame_samples,
    world,
)

from cipherpost.crypto import stream
from cipherpost.crypto.keystore import Argon2Params, open_keystore, seal_keystore
from cipherpost.crypto.prekey_store import PrekeyStore
from cipherpost.crypto.prekeys import MAX_KEY_ID, KemPrekey, OneTimePrekey, SignedPrekey
from cipherpost.crypto.ratchet import MAX_COUNTER, Header, RatchetState
from cipherpost.crypto.sealed import SealSuite, open_sealed, seal
from cipherpost.crypto.session import Session
from cipherpost.protocol import frames as F

RID = st.integers(min_value=0, max_value=F.MAX_RID)
NAME = st.text(max_size=F.MAX_NAME_FIELD)
MSG_ID = st.binary(min_size=16, max_size=16)
KIND = st.sampled_from(sorted(F.MESSAGE_KINDS))
SMALL_BYTES = st.binary(max_size=200)
COUNT = st.integers(min_value=0, max_value=F.MAX_RID)
MESSAGE = st.builds(F.DeliveredMessage, seq=COUNT, sender=NAME, id=MSG_ID, kind=KIND, body=SMALL_BYTES,
                    ts=COUNT)

CLIENT_FRAMES = st.one_of(
    st.builds(F.Register, rid=RID, username=NAME, identity=st.binary(max_size=F.MAX_IDENTITY_LEN),
              sig=st.binary(min_size=64, max_size=64), invite=st.none() | st.text(max_size=128)),
    st.builds(F.Auth, rid=RID, username=NAME, sig=st.binary(min_size=64, max_size=64)),
    st.builds(F.UploadPrekeys, rid=RID, signed_prekey=st.none() | st.binary(max_size=256),
              one_time=st.lists(st.binary(max_size=128), max_size=5),
              kem_one_time=st.lists(st.binary(max_size=300), max_size=3),
              kem_last_resort=st.none() | st.binary(max_size=300)),
    st.builds(F.FetchBundle, rid=RID, username=NAME),
    st.builds(F.Send, rid=RID, to=NAME, id=MSG_ID, kind=KIND, body=SMALL_BYTES),
    st.builds(F.Ack, seqs=st.lists(COUNT, max_size=20)),
    st.builds(F.Ping, rid=RID),
)
SERVER_FRAMES = st.one_of(
    st.builds(F.Hello, nonce=st.binary(min_size=32, max_size=32), server=st.text(max_size=40),
              limits=st.builds(F.Limits, max_frame=COUNT, max_body=COUNT)),
    st.builds(F.Ok, rid=RID, username=st.none() | NAME,
              prekeys=st.none() | st.builds(F.PrekeyCounts, one_time=COUNT, kem=COUNT)),
    st.builds(F.Bundle, rid=RID, username=NAME, identity=SMALL_BYTES, signed_prekey=SMALL_BYTES,
              kem_prekey=SMALL_BYTES, one_time_prekey=st.none() | st.binary(max_size=128)),
    st.builds(F.Accepted, rid=RID, id=MSG_ID),
    st.builds(F.Pong, rid=RID),
    st.builds(F.Deliver, messages=st.lists(MESSAGE, max_size=4)),
    st.builds(F.PrekeysLow, one_time=COUNT, kem=COUNT),
    st.builds(F.Error, rid=st.none() | RID, code=st.text(max_size=64), message=st.text(max_size=200)),
)


@FUZZ
@given(CLIENT_FRAMES)
def test_client_frames_round_trip(frame):
    assert TARGETS["frame"].run(F.encode_frame(frame)) == frame   # also checks the fast paths


@FUZZ
@given(SERVER_FRAMES)
def test_server_frames_round_trip(frame):
    assert F.decode_frame(F.encode_frame(frame)) == frame


@FUZZ
@given(RID, MSG_ID, st.lists(MESSAGE, max_size=4))
def test_fast_encoders_write_what_encode_frame_writes(rid, msg_id, messages):
    assert F.encode_accepted(rid, msg_id) == F.encode_frame(F.Accepted(rid, msg_id))
    assert F.encode_deliver(messages) == F.encode_frame(F.Deliver(messages))


def test_sample_frames_cover_every_type_and_round_trip():
    samples = frame_samples()
    # Every type the decoder knows, so a new frame without a sample (and fuzz seed) fails here.
    assert {f.t for f in samples} == set(F._DECODERS)
    for frame in samples:
        assert F.decode_frame(F.encode_frame(frame)) == frame


KEY_ID = st.integers(min_value=0, max_value=MAX_KEY_ID)


@FUZZ
@given(KEY_ID, st.binary(min_size=32, max_size=32), st.integers(min_value=0, max_value=(1 << 63) - 1),
       st.binary(min_size=64, max_size=64), st.binary(min_size=1184, max_size=1184), st.booleans())
def test_prekey_encodings_round_trip(key_id, public, created_at, sig, kem_public, last_resort):
    spk = SignedPrekey(key_id, public, created_at, sig)
    assert SignedPrekey.decode(spk.encode()) == spk
    opk = OneTimePrekey(key_id, public)
    assert OneTimePrekey.decode(opk.encode()) == opk
    kem = KemPrekey(key_id, kem_public, last_resort, sig)
    assert KemPrekey.decode(kem.encode()) == kem


@FUZZ
@given(st.binary(min_size=32, max_size=32), st.integers(0, MAX_COUNTER), st.integers(0, MAX_COUNTER))
def test_ratchet_headers_round_trip(dh, pn, n):
    assert Header.decode(Header(dh, pn, n).encode()) == Header(dh, pn, n)


def test_state_blobs_round_trip_byte_for_byte():
    w = world()
    for session in (w.alice, w.bob):
        blob = session.serialize()
        assert Session.deserialize(blob).serialize() == blob
        ratchet = session.ratchet.serialize()
        assert RatchetState.deserialize(ratchet).serialize() == ratchet
    for store in (w.store, PrekeyStore.empty()):
        assert PrekeyStore.deserialize(store.serialize()).serialize() == store.serialize()


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(list(SealSuite)), st.binary(max_size=40))
def test_sealed_records_and_stream_round_trip(plaintext, suite, aad):
    assert _RECORDS.decrypt(_RECORDS.encrypt(plaintext, aad=aad), aad=aad) == plaintext
    private, public = _seal_keys()[suite]
    assert open_sealed(suite, private, seal(suite, public, plaintext, info=SEAL_INFO, aad=aad),
                       info=SEAL_INFO, aad=aad) == plaintext
    assert stream.decrypt_payload(STREAM_KEY, stream.encrypt_payload(STREAM_KEY, plaintext)) == plaintext
    assert RECORD_AAD  # the record target's row name


@pytest.mark.parametrize("plaintext", [b"", b"key store", bytes(range(256)) * 8])
def test_keystore_round_trip(plaintext):
    params = Argon2Params(memory_kib=64, iterations=1, lanes=1)
    assert open_keystore(PASSPHRASE, seal_keystore(PASSPHRASE, plaintext, params=params)) == plaintext


def test_pake_run_round_trips():
    assert len(TARGETS["pake_confirm"].run(TARGETS["pake_confirm"].seeds()[0])) == 32
