"""Malformed frames and limits: errors are typed, nothing crashes, others are unaffected (HTTP
endpoints: test_relay_metrics.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest
from relay_client import RelayClient
from relay_harness import harness, run

from cipherpost.protocol.frames import Accepted, Error, Ping, Pong
from cipherpost.server.config import ServerConfig

pytestmark = pytest.mark.usefixtures("relay_backend")  # every test on SQLite and on PostgreSQL


def _frame(**fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


MALFORMED: list[tuple[str, bytes | str, str]] = [
    ("garbage bytes", b"\xc1\xff\x00garbage", "bad_frame"),
    ("truncated msgpack", _frame(v=1, t="ping", rid=1)[:-1], "bad_frame"),
    ("trailing bytes", _frame(v=1, t="ping", rid=1) + b"\x00", "bad_frame"),
    ("not a map", msgpack.packb([1, "ping", 1]), "bad_frame"),
    ("empty", b"", "bad_frame"),
    ("missing version", _frame(t="ping", rid=1), "bad_frame"),
    ("wrong version", _frame(v=2, t="ping", rid=1), "unsupported_version"),
    ("bool version", _frame(v=True, t="ping", rid=1), "bad_frame"),
    ("missing type", _frame(v=1, rid=1), "bad_frame"),
    ("unknown type", _frame(v=1, t="teleport", rid=1), "unknown_type"),
    ("server frame from client", _frame(v=1, t="pong", rid=1), "unknown_type"),
    ("wrong rid type", _frame(v=1, t="ping", rid="1"), "bad_frame"),
    ("negative rid", _frame(v=1, t="ping", rid=-1), "bad_frame"),
    ("missing field", _frame(v=1, t="auth", rid=3, username="bob"), "bad_frame"),
    ("wrong field type", _frame(v=1, t="auth", rid=3, username="bob", sig="not bytes"), "bad_frame"),
    ("short signature", _frame(v=1, t="auth", rid=3, username="bob", sig=b"\x00" * 10), "bad_frame"),
    ("int map keys", msgpack.packb({1: 1, "v": 1, "t": "ping", "rid": 1}), "bad_frame"),
    ("text frame", '{"v": 1, "t": "ping", "rid": 1}', "bad_frame"),
    ("huge username", _frame(v=1, t="fetch_bundle", rid=4, username="x" * 5000), "too_large"),
]


def test_every_malformed_frame_gets_a_typed_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_frame=4096, max_body=1024) as h:
            bystander_a, _ = await h.user("alice")
            await h.user("bob")
            attacker = await h.connect()
            for name, data, code in MALFORMED:
                await attacker.send_raw(data)
                error = await attacker.next_push()
                assert isinstance(error, Error), name
                assert error.code == code, (name, error)
                assert "Traceback" not in error.message and "File " not in error.message
            # the rid is echoed whenever it could be read
            await attacker.send_raw(_frame(v=1, t="auth", rid=3, username="bob"))
            assert (await attacker.next_push()).rid == 3  # type: ignore[union-attr]
            # oversized: over max_frame gets too_large and the connection stays usable
            await attacker.send_raw(b"\x00" * 4097)
            too_large = await attacker.next_push()
            assert isinstance(too_large, Error) and too_large.code == "too_large"
            pong = await attacker.request(Ping(rid=99))
            assert isinstance(pong, Pong)
            # an authenticated connection sending a malformed send frame keeps working too
            await bystander_a.send_raw(_frame(v=1, t="send", rid=5, to="bob", id=b"short", kind="msg",
                                              body=b""))
            bad = await bystander_a.next_push()
            assert isinstance(bad, Error) and bad.code == "bad_frame" and bad.rid == 5
            await bystander_a.send_raw(_frame(v=1, t="send", rid=6, to="bob", id=b"x" * 16, kind="sms",
                                              body=b""))
            assert (await bystander_a.next_push()).code == "bad_frame"  # type: ignore[union-attr]
            await bystander_a.send_raw(_frame(v=1, t="ack", seqs=[1, "2"]))
            assert (await bystander_a.next_push()).code == "bad_frame"  # type: ignore[union-attr]
            assert isinstance(await bystander_a.send("bob", b"still fine"), Accepted)
            # far beyond the limit websockets closes that one connection (1009); the server lives on
            await attacker.ws.send(b"\x00" * (3 * 4096))
            await attacker.ws.wait_closed()
            assert attacker.ws.close_code == 1009
            assert isinstance(await bystander_a.send("bob", b"after the attack"), Accepted)
            assert h.server.metrics.errors["bad_frame"] >= 10
    run(scenario())


def test_rate_limit_per_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, rate_per_second=1.0, rate_burst=3) as h:
            c = await h.connect()
            replies = [await c.request(Ping(rid=i)) for i in range(4)]
            assert [r.t for r in replies] == ["pong", "pong", "pong", "error"]
            assert isinstance(replies[3], Error) and replies[3].code == "rate_limited" and replies[3].rid == 3
            other = await h.connect()  # per connection: others are unaffected
            assert isinstance(await other.request(Ping(rid=1)), Pong)
    run(scenario())


def test_max_connections(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_connections=2) as h:
            await h.connect()
            await h.connect()
            # refused at accept, before TLS (server/admission.py): the socket is reset
            with pytest.raises(OSError):
                await RelayClient.connect(h.server.url, h.cert)
            assert h.server.admission.refused == 1 and h.server.metrics.connections_refused == 1
            await h.clients[0].close()
            await asyncio.sleep(0.1)
            assert isinstance(await (await h.connect()).request(Ping(rid=1)), Pong)
    run(scenario())


def test_plaintext_flag_refuses_non_loopback(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        with pytest.raises(ValueError, match="loopback"):
            ServerConfig(data_dir=tmp_path, host=host, insecure_plaintext_dev=True).validate()
    ServerConfig(data_dir=tmp_path, host="::1", insecure_plaintext_dev=True).validate()
