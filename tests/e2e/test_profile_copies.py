"""One live copy of a profile (issue 8 item 7): the login counter, through a real relay and CLI.

Two copies of one profile would encrypt under the same sending chains (AES-GCM key and nonce reuse)
and take each other's mail. A copied profile folder must be refused as an old copy, for good, and a
newer login must close the older connection with a reason.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from e2e_support import PASSPHRASE, RelayProcess, User

from cipherpost.client.client import Client
from cipherpost.client.errors import StaleProfile


def _copy(user: User, home: Path) -> User:
    shutil.copytree(user.home, home)
    return User(user.name, home)


def test_copied_profile_is_refused_as_an_old_copy_for_good(make_user, relay: RelayProcess,
                                                           tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    bob.ok("send", "alice", "one")
    assert [m["text"] for m in alice.recv()] == ["one"]
    backup = _copy(alice, tmp_path / "alice-backup")     # e.g. a laptop backup
    bob.ok("send", "alice", "two")
    assert [m["text"] for m in alice.recv()] == ["two"]  # the live copy logs in again
    result = backup.run("recv")
    assert result.returncode == 1
    assert "old copy of the profile" in result.stderr and "Traceback" not in result.stderr
    # Counting up does not get it in: the copy knows it is stale and stops trying.
    for _ in range(3):
        result = backup.run("send", "bob", "from the backup")
        assert result.returncode == 1 and "old copy of the profile" in result.stderr
    assert bob.recv() == []
    # The live copy is untouched.
    alice.ok("send", "bob", "still me")
    assert [m["text"] for m in bob.recv()] == ["still me"]
    assert "event=stale_profile user=alice" in "".join(relay.output)


def test_newer_login_displaces_the_older_connection(make_user, relay: RelayProcess, tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")

    async def scenario() -> None:
        original = Client.open(alice.home, "alice", PASSPHRASE)
        try:
            await original.connect()
            conn = original._require_conn()
            # The folder is copied while the original is connected; the copy logs in later.
            copy = await asyncio.to_thread(_copy, alice, tmp_path / "alice-copy")
            await asyncio.to_thread(copy.ok, "send", "bob", "from the copy")
            await asyncio.wait_for(conn.closed.wait(), 30)
            assert "displaced by a newer login" in conn.close_reason, conn.close_reason
            await conn.close()
            # The displaced copy is now the older one: refused, and it stops reconnecting.
            with pytest.raises(StaleProfile, match="old copy of the profile"):
                await original.connect()
            statuses: list[str] = []
            await asyncio.wait_for(original.stay_connected(statuses.append), 30)
            assert statuses and statuses[-1].startswith("stopped: this is an old copy")
        finally:
            await original.close()
    asyncio.run(scenario())
    assert [m["text"] for m in bob.recv()] == ["from the copy"]
