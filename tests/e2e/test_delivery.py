"""Delivery guarantees end to end: order, offline queues, crashes at the worst moments, damage."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

from e2e_support import PASSPHRASE, RelayProcess, User

from cipherpost.client.client import Client

CRASH_SCRIPT = textwrap.dedent("""
    import asyncio, os, sys
    from pathlib import Path
    from cipherpost.client.client import Client

    home, user, event, action = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

    def observer(name, details):
        if name == event:
            os._exit(17)   # a hard crash: no cleanup, no ack, no outbox flush

    async def main():
        client = Client.open(Path(home), user, os.environ["CIPHERPOST_PASSPHRASE"], observer=observer)
        await client.connect()
        if action == "recv":
            await client.receive(wait=5)
        else:
            await client.send(action.split(":", 1)[0], action.split(":", 1)[1])
        await client.close()

    asyncio.run(main())
""")


def _crash(user: User, event: str, action: str) -> int:
    import os
    env = {**os.environ, "CIPHERPOST_PASSPHRASE": user.passphrase}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(user.home), user.name, event, action],
                          env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode


def test_hundred_offline_messages_arrive_in_order(make_user, relay: RelayProcess) -> None:
    alice, bob = make_user("alice"), make_user("bob")

    async def send_all() -> None:
        async with Client.open(alice.home, "alice", PASSPHRASE) as client:
            await client.connect()
            for i in range(100):
                await client.send("bob", f"message {i:03d}")
            assert client.pending_outbox() == 0
    asyncio.run(send_all())
    received = bob.recv()
    assert [m["text"] for m in received] == [f"message {i:03d}" for i in range(100)]
    assert len({m["id"] for m in received}) == 100
    assert bob.recv() == []


def test_receiver_crash_after_commit_before_ack_shows_message_once(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "survives a crash")
    # bob's client stores the message, then dies before it can ack: the relay still has it.
    assert _crash(bob, "decrypt", "recv") == 17
    # Redelivered, recognised as already stored, acked, and shown exactly once.
    assert [m["text"] for m in bob.recv()] == ["survives a crash"]
    assert bob.recv() == []
    bob.ok("send", "alice", "and the session still works")
    assert [m["text"] for m in alice.recv()] == ["and the session still works"]


def test_sender_crash_before_transmit_is_sent_from_outbox(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    # alice's ratchet state and the envelope are committed, then the process dies before sending.
    assert _crash(alice, "encrypt", "bob:from the outbox") == 17
    assert bob.recv() == []
    # Any later connection flushes the outbox, with the same message id.
    alice.ok("send", "bob", "second")
    assert [m["text"] for m in bob.recv()] == ["from the outbox", "second"]
    history = alice.ok("history", "bob")
    assert "(queued)" not in history


def test_damaged_profile_files_are_clear_errors_and_nothing_is_lost(make_user) -> None:
    alice = make_user("alice")
    make_user("bob")
    alice.ok("send", "bob", "keep me")
    keystore = alice.home / "profiles" / "alice" / "keystore.bin"
    good = keystore.read_bytes()
    for damaged in (good[: len(good) // 2], good[:-1] + bytes([good[-1] ^ 1]), b"", b"garbage" * 10):
        keystore.write_bytes(damaged)
        result = alice.run("history", "bob")
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert "key store" in result.stderr or "wrong passphrase" in result.stderr
    keystore.write_bytes(good)
    assert "keep me" in alice.ok("history", "bob")
    db = alice.home / "profiles" / "alice" / "profile.db"
    saved = db.read_bytes()
    db.write_bytes(b"this is not a database" * 100)
    result = alice.run("history", "bob")
    assert result.returncode == 1 and "damaged" in result.stderr and "Traceback" not in result.stderr
    db.write_bytes(saved)
    assert "keep me" in alice.ok("history", "bob")


def test_tampered_contact_record_is_detected(make_user) -> None:
    import sqlite3
    alice = make_user("alice")
    make_user("bob")
    carol = make_user("carol")
    alice.ok("send", "bob", "x")
    alice.ok("send", "carol", "y")
    assert [m["text"] for m in carol.recv()] == ["y"]
    db = sqlite3.connect(alice.home / "profiles" / "alice" / "profile.db")
    with db:
        # An attacker with write access swaps the trust records of two contacts.
        bob_row = db.execute("SELECT trust FROM contacts WHERE name='bob'").fetchone()[0]
        db.execute("UPDATE contacts SET trust=? WHERE name='carol'", (bob_row,))
    db.close()
    result = alice.run("send", "carol", "who are you?")
    assert result.returncode == 1
    assert "tampered" in result.stderr and "Traceback" not in result.stderr
    assert carol.recv() == []


INIT_CRASH_SCRIPT = textwrap.dedent("""
    import asyncio, os, sys
    from pathlib import Path
    from cipherpost.client.client import Client
    from cipherpost.client.connection import parse_fingerprint

    def observer(name, details):
        if name == "prekeys":
            os._exit(17)   # registered, key store written, prekeys generated but not yet uploaded

    async def main():
        await Client.create(Path(sys.argv[1]), sys.argv[2], sys.argv[3], os.environ["CIPHERPOST_PASSPHRASE"],
                            server_fingerprint=parse_fingerprint(sys.argv[4]), observer=observer)

    asyncio.run(main())
""")


def test_interrupted_first_prekey_upload_is_repaired_on_next_connect(make_user, relay: RelayProcess) -> None:
    import os
    bob = make_user("bob")
    alice = User("alice", bob.home.parent / "home-alice")
    env = {**os.environ, "CIPHERPOST_PASSPHRASE": alice.passphrase}
    crashed = subprocess.run([sys.executable, "-c", INIT_CRASH_SCRIPT, str(alice.home), "alice", relay.url,
                              relay.fingerprint], env=env, capture_output=True, text=True, timeout=60)
    assert crashed.returncode == 17
    result = bob.run("send", "alice", "anyone there?")
    assert result.returncode == 1 and "no_prekeys" in result.stderr      # nothing was published
    alice.ok("recv")                                                      # any connect publishes
    bob.ok("send", "alice", "now you are reachable")
    assert [m["text"] for m in alice.recv()] == ["now you are reachable"]
