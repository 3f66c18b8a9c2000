"""Client behaviour over a real relay: prekey upkeep, reconnects, undecryptable input, QR output."""

from __future__ import annotations

import asyncio

import pytest
from e2e_support import PASSPHRASE, RelayProcess, User

import cipherpost.client.client as client_module
from cipherpost.client.client import Client, IncomingMessage
from cipherpost.crypto.prekeys import PrekeyBundle


async def _wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def test_one_time_prekeys_are_replenished_when_the_relay_says_low(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Draining a pool needs more fetches of one person than the relay's default quota allows.
    relay = RelayProcess(tmp_path / "generous-relay")
    relay.start(extra=["--bundle-fetches-per-target-per-hour", "1000",
                       "--one-time-prekeys-per-target-per-hour", "1000"])
    alice, bob = User("alice", tmp_path / "home-alice"), User("bob", tmp_path / "home-bob")
    for user in (alice, bob):
        user.ok("init", user.name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)

    async def scenario() -> None:
        async with Client.open(alice.home, "alice", PASSPHRASE) as a, \
                Client.open(bob.home, "bob", PASSPHRASE) as b:
            await a.connect()
            await b.connect()
            start = a.prekeys.one_time_count
            seen_ids = set()
            for _ in range(95):   # bob drains alice's pools (as 95 first contacts would)
                reply = await b._require_conn().request({"t": "fetch_bundle", "username": "alice"})
                bundle = PrekeyBundle.from_parts(reply["identity"], reply["signed_prekey"],
                                                 reply["kem_prekey"], reply.get("one_time_prekey"))
                assert bundle.one_time_prekey is not None
                seen_ids.add(bundle.one_time_prekey.key_id)
            assert len(seen_ids) == 95     # every fetch consumed a different one-time prekey
            # The relay pushed prekeys_low to alice, whose client generated and uploaded more.
            await _wait_for(lambda: a.prekeys.one_time_count > start)
            reply = await b._require_conn().request({"t": "fetch_bundle", "username": "alice"})
            assert reply.get("one_time_prekey") is not None
    try:
        asyncio.run(scenario())
    finally:
        relay.stop()


def test_signed_prekey_rotates_when_due(make_user, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = make_user("alice"), make_user("bob")

    async def signed_prekey_id() -> int:
        async with Client.open(bob.home, "bob", PASSPHRASE) as b:
            await b.connect()
            reply = await b._require_conn().request({"t": "fetch_bundle", "username": "alice"})
            return PrekeyBundle.from_parts(reply["identity"], reply["signed_prekey"], reply["kem_prekey"],
                                           reply.get("one_time_prekey")).signed_prekey.key_id

    async def connect_alice() -> None:
        async with Client.open(alice.home, "alice", PASSPHRASE) as a:
            await a.connect()

    before = asyncio.run(signed_prekey_id())
    asyncio.run(connect_alice())
    assert asyncio.run(signed_prekey_id()) == before          # not due yet: unchanged
    monkeypatch.setattr(client_module, "SIGNED_PREKEY_LIFETIME_MS", -1)   # every key is now "old"
    asyncio.run(connect_alice())
    assert asyncio.run(signed_prekey_id()) != before
    # Sessions built on the new signed prekey work.
    bob.ok("send", "alice", "on the rotated key")
    assert [m["text"] for m in alice.recv()] == ["on the rotated key"]


def test_client_reconnects_after_relay_restart(make_user, relay: RelayProcess) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    statuses: list[str] = []

    async def scenario() -> None:
        async with Client.open(alice.home, "alice", PASSPHRASE) as a:
            got: asyncio.Queue[IncomingMessage] = asyncio.Queue()
            a.add_listener(got.put_nowait)
            keeper = asyncio.create_task(a.stay_connected(statuses.append))
            await _wait_for(lambda: a.connected)
            await asyncio.to_thread(relay.stop)
            await _wait_for(lambda: any("disconnected" in s for s in statuses))
            await asyncio.to_thread(relay.start, relay.port)
            await _wait_for(lambda: a.connected, timeout=20)
            await asyncio.to_thread(bob.ok, "send", "alice", "after the restart")
            message = await asyncio.wait_for(got.get(), timeout=10)
            assert message.text == "after the restart"
            keeper.cancel()
    asyncio.run(scenario())
    assert statuses[0] == "connected" and statuses.count("connected") >= 2


def test_undecryptable_message_is_reported_not_shown(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")

    async def send_garbage() -> None:
        async with Client.open(alice.home, "alice", PASSPHRASE) as a:
            await a.connect()
            await a._require_conn().request({"t": "send", "to": "bob", "id": bytes(16), "kind": "msg",
                                             "body": b"\x93\x01\x02\x03 not an envelope"})
    asyncio.run(send_garbage())
    [report] = bob.recv()
    assert report["from"] == "alice"
    assert report["warning"] == "undecryptable"
    assert "could not decrypt a message from alice" in report["text"]
    assert "not an envelope" not in report["text"]
    # The broken message was acked: it does not come back, and the conversation still works.
    assert bob.recv() == []
    alice.ok("send", "bob", "a real one")
    assert [m["text"] for m in bob.recv()] == ["a real one"]


def test_fingerprint_and_safety_number_output(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "hi")
    bob.recv()
    bob.ok("accept", "alice")
    own = alice.ok("fingerprint")
    assert own.startswith("alice: SHA256:")
    a_view = alice.ok("fingerprint", "bob", "--qr")
    b_view = bob.ok("fingerprint", "alice")
    digits_a = "".join(ch for ch in a_view.split("\n", 1)[1] if ch.isdigit())[:60]
    digits_b = "".join(ch for ch in b_view if ch.isdigit())[:60]
    assert len(digits_a) == 60 and digits_a == digits_b
    assert "█" in a_view or "▀" in a_view or "▄" in a_view     # the QR code was drawn


def test_a_refused_outbox_entry_does_not_stop_reconnecting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    relay = RelayProcess(tmp_path / "small-queue-relay")
    relay.start(extra=["--max-queue", "1"])
    alice, bob = User("alice", tmp_path / "home-alice"), User("bob", tmp_path / "home-bob")
    for user in (alice, bob):
        user.ok("init", user.name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)
    statuses: list[str] = []

    async def scenario() -> None:
        async with Client.open(alice.home, "alice", PASSPHRASE) as a:
            keeper = asyncio.create_task(a.stay_connected(statuses.append))
            await _wait_for(lambda: a.connected)
            await a.send("bob", "fills bob's mailbox")
            try:
                await a.send("bob", "refused: mailbox full")
            except Exception as exc:
                assert "mailbox_full" in str(exc)
            else:
                raise AssertionError("the relay accepted a message beyond its queue limit")
            assert a.pending_outbox() == 1
            await asyncio.to_thread(relay.stop)       # the reconnect flushes the outbox: refused again
            await asyncio.to_thread(relay.start, relay.port)
            await _wait_for(lambda: statuses.count("connected") >= 2, timeout=20)
            await asyncio.sleep(0.5)
            assert not keeper.done(), keeper.exception() if keeper.done() else None
            assert a.pending_outbox() == 1            # still queued, not lost
            await asyncio.to_thread(bob.recv)         # bob drains his mailbox...
            await asyncio.to_thread(relay.stop)       # ...and the next reconnect delivers the rest
            await asyncio.to_thread(relay.start, relay.port)
            await _wait_for(lambda: a.pending_outbox() == 0, timeout=20)
            keeper.cancel()
    try:
        asyncio.run(scenario())
        assert [m["text"] for m in bob.recv()] == ["refused: mailbox full"]
    finally:
        relay.stop()


def test_receive_on_an_open_connection_ends_with_the_relays_drained(make_user) -> None:  # type: ignore[no-untyped-def]
    """The relay says `drained` once per connection; a second `receive()` on the same connection
    must not wait for another one (it waited 30 s), and still gets what came since."""
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "first")

    async def scenario() -> None:
        async with Client.open(bob.home, "bob", PASSPHRASE) as b:
            first = await asyncio.wait_for(b.receive(), 10)
            assert [m.sender for m in first] == ["alice"]
            assert "drained" in b._require_conn().caps
            nothing = await asyncio.wait_for(b.receive(), 10)   # bounded: it must not wait for 30 s
            assert nothing == []
            await asyncio.to_thread(alice.ok, "send", "bob", "second")
            later = await asyncio.wait_for(b.receive(wait=10), 20)
            assert [m.sender for m in later] == ["alice"]
    asyncio.run(scenario())
