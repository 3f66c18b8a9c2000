"""protocol.frames, accounts capability: hello caps, auth counter, set_recovery, recover, delete_account."""

from __future__ import annotations

import msgpack
import pytest

from cipherpost.protocol.errors import BAD_FRAME, ERROR_CODES, TOO_LARGE, ProtocolError
from cipherpost.protocol.frames import (
    Auth,
    DeleteAccount,
    Frame,
    Hello,
    Limits,
    Recover,
    Register,
    SetRecovery,
    decode_frame,
    encode_frame,
)

SIG = b"\x07" * 64
PUB = b"\x05" * 32

EXAMPLES: list[Frame] = [
    Hello(nonce=b"\x02" * 32, server="relay", limits=Limits(1000, 500), caps=["accounts", "login_counter"]),
    Auth(rid=1, username="alice", sig=SIG, counter=7),
    Auth(rid=2, username="alice", sig=SIG, counter=0),
    Register(rid=3, username="alice", identity=b"\x01" * 100, sig=SIG, recovery_public=PUB),
    SetRecovery(rid=4, recovery_public=PUB, sig=SIG),
    Recover(rid=5, username="alice", identity=b"\x01" * 100, recovery_sig=SIG, sig=SIG),
    DeleteAccount(rid=6, sig=SIG),
]


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: f.t)
def test_round_trip(frame: Frame) -> None:
    assert decode_frame(encode_frame(frame)) == frame


def _raw(**m: object) -> bytes:
    return msgpack.packb({"v": 1, **m}, use_bin_type=True)  # type: ignore[no-any-return]


def test_old_peers_interoperate_hello_without_caps_and_auth_without_counter() -> None:
    hello = decode_frame(_raw(t="hello", nonce=b"\x02" * 32, server="s",
                              limits={"max_frame": 1, "max_body": 1}))
    assert isinstance(hello, Hello) and hello.caps == []
    assert "caps" not in msgpack.unpackb(encode_frame(hello))
    auth = decode_frame(_raw(t="auth", rid=1, username="a", sig=SIG))
    assert isinstance(auth, Auth) and auth.counter is None
    assert "counter" not in msgpack.unpackb(encode_frame(auth))


@pytest.mark.parametrize(("frame", "code"), [
    (dict(t="auth", rid=1, username="a", sig=SIG, counter=-1), BAD_FRAME),
    (dict(t="auth", rid=1, username="a", sig=SIG, counter="1"), BAD_FRAME),
    (dict(t="auth", rid=1, username="a", sig=SIG, counter=True), BAD_FRAME),
    (dict(t="set_recovery", rid=1, recovery_public=b"\x05" * 31, sig=SIG), BAD_FRAME),
    (dict(t="set_recovery", rid=1, recovery_public=PUB), BAD_FRAME),
    (dict(t="register", rid=1, username="a", identity=b"i", sig=SIG, recovery_public=b"\x05" * 33),
     TOO_LARGE),
    (dict(t="recover", rid=1, username="a", identity=b"i", recovery_sig=SIG[:63], sig=SIG), BAD_FRAME),
    (dict(t="recover", rid=1, username="a", identity=b"i" * 513, recovery_sig=SIG, sig=SIG), TOO_LARGE),
    (dict(t="delete_account", rid=1), BAD_FRAME),
    (dict(t="hello", nonce=b"\x02" * 32, server="s", limits={"max_frame": 1, "max_body": 1}, caps="accounts"),
     BAD_FRAME),
    (dict(t="hello", nonce=b"\x02" * 32, server="s", limits={"max_frame": 1, "max_body": 1}, caps=[1]),
     BAD_FRAME),
    (dict(t="hello", nonce=b"\x02" * 32, server="s", limits={"max_frame": 1, "max_body": 1},
          caps=["x"] * 65), TOO_LARGE),
])
def test_malformed_account_frames_are_refused(frame: dict[str, object], code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_frame(_raw(**frame))
    assert info.value.code == code


def test_new_error_codes_are_known() -> None:
    assert {"stale_profile", "suspended", "name_reserved", "name_confusable", "bad_recovery"} <= ERROR_CODES
