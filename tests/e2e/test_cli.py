"""The scriptable commands end to end: real relay subprocess, real TLS, real SQLite, real CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from e2e_support import RelayProcess, User


def test_init_send_recv_reply(make_user, relay: RelayProcess) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    out = alice.ok("send", "bob", "hello", "bob")
    assert out.startswith("sent ")
    [msg] = bob.recv()
    assert msg["from"] == "alice" and msg["text"] == "hello bob"
    assert isinstance(msg["sent_at"], int) and isinstance(msg["received_at"], int)
    assert msg["id"] == out.split()[1]
    assert bob.recv() == []              # shown once only
    bob.ok("send", "alice", "hi alice")
    [reply] = alice.recv()
    assert (reply["from"], reply["text"]) == ("bob", "hi alice")
    # several turns, both directions (ratchet direction changes)
    for i in range(3):
        alice.ok("send", "bob", f"a{i}")
        assert [m["text"] for m in bob.recv()] == [f"a{i}"]
        bob.ok("send", "alice", f"b{i}")
        assert [m["text"] for m in alice.recv()] == [f"b{i}"]
    history = alice.ok("history", "bob", "--json")
    texts = [json.loads(line)["text"] for line in history.splitlines()]
    assert texts == ["hello bob", "hi alice", "a0", "b0", "a1", "b1", "a2", "b2"]
    contacts = alice.ok("contacts")
    assert "bob" in contacts and "unverified" in contacts


def test_wrong_passphrase_is_refused(make_user) -> None:
    alice = make_user("alice")
    result = alice.run("contacts", passphrase="not the passphrase")
    assert result.returncode == 1
    assert "wrong passphrase" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_fingerprint_mismatch_refused(make_user, relay: RelayProcess, tmp_path: Path) -> None:
    carol = make_user("carol", init=False)
    wrong = "SHA256:" + "00" * 32
    result = carol.run("init", "carol", "--server", relay.url, "--server-fingerprint", wrong)
    assert result.returncode == 1
    # First contact: it does not match what was given; nothing "changed" (issue 8 item 14).
    assert "does not match the fingerprint given with --server-fingerprint" in result.stderr
    assert "changed" not in result.stderr and "Traceback" not in result.stderr
    assert not (carol.home / "profiles" / "carol").exists()
    # A relay that comes back with another certificate is refused by a pinned profile.
    alice = make_user("alice")
    relay.stop()
    for pem in relay.data.glob("*.pem"):
        pem.unlink()
    relay.start(port=relay.port)
    result = alice.run("recv")
    assert result.returncode == 1
    assert "certificate changed" in result.stderr


def test_unknown_recipient_is_a_clear_error(make_user) -> None:
    alice = make_user("alice")
    result = alice.run("send", "nobody", "hello?")
    assert result.returncode == 1
    assert "unknown_user" in result.stderr


def test_restart_between_send_and_receive_loses_nothing(make_user, relay: RelayProcess) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "before restart 1")
    alice.ok("send", "bob", "before restart 2")
    assert relay.stop() == 0
    relay.start(port=relay.port)
    assert [m["text"] for m in bob.recv()] == ["before restart 1", "before restart 2"]
    bob.ok("send", "alice", "after restart")
    assert [m["text"] for m in alice.recv()] == ["after restart"]


def test_server_data_holds_no_plaintext_or_private_keys(make_user, relay: RelayProcess) -> None:
    from cipherpost.client.client import Client

    alice, bob = make_user("alice"), make_user("bob")
    secret_text = "the eagle lands at midnight"
    alice.ok("send", "bob", secret_text)      # stays queued on the server: bob is offline
    client = Client.open(alice.home, "alice", alice.passphrase)
    try:
        private = client.identity.private_bytes()
        prekey_blob = client.prekeys.serialize()
    finally:
        import asyncio
        asyncio.run(client.close())
    blobs = b"".join(p.read_bytes() for p in relay.data.rglob("*") if p.is_file())
    assert len(blobs) > 1000
    assert secret_text.encode() not in blobs
    for key in private:
        assert key not in blobs
    assert prekey_blob not in blobs
    # And it really is stored there, sealed: bob can read it.
    assert [m["text"] for m in bob.recv()] == [secret_text]


def test_profile_files_are_private(make_user) -> None:
    alice = make_user("alice")
    profile = alice.home / "profiles" / "alice"
    assert oct(profile.stat().st_mode & 0o777) == "0o700"
    for name in ("keystore.bin", "profile.db"):
        assert oct((profile / name).stat().st_mode & 0o777) == "0o600"
    db = sqlite3.connect(profile / "profile.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_local_history_is_encrypted_at_rest(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "very private words")
    bob.recv()
    for user in (alice, bob):
        raw = b"".join(p.read_bytes() for p in (user.home / "profiles").rglob("*") if p.is_file())
        assert b"very private words" not in raw


def test_usage_errors_exit_non_zero(make_user, tmp_path: Path) -> None:
    nobody = User("nobody", tmp_path / "empty-home")
    result = nobody.run("recv")
    assert result.returncode == 1 and "no profile" in result.stderr
    result = nobody.run("init", "x", "--server", "wss://127.0.0.1:1")
    assert result.returncode == 1 and "username" in result.stderr and "Traceback" not in result.stderr
    result = nobody.run("init", "nobody", "--server", "wss://127.0.0.1:1")   # nothing listens there
    assert result.returncode == 1 and "cannot reach" in result.stderr and "Traceback" not in result.stderr
    assert not (nobody.home / "profiles" / "nobody").exists()             # nothing half-created
    usage = nobody.run("send")
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_send_while_relay_down_is_kept_in_outbox(make_user, relay: RelayProcess) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "first, online")
    assert [m["text"] for m in bob.recv()] == ["first, online"]
    relay.stop()
    result = alice.run("send", "bob", "written while the relay was down")
    assert result.returncode == 1
    assert "queued" in result.stderr and "outbox" in result.stderr
    relay.start(port=relay.port)
    alice.ok("recv")                      # any connection flushes the outbox
    assert [m["text"] for m in bob.recv()] == ["written while the relay was down"]
    assert "(queued)" not in alice.ok("history", "bob")


def test_demo_explains_and_shows_the_relay_cannot_read(tmp_path: Path) -> None:
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "cipherpost", "demo", "--explain"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "What the relay stores for Bob" in out
    assert "the text appears in it: no" in out
    assert "PQXDH" in out and "verified every signature" in out
    assert "bob reads: alice: 'Hi Bob! Only you can read this.'" in out
    assert "Messages left on the relay after the acks: 0" in out
    assert "bob sees the same: yes" in out
    assert "Traceback" not in result.stderr


def test_terminal_control_sequences_from_a_sender_are_neutralised(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "hi\x1b[2J\x1b]52;c;ZXZpbA==\x07 \u202eevil")
    out = bob.ok("recv")
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "\\x1b[2J" in out and "\\u202e" in out
    bob.ok("accept", "alice")   # a stranger's message is a request until accepted
    assert "\x1b" not in bob.ok("history", "alice")
    # --json keeps the exact text (JSON escapes it), for programs that want it
    alice.ok("send", "bob", "tab\there \x1b[1m")
    assert [m["text"] for m in bob.recv()] == ["tab\there \x1b[1m"]


def test_invite_only_registration(tmp_path: Path) -> None:
    import subprocess
    import sys
    relay = RelayProcess(tmp_path / "invite-relay")
    relay.start(extra=["--registration", "invite"])
    try:
        dave = User("dave", tmp_path / "home-dave")
        result = dave.run("init", "dave", "--server", relay.url, "--server-fingerprint", relay.fingerprint)
        assert result.returncode == 1 and "invite" in result.stderr
        assert not (dave.home / "profiles" / "dave" / "keystore.bin").exists()
        wrong = dave.run("init", "dave", "--server", relay.url, "--server-fingerprint", relay.fingerprint,
                         "--invite", "not-a-real-token")
        assert wrong.returncode == 1 and "bad_invite" in wrong.stderr
        token = subprocess.run([sys.executable, "-m", "cipherpost", "invite", "--data", str(relay.data)],
                               capture_output=True, text=True, timeout=30, check=True).stdout.split()[-1]
        dave.ok("init", "dave", "--server", relay.url, "--server-fingerprint", relay.fingerprint,
                "--invite", token)
        erin = User("erin", tmp_path / "home-erin")
        reused = erin.run("init", "erin", "--server", relay.url, "--server-fingerprint", relay.fingerprint,
                          "--invite", token)
        assert reused.returncode == 1 and "bad_invite" in reused.stderr    # one-time tokens
    finally:
        relay.stop()


def test_oversized_message_is_refused_before_anything_changes(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "small one")
    result = alice.run("send", "bob", "-", stdin="x" * 200_000)
    assert result.returncode == 1 and "message too long" in result.stderr
    alice.ok("send", "bob", "after the refusal")
    assert [m["text"] for m in bob.recv()] == ["small one", "after the refusal"]
    assert "x" * 100 not in alice.ok("history", "bob")
