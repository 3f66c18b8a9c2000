"""Hostile peers and a hostile relay (findings of the security review, each a regression test).

Peers are real clients on a real relay. What a malicious relay would push is fed through the
client's own delivery path (``Client._on_deliver``), exactly as a ``deliver`` frame would be.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from e2e_support import PASSPHRASE, RelayProcess

from cipherpost.client.client import Client
from cipherpost.client.connection import parse_fingerprint
from cipherpost.client.errors import VerificationError
from cipherpost.client.plaintext import pad
from cipherpost.crypto.encoding import pack
from cipherpost.crypto.session import encrypt


async def _clients(tmp: Path, relay: RelayProcess, *names: str) -> list[Client]:
    clients = []
    for name in names:
        c = await Client.create(tmp / f"home-{name}", name, relay.url, PASSPHRASE,
                                server_fingerprint=parse_fingerprint(relay.fingerprint))
        await c.connect()
        clients.append(c)
    return clients


def _forged(sender: str, body: bytes) -> dict[str, Any]:
    return {"seq": 10**9 + int.from_bytes(os.urandom(3), "big"), "from": sender, "id": os.urandom(16),
            "kind": "msg", "body": body, "ts": 0}


def _plaintext(text: str, written_by: str, written_for: str, sent_at: int | None = None) -> bytes:
    now = int(time.time() * 1000) if sent_at is None else sent_at
    return pad(pack([1, "text", text, now, written_by, written_for]))


def test_a_message_that_cannot_be_stored_does_not_block_the_inbox(tmp_path: Path,
                                                                  relay: RelayProcess) -> None:
    async def scenario() -> None:
        alice, bob = await _clients(tmp_path, relay, "alice", "bob")
        try:
            session, _ = await bob._sending_session("alice")
            envelope, _ = encrypt(session, _plaintext("boom", "bob", "alice", sent_at=2**64 - 1))
            await bob._require_conn().request({"t": "send", "to": "alice", "id": os.urandom(16),
                                               "kind": "msg", "body": envelope})
            await bob.send("alice", "a normal message after it")
            got = await alice.receive(wait=5)
            assert got[0].warning == "undecryptable"
            assert got[-1].text == "a normal message after it"
            await alice.disconnect()
            assert await alice.receive(wait=1) == []          # both were acked: nothing comes back
        finally:
            await alice.close()
            await bob.close()
    asyncio.run(scenario())


def test_relay_cannot_relabel_the_sender(tmp_path: Path, relay: RelayProcess) -> None:
    async def scenario() -> None:
        alice, bob, carol = await _clients(tmp_path, relay, "alice", "bob", "carol")
        try:
            session, _ = await bob._sending_session("alice")
            envelope, _ = encrypt(session, _plaintext("from bob, really", "bob", "alice"))
            shown: list[Any] = []
            alice.add_listener(shown.append)
            await alice._on_deliver([_forged("carol", envelope)])     # the relay says: from carol
            assert len(shown) == 1 and shown[0].warning == "undecryptable"
            assert "written by 'bob'" in shown[0].text
            assert alice.db.get_contact("carol") is None              # nothing pinned for carol
        finally:
            for c in (alice, bob, carol):
                await c.close()
    asyncio.run(scenario())


def test_key_swapped_in_while_comparing_numbers_is_not_pinned(tmp_path: Path, relay: RelayProcess) -> None:
    async def scenario() -> None:
        alice, bob, mallory = await _clients(tmp_path, relay, "alice", "bob", "mallory")
        try:
            await bob.send("alice", "hi alice")
            await alice.receive(wait=3)
            alice.accept_request("bob")                          # a stranger's first message: a request
            real_bob = alice.contact("bob").identity
            shown_key = alice.identity_to_verify("bob")          # the user reads this number aloud
            assert shown_key == real_bob
            # Meanwhile the relay, with Mallory, injects a session "from bob" on Mallory's key.
            session, _ = await mallory._sending_session("alice")
            envelope, _ = encrypt(session, _plaintext("it's me, bob, new phone", "bob", "alice"))
            await alice._on_deliver([_forged("bob", envelope)])
            assert alice.contact("bob").pending_identity == mallory.identity.public.encode()
            # The user says "yes, the numbers match": the key they compared is pinned, not Mallory's.
            contact = alice.accept_identity("bob", shown_key, verified=True)
            assert contact.identity == real_bob and contact.verified
            # If the compared key was itself the pending one and it is swapped again, nothing is pinned.
            await alice._on_deliver([_forged("bob", envelope)])        # a replay: ignored
            session2, _ = await mallory._sending_session("alice")
            env2, _ = encrypt(session2, _plaintext("new phone again", "bob", "alice"))
            await alice._on_deliver([_forged("bob", env2)])
            compared = alice.identity_to_verify("bob")
            await bob.close()
            other = await Client.create(tmp_path / "home-eve", "eve", relay.url, PASSPHRASE,
                                        server_fingerprint=parse_fingerprint(relay.fingerprint))
            await other.connect()
            s3, _ = await other._sending_session("alice")
            env3, _ = encrypt(s3, _plaintext("and again", "bob", "alice"))
            await alice._on_deliver([_forged("bob", env3)])
            assert alice.contact("bob").pending_identity == other.identity.public.encode() != compared
            try:
                alice.accept_identity("bob", compared, verified=True)
            except VerificationError as exc:
                assert "changed while you were comparing" in str(exc)
            else:
                raise AssertionError("a key that is neither pinned nor pending was accepted")
            await other.close()
        finally:
            for c in (alice, mallory):
                await c.close()
    asyncio.run(scenario())


def test_injected_sessions_do_not_evict_the_genuine_one(tmp_path: Path, relay: RelayProcess) -> None:
    async def scenario() -> None:
        alice, bob, mallory = await _clients(tmp_path, relay, "alice", "bob", "mallory")
        try:
            await bob.send("alice", "genuine first")
            await alice.receive(wait=3)
            alice.accept_request("bob")
            await alice.send("bob", "reply")      # bob now uses the session alice answered on
            await bob.receive(wait=3)
            for i in range(8):                    # the relay floods "bob" sessions on Mallory's key
                session, _ = await mallory._sending_session("alice")
                envelope, _ = encrypt(session, _plaintext(f"fake {i}", "bob", "alice"))
                await alice._on_deliver([_forged("bob", envelope)])
            await bob.send("alice", "genuine second")
            texts = [m.text for m in await alice.receive(wait=3)]
            assert "genuine second" in texts
        finally:
            for c in (alice, bob, mallory):
                await c.close()
    asyncio.run(scenario())


def test_plain_ws_is_refused_for_a_tls_pinned_profile_and_off_loopback(relay: RelayProcess) -> None:
    from cipherpost.client.connection import Connection
    from cipherpost.client.errors import ConnectionFailed, ServerPinMismatch

    async def scenario() -> None:
        pin = parse_fingerprint(relay.fingerprint)
        try:
            await Connection.open(f"ws://127.0.0.1:{relay.port}", pin)
        except ServerPinMismatch as exc:
            assert "refusing plain ws://" in str(exc)
        else:
            raise AssertionError("a TLS-pinned profile connected over plain ws://")
        try:
            await Connection.open("ws://192.0.2.1:8765", None)   # never contacted: refused first
        except ConnectionFailed as exc:
            assert "loopback" in str(exc)
        else:
            raise AssertionError("plain ws:// to a non-loopback address was allowed")
    asyncio.run(scenario())


def test_session_rows_moved_in_the_file_are_refused(make_user) -> None:
    import sqlite3
    alice, bob, mallory = make_user("alice"), make_user("bob"), make_user("mallory")
    alice.ok("send", "bob", "to bob")
    alice.ok("send", "mallory", "to mallory")
    bob.recv()
    mallory.recv()
    db = sqlite3.connect(alice.home / "profiles" / "alice" / "profile.db")
    with db:   # someone with write access re-labels Mallory's session as Bob's, with Bob's key column
        bob_identity = db.execute("SELECT identity FROM sessions WHERE contact='bob'").fetchone()[0]
        db.execute("DELETE FROM sessions WHERE contact='bob'")
        db.execute("UPDATE sessions SET contact='bob', identity=?, updated_at=updated_at+1000000"
                   " WHERE contact='mallory'", (bob_identity,))
    db.close()
    result = alice.run("send", "bob", "secret for bob")
    assert result.returncode == 1 and "tampered" in result.stderr
    assert mallory.recv() == []
