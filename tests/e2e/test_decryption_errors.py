"""An undecryptable message asks its sender to resend it in a new session (issue 8, item 9).

Modelled on Signal's decryption-error message (docs/protocol.md "Decryption errors"): the report
goes through the relay, at most once per message and a few times per sender per hour; the sender
acts only on reports about its own recent messages in a session it holds, once per message.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

from e2e_support import PASSPHRASE, RelayProcess, User

from cipherpost.client.client import Client
from cipherpost.client.connection import parse_fingerprint
from cipherpost.client.decryption_errors import ASKS_PER_SENDER_PER_HOUR


def _lose_sessions(user: User) -> None:
    """The user's device lost its session state (say, a profile restored from an old backup)."""
    db = sqlite3.connect(user.home / "profiles" / user.name / "profile.db")
    with db:
        db.execute("DELETE FROM sessions")
    db.close()


def test_undecryptable_message_is_resent_by_its_sender_in_a_new_session(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "hello")
    bob.recv()
    bob.ok("accept", "alice")
    bob.ok("send", "alice", "hi alice")
    assert [m["text"] for m in alice.recv()] == ["hi alice"]
    _lose_sessions(bob)
    alice.ok("send", "bob", "did you get this?")
    [notice] = bob.recv()
    assert notice["warning"] == "undecryptable"
    assert "no session matches" in notice["text"] and "asked alice to send it again" in notice["text"]
    assert alice.recv() == []          # alice's client takes the report and resends, in a new session
    assert [m["text"] for m in bob.recv()] == ["did you get this?"]
    assert "(resent)" in alice.ok("history", "bob")
    bob.ok("send", "alice", "got it now")
    assert [m["text"] for m in alice.recv()] == ["got it now"]


def test_reports_are_bounded_per_sender_and_ignored_for_unknown_messages(tmp_path: Path,
                                                                        relay: RelayProcess) -> None:
    events: dict[str, list[dict[str, Any]]] = {"alice": [], "mallory": []}

    async def scenario() -> None:
        clients = {}
        for name in ("alice", "mallory"):
            def observer(event: str, details: dict[str, Any], name: str = name) -> None:
                events[name].append({"event": event, **details})
            c = await Client.create(tmp_path / f"home-{name}", name, relay.url, PASSPHRASE,
                                    server_fingerprint=parse_fingerprint(relay.fingerprint),
                                    observer=observer)
            await c.connect()
            clients[name] = c
        alice, mallory = clients["alice"], clients["mallory"]
        try:
            async def junk(n: int) -> None:
                for _ in range(n):
                    await mallory._require_conn().request({"t": "send", "to": "alice", "id": os.urandom(16),
                                                           "kind": "msg", "body": b"\x93junk"})

            def asked() -> list[dict[str, Any]]:
                return [e for e in events["alice"] if e["event"] == "derr_sent"]
            await junk(1)
            await alice.receive(wait=3)
            assert len(asked()) == 1
            # The same failed message redelivered (a crash before the ack): not asked about again.
            first = bytes.fromhex(asked()[0]["msg_id"])
            await alice._on_deliver([{"seq": 10**9, "from": "mallory", "id": first, "kind": "msg",
                                      "body": b"\x93junk", "ts": 0}])
            assert len(asked()) == 1
            await junk(9)
            await alice.receive(wait=3)
            assert len(asked()) == ASKS_PER_SENDER_PER_HOUR      # then bounded per sender
            # mallory gets the reports, but they name no message of hers: nothing is resent.
            await mallory.receive(wait=2)
            ignored = [e for e in events["mallory"] if e["event"] == "derr_ignored"]
            assert len(ignored) == ASKS_PER_SENDER_PER_HOUR
            assert all(e["reason"] == "names no message of ours to them" for e in ignored)
            assert not [e for e in events["mallory"] if e["event"] == "resent"]
        finally:
            for c in clients.values():
                await c.close()
    asyncio.run(scenario())
