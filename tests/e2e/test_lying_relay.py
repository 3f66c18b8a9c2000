"""A relay that lies about names, replies and prekey counts (issue 8, items 4 and 5).

Peers are real clients on a real relay (TLS, SQLite). What a malicious relay would push is fed
through the client's own delivery path (``Client._on_deliver`` / ``_on_push``), exactly as a
``deliver`` or ``prekeys_low`` frame would be; wrong replies come from a small hostile relay
in-process that speaks the wire format (``FakeRelay``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import websockets
from e2e_support import PASSPHRASE, RelayProcess

from cipherpost.client.client import Client, pad
from cipherpost.client.connection import Connection, parse_fingerprint
from cipherpost.client.errors import BadReply
from cipherpost.crypto.encoding import pack
from cipherpost.crypto.session import encrypt

LYING_NAMES = [
    "Bob",                  # case
    "bob\u200b",            # zero-width space
    "b\u043eb",             # Cyrillic o
    "bo\x1b[2Jb",           # terminal escape
    " bob",                 # leading space
    "\uff42\uff4f\uff42",   # full-width letters (NFKC folds them to "bob")
    "alice",                # the recipient's own name
]


async def _clients(tmp: Path, relay: RelayProcess, *names: str, observer: Any = None) -> list[Client]:
    clients = []
    for name in names:
        c = await Client.create(tmp / f"home-{name}", name, relay.url, PASSPHRASE,
                                server_fingerprint=parse_fingerprint(relay.fingerprint))
        c._observer = observer
        await c.connect()
        clients.append(c)
    return clients


def _forged(sender: str, body: bytes) -> dict[str, Any]:
    return {"seq": 10**9 + int.from_bytes(os.urandom(3), "big"), "from": sender, "id": os.urandom(16),
            "kind": "msg", "body": body, "ts": 0}


def _plaintext(text: str, written_by: str, written_for: str) -> bytes:
    return pad(pack([1, "text", text, int(time.time() * 1000), written_by, written_for]))


def test_names_not_in_canonical_form_are_refused_and_nothing_is_pinned(tmp_path: Path,
                                                                      relay: RelayProcess) -> None:
    async def scenario() -> None:
        alice, bob = await _clients(tmp_path, relay, "alice", "bob")
        try:
            await bob.send("alice", "hello alice")
            await alice.receive(wait=3)
            alice.accept_request("bob")
            digits = alice.safety_number("bob").digits
            assert alice.verify_safety_number("bob", digits)        # bob is a VERIFIED contact
            shown: list[Any] = []
            alice.add_listener(shown.append)
            session, _ = await bob._sending_session("alice")
            for name in LYING_NAMES:
                # bob's own, valid envelope, delivered under a lying name (and claiming it inside).
                envelope, session = encrypt(session, _plaintext("it is me", name, "alice"))
                await alice._on_deliver([_forged(name, envelope)])
            assert shown and all(m.warning == "undecryptable" for m in shown)
            assert all("\x1b" not in m.text and "\x1b" not in m.sender for m in shown)
            for name in LYING_NAMES:
                if name != "alice":
                    assert alice.db.get_contact(name) is None      # nothing pinned
            assert [c.name for c in alice.contacts()] == ["bob"] and alice.contact("bob").verified
            assert alice.message_requests() == []
            [notice] = alice.take_new_messages()                    # one notice, counting the rest
            assert "invalid sender name 'Bob'" in notice.text
            assert f"and {len(LYING_NAMES) - 1} more undecryptable messages" in notice.text
            assert "\x1b" not in notice.text
            # The real bob is unaffected: the lying deliveries never touched his session.
            await bob.send("alice", "the real bob")
            assert [m.text for m in await alice.receive(wait=3)] == ["the real bob"]
        finally:
            for c in (alice, bob):
                await c.close()
    asyncio.run(scenario())


def test_lookalike_of_a_contact_is_a_request_with_a_warning_naming_the_contact(tmp_path: Path,
                                                                               relay: RelayProcess) -> None:
    async def scenario() -> None:
        alice, bob, mallory = await _clients(tmp_path, relay, "alice", "bob", "mallory")
        try:
            await alice.send("bob", "hi bob")                       # bob is alice's contact
            for fake in ("b0b", "bob_"):
                session, _ = await mallory._sending_session("alice")   # a new session each time
                envelope, _ = encrypt(session, _plaintext("hi, bob here", fake, "alice"))
                await alice._on_deliver([_forged(fake, envelope)])
            got = {m.sender: m for m in alice.take_new_messages()}
            for fake in ("b0b", "bob_"):
                assert got[fake].request and got[fake].text == "hi, bob here"
                assert f"'{fake}' looks like your contact 'bob'" in (got[fake].warning or "")
                assert alice.db.get_contact(fake) is None
            assert {r.name: r.warning is not None for r in alice.message_requests()} == {"b0b": True,
                                                                                        "bob_": True}
        finally:
            for c in (alice, bob, mallory):
                await c.close()
    asyncio.run(scenario())


def test_junk_flood_from_one_sender_is_one_notice(tmp_path: Path, relay: RelayProcess) -> None:
    async def scenario() -> None:
        alice, mallory = await _clients(tmp_path, relay, "alice", "mallory")
        try:
            conn = mallory._require_conn()
            for _ in range(300):
                await conn.request({"t": "send", "to": "alice", "id": os.urandom(16), "kind": "msg",
                                    "body": b"\x93junk"})
            got = await alice.receive(wait=3)
            assert len(got) == 1 and got[0].warning == "undecryptable"
            assert "could not decrypt a message from mallory" in got[0].text
            assert "and 299 more undecryptable messages from mallory" in got[0].text
            assert await alice.receive(wait=0.5) == []             # all acked
        finally:
            for c in (alice, mallory):
                await c.close()
    asyncio.run(scenario())


def test_lying_prekeys_low_pushes_upload_one_pool_and_no_task_error_is_lost(tmp_path: Path,
                                                                           relay: RelayProcess) -> None:
    uploads: list[dict[str, Any]] = []

    def observer(event: str, details: dict[str, Any]) -> None:
        if event == "prekeys":
            uploads.append(details)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        unretrieved: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
        [alice] = await _clients(tmp_path, relay, "alice", observer=observer)
        try:
            uploads.clear()
            for _ in range(30):
                await alice._on_push({"v": 1, "t": "prekeys_low", "one_time": 0, "kem": 0})
            while alice._tasks:
                await asyncio.sleep(0.05)
            assert sum(u["one_time"] for u in uploads) <= 100 and sum(u["kem"] for u in uploads) <= 100
            assert len(uploads) <= 1
            # A background top-up that fails (the link is gone) is retrieved and reported.
            from cipherpost.client.prekeys_low import PrekeysLowGate
            alice._prekeys_low = PrekeysLowGate(interval_s=0)
            await alice.disconnect()
            await alice._on_push({"v": 1, "t": "prekeys_low", "one_time": 0, "kem": 0})
            while alice._tasks:
                await asyncio.sleep(0.05)
            gc.collect()
            await asyncio.sleep(0)
            assert not [c for c in unretrieved if "never retrieved" in str(c.get("message"))]
        finally:
            await alice.close()
    asyncio.run(scenario())


# --------------------------------------------------------------------------- a hostile relay in-process
Reply = Callable[[dict[str, Any]], Awaitable[bytes | None]]


class FakeRelay:
    """Speaks just enough of the wire to answer each request with what ``reply`` returns."""

    def __init__(self, reply: Reply, caps: list[str] | None = None) -> None:
        self.reply = reply
        self.caps = caps
        self.received: list[dict[str, Any]] = []
        self.url = ""
        self._server: Any = None

    async def __aenter__(self) -> FakeRelay:
        async def handler(ws: Any) -> None:
            hello: dict[str, Any] = {"v": 1, "t": "hello", "nonce": os.urandom(32), "server": "liar",
                                     "limits": {"max_frame": 262144, "max_body": 65536}}
            if self.caps is not None:
                hello["caps"] = self.caps
            await ws.send(msgpack.packb(hello))
            async for raw in ws:
                frame = msgpack.unpackb(raw)
                self.received.append(frame)
                out = await self.reply(frame)
                if out is not None:
                    await ws.send(out)
        self._server = await websockets.serve(handler, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()


def _send_frame() -> dict[str, Any]:
    return {"t": "send", "to": "bob", "id": os.urandom(16), "kind": "msg", "body": b"x"}


def test_a_reply_of_the_wrong_type_or_for_another_message_is_not_accepted() -> None:
    async def scenario() -> None:
        async def wrong_type(f: dict[str, Any]) -> bytes:
            return msgpack.packb({"v": 1, "t": "pong", "rid": f["rid"]})

        async def other_id(f: dict[str, Any]) -> bytes:
            return msgpack.packb({"v": 1, "t": "accepted", "rid": f["rid"], "id": os.urandom(16)})

        async def ok_for_send(f: dict[str, Any]) -> bytes:
            return msgpack.packb({"v": 1, "t": "ok", "rid": f["rid"]})

        for reply, words in ((wrong_type, "with 'pong' instead of 'accepted'"),
                             (other_id, "another message id"),
                             (ok_for_send, "with 'ok' instead of 'accepted'")):
            async with FakeRelay(reply) as fake:
                conn = await Connection.open(fake.url, None)
                try:
                    await conn.request(_send_frame())
                except BadReply as exc:
                    assert words in str(exc)
                else:
                    raise AssertionError(f"{reply.__name__}: a wrong reply counted as accepted")
                finally:
                    await conn.close()

        async def right(f: dict[str, Any]) -> bytes:
            return msgpack.packb({"v": 1, "t": "accepted", "rid": f["rid"], "id": f["id"]})
        async with FakeRelay(right) as fake:
            conn = await Connection.open(fake.url, None)
            frame = _send_frame()
            assert (await conn.request(frame))["id"] == frame["id"]
            await conn.close()
    asyncio.run(scenario())


def test_an_undecodable_reply_fails_the_request_at_once_with_a_clear_error() -> None:
    async def scenario() -> None:
        async def broken(f: dict[str, Any]) -> bytes:
            return msgpack.packb({"v": 1, "t": "accepted", "rid": f["rid"], "id": "not bytes"})
        async with FakeRelay(broken) as fake:
            conn = await Connection.open(fake.url, None)
            try:
                # A generous timeout: the request must fail on the reply, not on the clock.
                await conn.request(_send_frame(), timeout=120)
            except BadReply as exc:
                assert "reply to send could not be decoded" in str(exc) and "bad_frame" in str(exc)
            else:
                raise AssertionError("an undecodable reply was taken as a success")
            finally:
                await conn.close()
    asyncio.run(scenario())


def test_blocks_are_told_to_a_relay_that_announces_the_capability(tmp_path: Path) -> None:
    from cipherpost.client.blocks import BlockList
    from cipherpost.client.profile import ProfileDB
    from cipherpost.crypto.records import RecordCipher

    async def scenario() -> None:
        async def ok(f: dict[str, Any]) -> bytes:
            return msgpack.packb({"v": 1, "t": "ok", "rid": f["rid"]})
        db = ProfileDB(tmp_path / "p.db", RecordCipher(RecordCipher.new_key()))
        blocks = BlockList(db)
        with db.transaction():
            blocks.set("mallory", True)
        async with FakeRelay(ok, caps=[]) as old:      # a relay without the capability: nothing sent
            conn = await Connection.open(old.url, None)
            assert await blocks.tell_relay(conn) == 0
            await conn.close()
            assert old.received == []
        async with FakeRelay(ok, caps=["block"]) as new:
            conn = await Connection.open(new.url, None)
            assert await blocks.tell_relay(conn) == 1
            assert await blocks.tell_relay(conn) == 0                # told once
            with db.transaction():
                blocks.set("mallory", False)
            assert await blocks.tell_relay(conn) == 1
            await conn.close()
            sent = [(f["t"], f["username"], f["on"]) for f in new.received]
            assert sent == [("block", "mallory", True), ("block", "mallory", False)]
        assert BlockList(db).blocked() == []
        db.close()
    asyncio.run(scenario())


def test_requests_under_two_keys_for_one_name_are_not_accepted(tmp_path: Path, relay: RelayProcess) -> None:
    from cipherpost.client.errors import ClientError

    async def scenario() -> None:
        alice, carol, mallory = await _clients(tmp_path, relay, "alice", "carol", "mallory")
        try:
            await carol.send("alice", "hi, carol here")
            await alice.receive(wait=3)
            # The relay adds a "carol" request of its own making, on Mallory's key.
            session, _ = await mallory._sending_session("alice")
            envelope, _ = encrypt(session, _plaintext("carol again, new phone", "carol", "alice"))
            await alice._on_deliver([_forged("carol", envelope)])
            [request] = alice.message_requests()
            assert request.name == "carol" and request.messages == 2 and request.keys == 2
            try:
                alice.accept_request("carol")
            except ClientError as exc:
                assert "2 different identity keys" in str(exc)
            else:
                raise AssertionError("a name whose requests came under two keys was accepted")
            assert alice.db.get_contact("carol") is None
        finally:
            for c in (alice, carol, mallory):
                await c.close()
    asyncio.run(scenario())
