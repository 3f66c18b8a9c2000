"""Group chats end to end (docs/groups.md): real relay processes, real CLI runs, real clients.

What a hostile relay would push is fed through the client's own delivery path
(``Client._on_deliver``), exactly as a ``deliver`` frame would be (as in test_hostile.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from e2e_support import PASSPHRASE, RelayProcess, User

from cipherpost.client.client import Client
from cipherpost.client.connection import parse_fingerprint
from cipherpost.client.group_receive import _ad
from cipherpost.client.group_state import sign_change
from cipherpost.client.group_wire import encode_control
from cipherpost.crypto.errors import UnknownSenderKey
from cipherpost.crypto.sender_keys import group_decrypt


def _texts(rows: list[dict[str, Any]], sender: str | None = None) -> list[str]:
    return [str(r["text"]) for r in rows if r.get("group") == "team" and r["from"] and
            (sender is None or r["from"] == sender)]


def test_group_lifecycle_with_cli(make_user) -> None:  # type: ignore[no-untyped-def]
    alice, bob, carol, dave = (make_user(n) for n in ("alice", "bob", "carol", "dave"))
    alice.ok("group", "create", "team", "bob", "carol")
    for user in (bob, carol):
        assert any("alice added you to the group team" in str(r["text"]) for r in user.recv())
    alice.ok("send", "--group", "team", "a1")
    alice.ok("send", "--group", "team", "a2")
    bob.ok("send", "--group", "team", "b1")
    carol.ok("send", "--group", "team", "c1")
    got = {u.name: u.recv() for u in (alice, bob, carol)}
    assert _texts(got["alice"]) == ["b1", "c1"]
    assert _texts(got["bob"], "alice") == ["a1", "a2"] and _texts(got["bob"], "carol") == ["c1"]
    assert _texts(got["carol"], "alice") == ["a1", "a2"] and _texts(got["carol"], "bob") == ["b1"]
    assert all(r["group"] == "team" for r in got["bob"])

    alice.ok("group", "add", "team", "dave")
    alice.ok("send", "--group", "team", "a3")
    dave_rows = dave.recv()
    assert _texts(dave_rows) == ["a3"]          # nothing from before dave joined
    dave.ok("send", "--group", "team", "d1")
    for user in (alice, bob, carol):
        assert "d1" in _texts(user.recv(), "dave")

    alice.ok("group", "remove", "team", "carol")
    alice.ok("send", "--group", "team", "after carol left")
    carol_rows = carol.recv()
    assert any("alice removed carol" in str(r["text"]) for r in carol_rows)
    assert _texts(carol_rows) == []
    for user in (bob, dave):
        assert "after carol left" in _texts(user.recv(), "alice")

    history = [json.loads(line) for line in alice.ok("group", "history", "team", "--json").splitlines()]
    said = [(h["from"], h["text"]) for h in history if h["direction"] != "event"]
    assert said[:4] == [("alice", "a1"), ("alice", "a2"), ("bob", "b1"), ("carol", "c1")]
    assert "alice: a1" in alice.ok("group", "history", "team")
    bob.ok("group", "leave", "team")
    assert any("bob left team" in str(r["text"]) for r in alice.recv())
    info = alice.ok("group", "info", "team", "--json")
    assert '"members": ["alice", "dave"]' in info
    assert '"status": "left"' in bob.ok("group", "list", "--json")
    assert "carol" not in alice.ok("group", "info", "team")
    result = bob.run("send", "--group", "team", "still here?")
    assert result.returncode == 1 and "no longer a member" in result.stderr
    assert "Traceback" not in result.stderr


async def _clients(tmp: Path, relay: RelayProcess, *names: str) -> list[Client]:
    clients = []
    for name in names:
        c = await Client.create(tmp / f"home-{name}", name, relay.url, PASSPHRASE,
                                server_fingerprint=parse_fingerprint(relay.fingerprint))
        await c.connect()
        clients.append(c)
    return clients


def _grp(sender: str, body: bytes, msg_id: bytes | None = None) -> dict[str, Any]:
    return {"seq": 10**9 + int.from_bytes(os.urandom(3), "big"), "from": sender,
            "id": msg_id or os.urandom(16), "kind": "grp", "body": body, "ts": 0}


async def _held_back(client: Client, group: str, text: str) -> tuple[bytes, bytes]:
    """Send while disconnected and return (id, body) as it waits in the group outbox: what the
    relay would hold; reconnecting sends it."""
    await client.disconnect()
    msg_id = await client.send_group(group, text)
    item = next(i for i in client.groups.store.outbox() if i[0] == msg_id)
    return msg_id, item[1]


async def _texts_of(client: Client, wait: float = 3.0) -> list[str]:
    return [m.text for m in await client.receive(wait=wait) if m.group == "team" and m.sender]


@pytest.mark.xfail(strict=False, reason="known bug (issue 12 left open): run after the other tests of this "
                   "file, bob's first message after the rotation never reaches dave, who got bob's "
                   "sender key for another chain; passes when run alone")
def test_removed_member_cannot_decrypt_after_rotation(tmp_path: Path, relay: RelayProcess) -> None:
    async def scenario() -> None:
        alice, bob, carol, dave = await _clients(tmp_path, relay, "alice", "bob", "carol", "dave")
        try:
            await alice.create_group("team", ["bob", "carol"])
            await bob.receive(wait=2)
            await carol.receive(wait=2)
            await alice.send_group("team", "before")
            assert await _texts_of(bob) == ["before"] and await _texts_of(carol) == ["before"]
            _, before_dave = await _held_back(alice, "team", "secret before dave")
            await alice.connect()
            await alice.group_add("team", ["dave"])
            await dave.receive(wait=2)
            # A relay hands dave a message from before he joined: he cannot read it.
            await dave._on_deliver([_grp("alice", before_dave)])
            await dave.receive(wait=2)
            assert not any(m.text == "secret before dave" for m in dave.group_history("team"))

            await bob.disconnect()
            await alice.group_remove("team", ["carol"])
            await carol.receive(wait=2)
            assert carol.group_info("team").status == "removed"
            # bob, offline, has not seen the removal: his message is written for his old view.
            await bob.send_group("team", "bob before seeing the removal")
            await bob.connect()
            assert "bob before seeing the removal" in await _texts_of(alice)
            await bob.receive(wait=2)                 # now bob has seen it: his next send rotates
            assert "carol" not in [m.name for m in bob.group_info("team").members]
            _, after_bob = await _held_back(bob, "team", "bob after the removal")
            _, after_alice = await _held_back(alice, "team", "alice after the removal")
            await bob.connect()
            await alice.connect()
            # bob's message may need dave to fetch bob's new sender key first (a resend request):
            # it comes, but not necessarily in the same quiet period as alice's.
            seen: list[str] = []
            for _ in range(10):
                seen += await _texts_of(dave, wait=1.0)
                if "bob after the removal" in seen:
                    break
            assert "bob after the removal" in seen
            # carol's client, kept running, is handed both by a colluding relay.
            await carol.receive(wait=2)
            gid = bytes.fromhex(carol.group_info("team").group_id)
            assert carol.groups.store.key(gid, "alice") is not None   # she holds alice's old chain
            await carol._on_deliver([_grp("bob", after_bob), _grp("alice", after_alice)])
            assert not any("after the removal" in m.text for m in carol.group_history("team"))
            for sender, body in (("bob", after_bob), ("alice", after_alice)):
                record = carol.groups.store.key(gid, sender)
                if record is None:
                    continue   # bob could not reach her while offline: she never had his key
                try:
                    group_decrypt(record, body, _ad(gid, sender))
                except UnknownSenderKey:
                    pass   # her keys are of the chains before the rotation
                else:
                    raise AssertionError("a removed member decrypted a message sent after the rotation")
        finally:
            for c in (alice, bob, carol, dave):
                await c.close()
    asyncio.run(scenario())


def test_relay_injected_forged_change_is_refused(tmp_path: Path, relay: RelayProcess) -> None:
    async def scenario() -> None:
        alice, bob, carol, mallory = await _clients(tmp_path, relay, "alice", "bob", "carol", "mallory")
        try:
            await alice.create_group("team", ["bob", "carol"])
            await bob.receive(wait=2)
            await carol.receive(wait=2)
            state = bob.groups.store.by_name("team").current
            mallory_entry = [["mallory", mallory.identity.public.encode()]]
            # 1. mallory (an account the relay's operator holds) signs as "alice".
            forged = sign_change(mallory.identity, "alice", state, state.group_id, "add", mallory_entry)
            async with mallory._state_lock:
                await mallory.groups._queue_pairwise("bob", encode_control("change", state.group_id,
                                                                           forged.encode()))
            await mallory.flush_outbox()
            # 2. bob, a member but not an admin, adds mallory in a message to carol.
            by_bob = sign_change(bob.identity, "bob", state, state.group_id, "add", mallory_entry)
            async with bob._state_lock:
                await bob.groups._queue_pairwise("carol", encode_control("change", state.group_id,
                                                                         by_bob.encode()))
            await bob.flush_outbox()
            bob_seen = await bob.receive(wait=2)
            carol_seen = await carol.receive(wait=2)
            assert any("refused a group update" in m.text for m in bob_seen)
            assert any("not an admin" in m.text for m in carol_seen)
            for c in (bob, carol):
                assert sorted(m.name for m in c.group_info("team").members) == ["alice", "bob", "carol"]
            # 3. mallory writes to the group's fan-out: refused, not a member.
            await alice.send_group("team", "members only")
            await bob.receive(wait=2)
            body = bob.db.history("#" + state.group_id.hex(), 5)
            assert [m.text for m in body if m.direction == "in"] == ["members only"]
        finally:
            for c in (alice, bob, carol, mallory):
                await c.close()
    asyncio.run(scenario())


def test_relay_reorder_and_replay_detected(tmp_path: Path, relay: RelayProcess) -> None:
    async def scenario() -> None:
        alice, bob = await _clients(tmp_path, relay, "alice", "bob")
        try:
            await alice.create_group("team", ["bob"])
            await bob.receive(wait=2)
            _, _m0 = await _held_back(alice, "team", "m0")
            skd = [i for i in alice.db.outbox() if i.contact == "bob"]
            assert len(skd) == 1                   # alice's sender key for bob, in their session
            await alice.connect()
            assert await _texts_of(bob) == ["m0"]
            gid = bytes.fromhex(bob.group_info("team").group_id)
            key_before = bob.groups.store.key(gid, "alice")
            assert key_before is not None

            held = [await _held_back(alice, "team", f"m{i}") for i in (1, 2, 3)]
            (id1, m1), (id2, m2), (id3, m3) = held
            await bob._on_deliver([_grp("alice", m3, id3), _grp("alice", m1, id1), _grp("alice", m2, id2)])
            shown = [m for m in bob.take_new_messages() if m.group == "team"]
            assert [m.text for m in shown] == ["m3", "m1", "m2"]
            assert ["out of order" in (m.warning or "") for m in shown] == [False, True, True]
            # The same ciphertext again under a new relay id: a replay, refused and said so.
            await bob._on_deliver([_grp("alice", m1)])
            again = bob.take_new_messages()
            assert [m.text for m in again if m.group == "team" and m.sender] == []
            assert any("replay" in m.text for m in again)
            # The sender-key distribution replayed (a pairwise message): no effect, no rewind.
            key_now = bob.groups.store.key(gid, "alice")
            assert key_now is not None
            replay = {"seq": 10**9 + 7, "from": "alice", "id": os.urandom(16), "kind": "msg",
                      "body": skd[0].envelope, "ts": 0}
            await bob._on_deliver([replay])
            assert [m for m in bob.take_new_messages() if m.group == "team"] == []
            after = bob.groups.store.key(gid, "alice")
            assert after is not None and after.serialize() == key_now.serialize()
            await bob._on_deliver([_grp("alice", m2)])   # still refused after the replayed key
            assert [m.text for m in bob.take_new_messages() if m.group == "team" and m.sender] == []
            await alice.connect()
        finally:
            await alice.close()
            await bob.close()
    asyncio.run(scenario())


def test_missed_sender_key_is_resent_on_request(tmp_path: Path, relay: RelayProcess) -> None:
    async def scenario() -> None:
        alice, bob = await _clients(tmp_path, relay, "alice", "bob")
        try:
            await alice.create_group("team", ["bob"])
            await bob.receive(wait=2)
            msg_id, body = await _held_back(alice, "team", "needs a key")
            lost = [i for i in alice.db.outbox() if i.contact == "bob"]
            assert len(lost) == 1                  # the sender key distribution, not sent yet
            with alice.db.transaction():           # the relay loses it
                alice.db.remove_outbox(lost[0].msg_id)
            await bob._on_deliver([_grp("alice", body, msg_id)])
            assert bob.take_new_messages() == []   # kept, and alice was asked for her key
            await alice.connect()
            await alice.receive(wait=3)            # alice answers the resend request
            assert "needs a key" in await _texts_of(bob)
        finally:
            await alice.close()
            await bob.close()
    asyncio.run(scenario())


def test_cli_refuses_unknown_group_and_bad_input(make_user) -> None:  # type: ignore[no-untyped-def]
    alice: User = make_user("alice")
    make_user("bob")
    for args, needle in ((("send", "--group", "nope", "hi"), "no group named"),
                         (("group", "create", "team", "alice"), "always a member"),
                         (("group", "create", "team", "nobody"), "nobody")):
        result = alice.run(*args)
        assert result.returncode != 0 and needle in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    alice.ok("group", "create", "team", "bob")
    result = alice.run("group", "create", "team", "bob")
    assert result.returncode == 1 and "already have a group" in result.stderr


def test_substituted_bundle_gets_no_sender_key(make_user, relay: RelayProcess) -> None:  # type: ignore[no-untyped-def]
    import sqlite3
    alice, bob, carol, _mallory = (make_user(n) for n in ("alice", "bob", "carol", "mallory"))
    alice.ok("group", "create", "team", "bob", "carol")
    bob.recv()
    carol.recv()
    # The relay serves mallory's keys under carol's name to bob, who never talked to carol.
    relay.stop()
    with sqlite3.connect(relay.data / "relay.db") as db:
        identity, spk, kem = db.execute("SELECT identity, signed_prekey, kem_last_resort FROM accounts "
                                        "WHERE username='mallory'").fetchone()
        db.execute("UPDATE accounts SET identity=?, signed_prekey=?, kem_last_resort=? "
                   "WHERE username='carol'", (identity, spk, kem))
        db.execute("DELETE FROM one_time_prekeys WHERE username='carol'")
        db.execute("INSERT INTO one_time_prekeys SELECT 'carol', kind, key_id, data FROM one_time_prekeys "
                   "WHERE username='mallory'")
    relay.start(port=relay.port)
    bob.ok("send", "--group", "team", "for the group only")
    info = bob.ok("group", "info", "team", "--json")
    assert '"key_changed": ["carol"]' in info
    with sqlite3.connect(relay.data / "relay.db") as db:
        kinds = [k for (k,) in db.execute("SELECT kind FROM messages WHERE sender='bob' "
                                          "AND recipient='carol'")]
    assert "msg" not in kinds   # no pairwise message to carol: no sender key under mallory's keys
    assert "for the group only" in _texts(alice.recv(), "bob")


def test_refused_recipients_alone_are_retried(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay")
    relay.start(extra=["--max-queue-per-sender", "3"])

    async def scenario() -> None:
        alice, bob, carol = await _clients(tmp_path, relay, "alice", "bob", "carol")
        try:
            await alice.create_group("team", ["bob", "carol"])
            await bob.receive(wait=2)
            await carol.receive(wait=2)
            await bob.disconnect()        # bob is away: his queue from alice fills up (carol reads live)
            for i in range(2):
                await alice.send_group("team", f"m{i}")      # bob: sender key + m0 + m1 = 3 queued
            await alice.send_group("team", "m2")             # bob: sender_cap; carol: accepted
            waiting = alice.groups.store.outbox()
            assert len(waiting) == 1 and waiting[0][2] == ["bob"]   # only the refused recipient
            assert [m.status for m in alice.group_history("team") if m.direction == "out"] == [
                "sent", "sent", "queued"]
            assert await _texts_of(bob) == ["m0", "m1"]
            await alice.disconnect()
            await alice.connect()                            # retried: to bob alone
            assert alice.groups.store.outbox() == []
            assert await _texts_of(bob) == ["m2"]
            assert await _texts_of(carol) == ["m0", "m1", "m2"]   # once each
        finally:
            for c in (alice, bob, carol):
                await c.close()
    try:
        asyncio.run(scenario())
    finally:
        relay.stop()


def test_group_too_large_for_the_relay_is_refused_clearly(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay")
    relay.start(extra=["--max-body", "2780"])
    try:
        users = [User(n, tmp_path / f"home-{n}") for n in ("alice", "bob", "carol")]
        for user in users:
            user.ok("init", user.name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)
        alice = users[0]
        result = alice.run("group", "create", "team", "bob", "carol")
        assert result.returncode == 1 and "does not fit in one message" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert alice.ok("group", "list", "--json") == ""    # nothing stored
        alice.ok("group", "create", "pair", "bob")          # a smaller one fits
        assert any("added you to the group pair" in str(r["text"]) for r in users[1].recv())
    finally:
        relay.stop()


async def _settle(clients: list[Client], rounds: int = 3) -> None:
    for _ in range(rounds):
        for c in clients:
            await c.receive(wait=1)


def test_two_admins_changing_at_once_converge(tmp_path: Path, relay: RelayProcess) -> None:
    async def scenario() -> None:
        clients = await _clients(tmp_path, relay, "alice", "bob", "carol", "dave")
        alice, bob, carol, dave = clients
        try:
            await alice.create_group("team", ["bob", "carol"], admins=("bob",))
            await _settle([bob, carol])
            await bob.disconnect()                     # bob does not see alice's change in time
            await alice.group_add("team", ["dave"])     # version 2 by alice
            await bob.group_remove("team", ["carol"])   # version 2 by bob, on the same base
            await bob.connect()
            await _settle(clients)
            states = {c.username: c.group_info("team") for c in (alice, bob, dave)}
            hashes = {c.username: c.groups.store.by_name("team").current.hash() for c in (alice, bob, dave)}
            assert len(set(hashes.values())) == 1, states     # one state everywhere
            final = states["alice"]
            assert final.version == 3                          # both changes, in the rule's order
            assert sorted(m.name for m in final.members) == ["alice", "bob", "dave"]
            assert carol.group_info("team").status == "removed"
        finally:
            for c in clients:
                await c.close()
    asyncio.run(scenario())


def test_member_that_missed_a_change_asks_and_catches_up(tmp_path: Path, relay: RelayProcess) -> None:
    async def scenario() -> None:
        clients = await _clients(tmp_path, relay, "alice", "bob", "carol", "dave")
        alice, bob, carol, _dave = clients
        try:
            await alice.create_group("team", ["bob", "carol"])
            await _settle([bob, carol])
            await alice.disconnect()
            await alice.group_remove("team", ["bob"])          # version 2, queued
            lost = [i for i in alice.db.outbox() if i.contact == "carol"]
            assert len(lost) == 1
            with alice.db.transaction():                      # the relay loses carol's copy
                alice.db.remove_outbox(lost[0].msg_id)
            await alice.connect()
            await alice.group_add("team", ["dave"])            # version 3: carol cannot apply it alone
            await _settle([carol, alice, carol])
            info = carol.group_info("team")
            assert info.version == 3 and sorted(m.name for m in info.members) == ["alice", "carol", "dave"]
            await alice.send_group("team", "all caught up")
            assert "all caught up" in await _texts_of(carol)
        finally:
            for c in clients:
                await c.close()
    asyncio.run(scenario())


def test_a_group_message_from_a_newer_state_brings_the_missed_change(tmp_path: Path,
                                                                     relay: RelayProcess) -> None:
    async def scenario() -> None:
        clients = await _clients(tmp_path, relay, "alice", "bob", "carol")
        alice, bob, carol = clients
        try:
            await alice.create_group("team", ["bob", "carol"])
            await _settle([bob, carol])
            await alice.disconnect()
            await alice.group_remove("team", ["bob"])          # version 2, queued
            lost = [i for i in alice.db.outbox() if i.contact == "carol"]
            with alice.db.transaction():                      # the relay loses carol's copy
                alice.db.remove_outbox(lost[0].msg_id)
            await alice.connect()
            await alice.send_group("team", "written at version 2")   # no later change comes
            assert "written at version 2" in await _texts_of(carol)
            await _settle([alice, carol])
            info = carol.group_info("team")
            assert info.version == 2 and sorted(m.name for m in info.members) == ["alice", "carol"]
        finally:
            for c in clients:
                await c.close()
    asyncio.run(scenario())


def test_members_pinned_by_the_group_are_contacts_not_requests(make_user) -> None:  # type: ignore[no-untyped-def]
    """main's message-request rule (a stranger's first message is a request) does not reach group
    members: the admin-signed state pins them as contacts, even for a member whose 1:1 messages
    arrive in the same batch as the change that pins them, before and after it."""
    alice, bob, carol = (make_user(n) for n in ("alice", "bob", "carol"))
    carol.ok("send", "bob", "early")               # a stranger to bob for now: a request
    alice.ok("group", "create", "team", "bob", "carol")
    carol.ok("send", "bob", "late")                # bob has not received the group yet
    rows = {str(r["text"]): r for r in bob.recv()}  # one batch: early, the group, late
    assert str(rows["early"]["warning"]).startswith("message request")
    assert any("alice added you to the group team" in text for text in rows)
    assert rows["late"]["warning"] is None          # carol was pinned by the group in between
    assert bob.ok("requests").strip() == "no message requests"
    history = [json.loads(line) for line in bob.ok("history", "carol", "--json").splitlines()]
    assert [(h["text"], h["status"]) for h in history] == [("early", "shown"), ("late", "shown")]
    # Later 1:1 traffic between members is ordinary: no request, no warning, both ways.
    carol.recv()
    bob.ok("send", "carol", "hello member")
    [got] = [r for r in carol.recv() if r["text"] == "hello member"]
    assert got["warning"] is None and got["group"] is None
    assert carol.ok("requests").strip() == "no message requests"
