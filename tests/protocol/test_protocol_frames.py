"""protocol.frames: round trips of every frame type, strict rejection of malformed input."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cipherpost.protocol.errors import ERROR_CODES, ProtocolError
from cipherpost.protocol.frames import (
    CLIENT_FRAME_TYPES,
    MAX_BATCH_ENVELOPES,
    MAX_SEND_MANY_RECIPIENTS,
    Accepted,
    AcceptedMany,
    Ack,
    Auth,
    BlobBegin,
    BlobCommit,
    BlobData,
    BlobGet,
    BlobHeld,
    BlobPut,
    BlobRelease,
    BlobState,
    Block,
    Bundle,
    Deliver,
    DeliveredMessage,
    Envelope,
    Error,
    FetchBundle,
    Frame,
    Hello,
    Limits,
    Ok,
    Ping,
    Pong,
    PrekeyCounts,
    PrekeysLow,
    Register,
    Results,
    Send,
    SendBatch,
    SendMany,
    UploadPrekeys,
    decode_frame,
    encode_deliver,
    encode_frame,
)

ID = bytes(range(16))
SIG = b"\x07" * 64

EXAMPLES: list[Frame] = [
    Register(rid=1, username="alice", identity=b"\x01" * 100, sig=SIG, invite=None),
    Register(rid=2, username="alice", identity=b"\x01" * 100, sig=SIG, invite="tok"),
    Auth(rid=3, username="alice", sig=SIG),
    UploadPrekeys(rid=4, signed_prekey=b"s", one_time=[b"a", b"b"], kem_one_time=[b"k"]),
    UploadPrekeys(rid=5),
    FetchBundle(rid=6, username="bob"),
    Send(rid=7, to="bob", id=ID, kind="msg", body=b"\x00" * 256),
    Send(rid=8, to="bob", id=ID, kind="pake", body=b""),
    Ack(seqs=[1, 2, 3]),
    Ping(rid=9),
    Hello(nonce=b"\x02" * 32, server="relay", limits=Limits(max_frame=1000, max_body=500)),
    Ok(rid=10),
    Ok(rid=11, username="alice", prekeys=PrekeyCounts(one_time=3, kem=4)),
    Bundle(rid=12, username="bob", identity=b"i", signed_prekey=b"s", kem_prekey=b"k", one_time_prekey=None),
    Bundle(rid=13, username="bob", identity=b"i", signed_prekey=b"s", kem_prekey=b"k", one_time_prekey=b"o"),
    Accepted(rid=14, id=ID),
    Pong(rid=15),
    Deliver(messages=[DeliveredMessage(seq=1, sender="alice", id=ID, kind="msg", body=b"hi", ts=1700)]),
    PrekeysLow(one_time=1, kem=0),
    Error(rid=None, code="bad_frame", message="nope"),
    Error(rid=16, code="internal", message="x"),
    Hello(nonce=b"\x02" * 32, server="relay", limits=Limits(max_frame=1000, max_body=500),
          caps=["block", "send_many"]),
    Block(rid=17, username="mallory", on=True),
    Block(rid=18, username="mallory", on=False),
    SendMany(rid=19, id=ID, kind="msg", body=b"group", to=["bob", "carol"]),
    Results(rid=19, id=ID, status=["accepted", "sender_cap"]),
    BlobBegin(rid=20, id=ID, size=100_000, chunk_size=65_552),
    BlobPut(rid=21, id=ID, index=1, data=b"\x05" * 1000),
    BlobHeld(rid=22, id=ID),
    BlobCommit(rid=23, id=ID, to=["bob"]),
    BlobGet(rid=24, id=ID, index=0),
    BlobRelease(rid=25, id=ID),
    BlobState(rid=20, id=ID, size=100_000, chunk_size=65_552, held=1, committed=False),
    BlobData(rid=24, id=ID, index=0, data=b"\x06" * 10),
    Hello(nonce=b"\x02" * 32, server="relay", limits=Limits(max_frame=1000, max_body=500),
          caps=["epoch"], epoch=b"\x0e" * 16),
    UploadPrekeys(rid=26, signed_prekey=b"s", one_time=[b"a"], replace=True),
    SendBatch(rid=27, envelopes=[Envelope(to="bob", id=ID, kind="msg", body=b"one"),
                                 Envelope(to="carol", id=b"\x02" * 16, kind="msg", body=b"")]),
    AcceptedMany(rid=27, ids=[ID, b"\x02" * 16], status=["accepted", "duplicate"]),
]


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: f.t)
def test_round_trip(frame: Frame) -> None:
    data = encode_frame(frame)
    assert decode_frame(data) == frame
    m = msgpack.unpackb(data)
    assert m["v"] == 1 and m["t"] == frame.t


def test_wire_keys_match_the_contract() -> None:
    m = msgpack.unpackb(encode_deliver([DeliveredMessage(5, "alice", ID, "msg", b"b", 9)]))
    assert m == {"v": 1, "t": "deliver", "messages": [
        {"seq": 5, "from": "alice", "id": ID, "kind": "msg", "body": b"b", "ts": 9}]}
    hello = msgpack.unpackb(encode_frame(EXAMPLES[10]))
    assert hello["limits"] == {"max_frame": 1000, "max_body": 500}
    ok = msgpack.unpackb(encode_frame(EXAMPLES[12]))
    assert ok == {"v": 1, "t": "ok", "rid": 11, "username": "alice", "prekeys": {"one_time": 3, "kem": 4}}
    assert set(msgpack.unpackb(encode_frame(EXAMPLES[6]))) == {"v", "t", "rid", "to", "id", "kind", "body"}


def test_client_frame_types() -> None:
    assert {t.t for t in CLIENT_FRAME_TYPES} == {
        "register", "auth", "upload_prekeys", "fetch_bundle", "send", "ack", "ping", "block", "send_many",
        "blob_begin", "blob_put", "blob_held", "blob_commit", "blob_get", "blob_release",
        "set_recovery", "recover", "delete_account"}


def test_blob_frames_refuse_a_chunk_over_the_limit_and_a_short_id() -> None:
    from cipherpost.protocol.errors import ProtocolError
    from cipherpost.protocol.frames import MAX_BLOB_CHUNK
    big = msgpack.packb({"v": 1, "t": "blob_put", "rid": 1, "id": ID, "index": 0,
                         "data": b"x" * (MAX_BLOB_CHUNK + 1)})
    with pytest.raises(ProtocolError) as refused:
        decode_frame(big)
    assert refused.value.code == "too_large"
    short = msgpack.packb({"v": 1, "t": "blob_get", "rid": 1, "id": b"x", "index": 0})
    with pytest.raises(ProtocolError) as refused:
        decode_frame(short)
    assert refused.value.code == "bad_frame"


def test_hello_caps_are_absent_when_empty_and_ignored_by_old_decoders() -> None:
    plain = msgpack.unpackb(encode_frame(EXAMPLES[10]))
    assert "caps" not in plain  # a first-slice relay: no capabilities
    with_caps = msgpack.unpackb(encode_frame(EXAMPLES[21]))
    assert with_caps["caps"] == ["block", "send_many"]
    assert decode_frame(encode_frame(EXAMPLES[10])) == EXAMPLES[10]


ENV = {"to": "bob", "id": ID, "kind": "msg", "body": b""}


@pytest.mark.parametrize(("fields", "code"), [
    ({"t": "block", "rid": 1, "username": "bob"}, "bad_frame"),
    ({"t": "block", "rid": 1, "username": "bob", "on": 1}, "bad_frame"),
    ({"t": "block", "rid": 1, "username": 5, "on": True}, "bad_frame"),
    ({"t": "send_many", "rid": 1, "id": ID, "kind": "msg", "body": b"", "to": []}, "bad_frame"),
    ({"t": "send_many", "rid": 1, "id": ID, "kind": "msg", "body": b"", "to": "bob"}, "bad_frame"),
    ({"t": "send_many", "rid": 1, "id": ID, "kind": "msg", "body": b"", "to": [1]}, "bad_frame"),
    ({"t": "send_many", "rid": 1, "id": ID, "kind": "spam", "body": b"", "to": ["bob"]}, "bad_frame"),
    ({"t": "send_many", "rid": 1, "id": ID[:3], "kind": "msg", "body": b"", "to": ["bob"]}, "bad_frame"),
    ({"t": "send_many", "rid": 1, "id": ID, "kind": "msg", "body": b"",
      "to": ["bob"] * (MAX_SEND_MANY_RECIPIENTS + 1)}, "too_large"),
    ({"t": "hello", "nonce": bytes(32), "server": "r", "limits": {"max_frame": 1, "max_body": 1},
      "caps": ["x" * 33]}, "too_large"),
    # cap "batch": a send frame with envelopes
    ({"t": "send", "rid": 1, "envelopes": []}, "bad_frame"),
    ({"t": "send", "rid": 1, "envelopes": "bob"}, "bad_frame"),
    ({"t": "send", "rid": 1, "envelopes": [ENV] * (MAX_BATCH_ENVELOPES + 1)}, "too_large"),
    ({"t": "send", "rid": 1, "envelopes": [ENV, 5]}, "bad_frame"),
    ({"t": "send", "rid": 1, "envelopes": [ENV, {**ENV, "to": 5}]}, "bad_frame"),
    ({"t": "send", "rid": 1, "envelopes": [ENV, {**ENV, "to": "b" * 129}]}, "bad_frame"),
    ({"t": "send", "rid": 1, "envelopes": [ENV, {**ENV, "id": ID[:15]}]}, "bad_frame"),
    ({"t": "send", "rid": 1, "envelopes": [ENV, {**ENV, "kind": "spam"}]}, "bad_frame"),
    ({"t": "send", "rid": 1, "envelopes": [ENV, {**ENV, "body": "text"}]}, "bad_frame"),
    ({"t": "send", "rid": 1, "envelopes": [{"to": "bob", "id": ID, "kind": "msg"}]}, "bad_frame"),
    ({"t": "accepted_many", "rid": 1, "ids": [ID], "status": []}, "bad_frame"),
])
def test_new_frames_reject_malformed_fields(fields: dict[str, object], code: str) -> None:
    got, rid = _code(msgpack.packb({"v": 1, **fields}, use_bin_type=True))
    assert got == code and rid == fields.get("rid")


def _code(data: bytes, max_size: int = 1 << 18) -> tuple[str, int | None]:
    with pytest.raises(ProtocolError) as info:
        decode_frame(data, max_size=max_size)
    assert info.value.code in ERROR_CODES
    return info.value.code, info.value.rid


def p(**m: object) -> bytes:
    return msgpack.packb(m, use_bin_type=True)  # type: ignore[no-any-return]


def test_malformed_classes() -> None:
    assert _code(b"\xc1") == ("bad_frame", None)
    assert _code(b"") == ("bad_frame", None)
    assert _code(p(v=1, t="ping", rid=1) + b"x")[0] == "bad_frame"
    assert _code(msgpack.packb(["v", 1]))[0] == "bad_frame"
    assert _code(p(v=2, t="ping", rid=4)) == ("unsupported_version", 4)
    assert _code(p(v="1", t="ping", rid=4)) == ("bad_frame", 4)
    assert _code(p(v=1, t="nope", rid=4)) == ("unknown_type", 4)
    assert _code(p(v=1, t=5)) == ("bad_frame", None)
    assert _code(p(v=1, t="send", rid=4, to="b", id=ID, kind="msg")) == ("bad_frame", 4)  # no body
    assert _code(p(v=1, t="send", rid=4, to="b", id=ID[:15], kind="msg", body=b""))[0] == "bad_frame"
    assert _code(p(v=1, t="send", rid=4, to="b", id=ID, kind="msg", body="text"))[0] == "bad_frame"
    assert _code(p(v=1, t="send", rid=4, to=b"b", id=ID, kind="msg", body=b""))[0] == "bad_frame"
    assert _code(p(v=1, t="send", rid=True, to="b", id=ID, kind="msg", body=b""))[0] == "bad_frame"
    assert _code(p(v=1, t="ack", seqs=[-1]))[0] == "bad_frame"
    assert _code(p(v=1, t="ack", seqs=list(range(5000))))[0] == "too_large"
    assert _code(p(v=1, t="upload_prekeys", rid=1, one_time=[b"x" * 200]))[0] == "too_large"
    assert _code(p(v=1, t="upload_prekeys", rid=1, one_time="x"))[0] == "bad_frame"
    assert _code(p(v=1, t="ping", rid=1), max_size=5)[0] == "too_large"
    assert _code(p(v=1, t="register", rid=1, username="a", identity=b"", sig=SIG, invite=3))[0] == "bad_frame"
    with pytest.raises(ProtocolError) as info:
        decode_frame("text")  # type: ignore[arg-type]
    assert info.value.code == "bad_frame"


def test_unknown_extra_keys_are_ignored() -> None:
    assert decode_frame(p(v=1, t="ping", rid=3, future="x")) == Ping(rid=3)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    try:
        decode_frame(data)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES


values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40)
                      | st.text(max_size=20), lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["register", "auth", "upload_prekeys", "fetch_bundle", "send", "ack", "ping",
                        "hello", "ok", "bundle", "deliver", "error"]),
       st.dictionaries(st.sampled_from(["rid", "username", "identity", "sig", "invite", "to", "id", "kind",
                                        "body", "seqs", "one_time", "kem_one_time", "signed_prekey",
                                        "messages", "limits", "nonce", "prekeys", "code", "message"]),
                       values, max_size=8))
def test_structured_garbage_only_raises_protocol_error(t: str, fields: dict[str, object]) -> None:
    try:
        decode_frame(p(v=1, t=t, **fields))
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES


@pytest.mark.parametrize(("key", "value", "base"), [
    ("epoch", b"\x01" * 15, {"t": "hello", "nonce": b"\x02" * 32, "server": "r",
                             "limits": {"max_frame": 1, "max_body": 1}}),
    ("epoch", b"\x01" * 17, {"t": "hello", "nonce": b"\x02" * 32, "server": "r",
                             "limits": {"max_frame": 1, "max_body": 1}}),
    ("epoch", "sixteen chars!!!", {"t": "hello", "nonce": b"\x02" * 32, "server": "r",
                                   "limits": {"max_frame": 1, "max_body": 1}}),
    ("replace", 1, {"t": "upload_prekeys", "rid": 1}),
    ("replace", "true", {"t": "upload_prekeys", "rid": 1}),
])
def test_epoch_and_replace_are_strict(key: str, value: object, base: dict[str, object]) -> None:
    from cipherpost.protocol.errors import ProtocolError
    with pytest.raises(ProtocolError) as refused:
        decode_frame(msgpack.packb({"v": 1, **base, key: value}, use_bin_type=True))
    assert refused.value.code == "bad_frame" and key in refused.value.message


def test_hello_without_epoch_and_upload_without_replace_decode_to_the_defaults() -> None:
    hello = decode_frame(encode_frame(EXAMPLES[10]))
    assert isinstance(hello, Hello) and hello.epoch is None
    assert "epoch" not in msgpack.unpackb(encode_frame(EXAMPLES[10]))
    upload = decode_frame(msgpack.packb({"v": 1, "t": "upload_prekeys", "rid": 1}))
    assert isinstance(upload, UploadPrekeys) and upload.replace is False
