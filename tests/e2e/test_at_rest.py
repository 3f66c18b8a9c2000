"""At rest (issue 8 items 10-11; docs/at-rest.md): once a commit that replaced secret state has
returned, no file of the profile still holds the old sealed state, and stored message records
show only a padded length."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from e2e_support import PASSPHRASE

from cipherpost.client.client import Client
from cipherpost.client.plaintext import PAD_BLOCK
from cipherpost.crypto.records import NONCE_LEN, TAG_LEN

WINDOW = 32


def _files(profile: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in profile.iterdir() if p.is_file()}


def _traces(secret: bytes, profile: Path) -> list[str]:
    """Names of the profile files holding any 32-byte piece of ``secret`` (a sealed record:
    random nonce and ciphertext, so a piece of it cannot occur by chance)."""
    pieces = [secret[i : i + WINDOW] for i in range(0, len(secret) - WINDOW, WINDOW // 2)]
    return sorted(name for name, data in _files(profile).items() if any(p in data for p in pieces))


def _raw(client: Client, sql: str) -> list[bytes]:
    return [row[0] for row in client.db._db.execute(sql).fetchall()]


def test_superseded_ratchet_states_and_prekeys_are_in_no_profile_file(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    profile = bob.home / "profiles" / "bob"

    async def scenario() -> None:
        async with Client.open(bob.home, "bob", PASSPHRASE) as b:
            await b.connect()
            [old_prekeys] = _raw(b, "SELECT value FROM meta WHERE key='prekeys'")
            alice.ok("send", "bob", "one")          # uses one of bob's one-time prekeys
            assert [m.text for m in await b.receive(wait=10)] == ["one"]
            assert _traces(old_prekeys, profile) == []
            states = []
            for text in ("two", "three", "four"):
                [state] = _raw(b, "SELECT state FROM sessions")
                states.append(state)
                alice.ok("send", "bob", text)
                assert [m.text for m in await b.receive(wait=10)] == [text]
                # The client is still running: the commit has returned, nothing more.
                for old in states:
                    assert _traces(old, profile) == []
            [current] = _raw(b, "SELECT state FROM sessions")
            assert _traces(current, profile) == ["profile.db"]   # the search does find a live one
    asyncio.run(scenario())
    # The sender side, through the CLI: each send replaces alice's sending state.
    alice_profile = alice.home / "profiles" / "alice"
    db = sqlite3.connect(alice_profile / "profile.db")
    [before] = [r[0] for r in db.execute("SELECT state FROM sessions")]
    db.close()
    alice.ok("send", "bob", "five")
    assert _traces(before, alice_profile) == []
    assert not (alice_profile / "profile.db-wal").exists() or \
        (alice_profile / "profile.db-wal").stat().st_size == 0


def test_stored_message_records_show_only_a_padded_length(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    texts = ["a", "ab" * 10, "x" * 100]
    alice.ok("send", "bob", "--stdin", stdin="\n".join(texts) + "\n")
    assert [m["text"] for m in bob.recv()] == texts
    for user in (alice, bob):
        db = sqlite3.connect(user.home / "profiles" / user.name / "profile.db")
        sizes = {len(r[0]) for r in db.execute("SELECT body FROM messages")}
        db.close()
        # nonce + version byte + padded record + tag: one bucket for all three lengths
        assert {(n - NONCE_LEN - TAG_LEN - 1) % PAD_BLOCK for n in sizes} == {0}
        assert len(sizes) == 1


CRASH_AFTER_COMMIT = """
import asyncio, os, sys
from pathlib import Path
from cipherpost.client import profile
from cipherpost.client.client import Client

calls = []
real_scrub = profile.ProfileDB._scrub

def scrub(self):
    calls.append(1)
    if len(calls) > 1:        # the first scrub is the one at open
        os._exit(17)          # a crash after a commit, before its scrub
    real_scrub(self)

profile.ProfileDB._scrub = scrub

async def main():
    client = Client.open(Path(sys.argv[1]), "bob", os.environ["CIPHERPOST_PASSPHRASE"])
    await client.receive(wait=10)

asyncio.run(main())
"""


def test_states_superseded_before_a_crash_leave_the_wal_at_the_next_open(make_user) -> None:
    import os
    import subprocess
    import sys
    alice, bob = make_user("alice"), make_user("bob")
    profile = bob.home / "profiles" / "bob"
    alice.ok("send", "bob", "one")
    assert [m["text"] for m in bob.recv()] == ["one"]
    bob.ok("accept", "alice")                              # alice was a stranger: a request
    db = sqlite3.connect(profile / "profile.db")
    [old] = [r[0] for r in db.execute("SELECT state FROM sessions")]
    db.close()
    alice.ok("send", "bob", "two")
    crashed = subprocess.run([sys.executable, "-c", CRASH_AFTER_COMMIT, str(bob.home)], timeout=60,
                             env={**os.environ, "CIPHERPOST_PASSPHRASE": PASSPHRASE},
                             capture_output=True, text=True)
    assert crashed.returncode == 17, crashed.stderr
    # The crash left it readable: the new state is only in the WAL, the database file still has
    # the old page...
    assert _traces(old, profile) == ["profile.db"]
    assert "two" in bob.ok("history", "alice")            # ...until the next open scrubs it
    assert _traces(old, profile) == []
