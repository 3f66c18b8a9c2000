"""Profiles and relay data written by the first slice's code still open (issue 8 item 1).

The old code is taken from git at test time (``git archive`` of :data:`OLD_COMMIT`, the main of
before issue 8), so no generated profile is committed. Its relay and clients make the data; the
current code then opens the same profiles and relay directory, reads the history (old message
records are not padded) and keeps chatting on the old sessions.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
from e2e_support import RelayProcess, User

OLD_COMMIT = "7e818ef"
REPO = Path(__file__).resolve().parents[2]


def _old_source(dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", OLD_COMMIT, "src"],
                             capture_output=True, check=True, timeout=60).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def _texts(user: User, peer: str) -> list[str]:
    out = user.ok("history", peer, "--json", "--limit", "500")
    return [json.loads(line)["text"] for line in out.splitlines()]


def test_profile_and_relay_data_made_by_the_old_code_open_and_keep_working(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old_src = _old_source(tmp_path / "old")
    relay = RelayProcess(tmp_path / "relay-data")
    monkeypatch.setenv("PYTHONPATH", str(old_src))      # relay and CLI: the old code
    relay.start()
    alice, bob = User("alice", tmp_path / "home-alice"), User("bob", tmp_path / "home-bob")
    try:
        for user in (alice, bob):
            user.ok("init", user.name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)
        alice.ok("send", "bob", "hello from the old code")
        bob.ok("send", "alice", "-", stdin="r" * 4000)     # the longest the old code could read
        assert [m["text"] for m in alice.recv()] == ["r" * 4000]
        assert [m["text"] for m in bob.recv()] == ["hello from the old code"]
        alice.ok("send", "bob", "queued on the old relay")   # left on the relay for the new code
        port = relay.port
    finally:
        relay.stop()
    monkeypatch.undo()                                    # from here on: the current code
    relay.start(port=port)
    try:
        assert [m["text"] for m in bob.recv()] == ["queued on the old relay"]
        expected = ["hello from the old code", "r" * 4000, "queued on the old relay"]
        assert _texts(bob, "alice") == ["r" * 4000, "hello from the old code", "queued on the old relay"]
        assert _texts(alice, "bob") == expected      # in the order each side stored them
        assert "unverified" in alice.ok("contacts")
        bob.ok("send", "alice", "-", stdin="n" * 20_000)   # longer than the old code allowed
        alice.ok("send", "bob", "on the old session")
        assert [m["text"] for m in alice.recv()] == ["n" * 20_000]
        assert [m["text"] for m in bob.recv()] == ["on the old session"]
        assert _texts(alice, "bob") == [*expected, "on the old session", "n" * 20_000]
    finally:
        relay.stop()
