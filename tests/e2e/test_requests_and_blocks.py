"""Strangers, blocks and gaps (issue 8, items 6 and 8), through the CLI and a real relay.

A stranger's first message is a request: shown apart, nothing pinned until ``accept``; ``block``
drops a sender's messages unseen (a request in one step); missing messages show as a gap notice.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from e2e_support import PASSPHRASE, RelayProcess

from cipherpost.client.client import Client, pad
from cipherpost.client.connection import parse_fingerprint
from cipherpost.crypto.encoding import pack
from cipherpost.crypto.session import encrypt


def test_a_strangers_message_is_a_request_until_accepted(make_user) -> None:
    alice, carol = make_user("alice"), make_user("carol")
    carol.ok("send", "alice", "hi, we met at the conference")
    [msg] = alice.recv()
    assert msg["from"] == "carol" and msg["text"] == "hi, we met at the conference"
    assert msg["warning"].startswith("message request: carol is not among your contacts")
    assert "cipherpost accept carol" in msg["warning"]
    assert "carol" not in alice.ok("contacts")                         # nothing pinned
    assert alice.run("history", "carol").returncode == 1
    assert "carol: 1 message(s)" in alice.ok("requests")
    carol.ok("send", "alice", "still me")
    [second] = alice.recv()
    assert second["warning"].startswith("message request")              # still a request
    assert "carol: 2 message(s)" in alice.ok("requests")
    out = alice.ok("accept", "carol")
    assert "carol is now a contact" in out
    assert "carol" in alice.ok("contacts") and "no message requests" in alice.ok("requests")
    history = alice.ok("history", "carol")
    assert "we met at the conference" in history and "still me" in history
    carol.ok("send", "alice", "thanks for accepting")
    [third] = alice.recv()
    assert third["warning"] is None and third["text"] == "thanks for accepting"
    alice.ok("send", "carol", "welcome")                                # same session, no new key fetch
    assert [m["text"] for m in carol.recv()] == ["welcome"]
    assert alice.run("accept", "nobody").returncode == 1


def _relay_blocks(relay: RelayProcess) -> list[tuple[str, str]]:
    db = sqlite3.connect(relay.data / "relay.db")
    try:
        return db.execute("SELECT owner, blocked FROM blocks").fetchall()
    finally:
        db.close()


def test_block_drops_a_senders_messages_unseen_and_unblock_restores(make_user, relay: RelayProcess) -> None:
    alice, bob, mallory = make_user("alice"), make_user("bob"), make_user("mallory")
    mallory.ok("send", "alice", "buy my stuff")
    assert alice.recv()[0]["warning"].startswith("message request")
    out = alice.ok("block", "mallory")                                  # blocking a request: one step
    assert "blocked mallory" in out
    assert "no message requests" in alice.ok("requests")
    assert _relay_blocks(relay) == [("alice", "mallory")]              # the relay announced `block`
    for i in range(5):
        mallory.ok("send", "alice", f"spam {i}")
    bob.ok("send", "alice", "a real message")
    assert [m["text"] for m in alice.recv()] == ["a real message"]      # mallory's: dropped unseen
    assert alice.recv() == []                                           # and acked: never back
    assert alice.run("block", "Mallory!").returncode != 0               # names are checked
    assert "unblocked mallory" in alice.ok("unblock", "mallory")
    assert _relay_blocks(relay) == []
    mallory.ok("send", "alice", "am I back?")
    # What was dropped while blocked is gone; the ratchet counters tell how much.
    assert [m["text"] for m in alice.recv()] == [
        "5 messages from mallory did not arrive (if they still come, they are shown then)", "am I back?"]
    assert alice.run("unblock", "mallory").returncode == 1               # not blocked any more


def _plaintext(text: str, written_by: str, written_for: str) -> bytes:
    return pad(pack([1, "text", text, int(time.time() * 1000), written_by, written_for]))


def _delivered(sender: str, body: bytes) -> dict[str, Any]:
    return {"seq": 10**9 + int.from_bytes(os.urandom(3), "big"), "from": sender, "id": os.urandom(16),
            "kind": "msg", "body": body, "ts": 0}


def test_missing_messages_show_as_a_gap_and_late_ones_still_arrive(tmp_path: Path,
                                                                   relay: RelayProcess) -> None:
    async def scenario() -> None:
        clients = []
        for name in ("alice", "bob"):
            c = await Client.create(tmp_path / f"home-{name}", name, relay.url, PASSPHRASE,
                                    server_fingerprint=parse_fingerprint(relay.fingerprint))
            await c.connect()
            clients.append(c)
        alice, bob = clients
        try:
            await bob.send("alice", "first")
            await alice.receive(wait=3)
            alice.accept_request("bob")
            await alice.send("bob", "reply")
            await bob.receive(wait=3)
            # bob writes four; the relay delivers the 1st and the 4th, the 2nd and 3rd are "lost".
            session, _ = await bob._sending_session("alice")
            envelopes = []
            for i in range(4):
                envelope, session = encrypt(session, _plaintext(f"m{i}", "bob", "alice"))
                envelopes.append(envelope)
            await alice._on_deliver([_delivered("bob", envelopes[0])])
            await alice._on_deliver([_delivered("bob", envelopes[3])])
            got = alice.take_new_messages()
            assert [m.text for m in got] == ["m0", "2 messages from bob did not arrive (if they still "
                                                   "come, they are shown then)", "m3"]
            assert got[1].warning == "gap"
            await alice._on_deliver([_delivered("bob", envelopes[1])])   # one comes late after all
            assert [m.text for m in alice.take_new_messages()] == ["m1"]
        finally:
            for c in clients:
                await c.close()
    asyncio.run(scenario())


def test_recv_json_marks_requests_and_names_are_terminal_safe(make_user) -> None:
    alice, carol = make_user("alice"), make_user("carol")
    carol.ok("send", "alice", "hello")
    out = alice.ok("recv")
    assert "WARNING: message request: carol" in out and "carol: hello" in out
    assert alice.recv() == []                                           # shown once
