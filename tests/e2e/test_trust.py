"""Trust end to end: identity-key changes, safety numbers, password verification (SPAKE2), blocking.

The "malicious relay" is simulated the way a real one would act: its operator edits the relay's
SQLite database so that the account "bob" carries keys that Mallory controls.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from e2e_support import PASSPHRASE, RelayProcess, User

from cipherpost.client.client import Client
from cipherpost.client.connection import parse_fingerprint


def _relay_db(relay: RelayProcess) -> Path:
    return relay.data / "relay.db"


def _copy_account(src: RelayProcess, dst: RelayProcess, username: str) -> None:
    """Give ``username`` on ``dst`` the keys it has on ``src`` (both relays stopped)."""
    s = sqlite3.connect(_relay_db(src))
    d = sqlite3.connect(_relay_db(dst))
    identity, spk, last_resort = s.execute(
        "SELECT identity, signed_prekey, kem_last_resort FROM accounts WHERE username=?",
        (username,)).fetchone()
    with d:
        # The operator also resets the login counter (docs/accounts.md), as a real attacker would.
        d.execute("UPDATE accounts SET identity=?, signed_prekey=?, kem_last_resort=?, login_counter=0 "
                  "WHERE username=?", (identity, spk, last_resort, username))
        d.execute("DELETE FROM one_time_prekeys WHERE username=?", (username,))
        d.executemany("INSERT INTO one_time_prekeys(username, kind, key_id, data) VALUES(?,?,?,?)",
                      s.execute("SELECT username, kind, key_id, data FROM one_time_prekeys WHERE username=?",
                                (username,)).fetchall())
    s.close()
    d.close()


def _repoint(user: User, relay: RelayProcess) -> None:
    """Point a profile at another relay (Mallory's own client, so she may)."""
    async def go() -> None:
        client = Client.open(user.home, user.name, user.passphrase)
        try:
            with client.db.transaction():
                client.db.set_secret_meta("server_url", relay.url.encode())
                client.db.set_secret_meta("server_fingerprint", parse_fingerprint(relay.fingerprint))
        finally:
            await client.close()
    asyncio.run(go())


def _mallory_as_bob(tmp_path: Path) -> tuple[RelayProcess, User]:
    """Mallory registers the name "bob" on a relay of her own, to get keys for that name."""
    shadow = RelayProcess(tmp_path / "shadow-relay")
    shadow.start()
    mallory = User("bob", tmp_path / "home-mallory")
    mallory.ok("init", "bob", "--server", shadow.url, "--server-fingerprint", shadow.fingerprint)
    shadow.stop()
    return shadow, mallory


def _substitute_bob(relay: RelayProcess, shadow: RelayProcess, tmp_path: Path) -> Path:
    """The operator swaps bob's keys for Mallory's; returns a backup to swap back with."""
    relay.stop()
    backup = tmp_path / "relay-backup"
    backup.mkdir(exist_ok=True)
    real = RelayProcess(backup)
    import shutil
    shutil.copy(_relay_db(relay), _relay_db(real))
    _copy_account(shadow, relay, "bob")
    relay.start(port=relay.port)
    return backup


def _verify_both(a: User, a_peer: str, b: User, b_peer: str, pw_a: str, pw_b: str,
                 timeout: str = "30") -> tuple[subprocess.CompletedProcess[str], ...]:
    procs = []
    for user, peer, pw in ((a, a_peer, pw_a), (b, b_peer, pw_b)):
        env = {**os.environ, "CIPHERPOST_HOME": str(user.home), "CIPHERPOST_PASSPHRASE": PASSPHRASE,
               "CIPHERPOST_VERIFY_PASSWORD": pw}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cipherpost", "verify", peer, "--password", "--timeout", timeout],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=90)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return tuple(results)


def test_identity_change_blocks_sending_until_accepted(make_user, relay: RelayProcess,
                                                       tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "hi bob")
    bob.recv()
    shadow, mallory = _mallory_as_bob(tmp_path)
    # alice verified bob by safety number earlier: the later warning must be the loud one.
    digits = alice.ok("fingerprint", "bob").split(":", 1)[1]
    alice.ok("verify", "bob", "--safety-number", digits)
    assert "verified" in alice.ok("contacts")
    _substitute_bob(relay, shadow, tmp_path)
    _repoint(mallory, relay)
    mallory.ok("send", "alice", "it is me, bob, new phone")
    [msg] = alice.recv()
    assert msg["from"] == "bob" and msg["warning"] and "CHANGED" in msg["warning"]
    # bob was verified: the text under the new key is held back, only a notice is shown.
    assert "held back" in msg["text"] and "new phone" not in msg["text"]
    result = alice.run("send", "bob", "are you sure?")
    assert result.returncode == 1
    assert "CHANGED" in result.stderr and "VERIFIED contact" in result.stderr
    assert "old safety number" in result.stderr and "new safety number" in result.stderr
    assert "KEY CHANGED (was verified)" in alice.ok("contacts")
    # Reading the old number back does not accept the new key.
    assert alice.run("verify", "bob", "--safety-number", digits).returncode == 1
    assert alice.run("send", "bob", "still blocked?").returncode == 1
    # Comparing the new number (here: the user decides to trust it) unblocks.
    async def new_number() -> str:
        client = Client.open(alice.home, "alice", PASSPHRASE)
        try:
            contact = client.contact("bob")
            assert contact.pending_identity is not None
            return client.safety_number("bob", contact.pending_identity).digits
        finally:
            await client.close()
    alice.ok("verify", "bob", "--safety-number", asyncio.run(new_number()))
    # Accepting the new key releases what was held under it.
    assert [m["text"] for m in alice.recv()] == ["it is me, bob, new phone"]
    alice.ok("send", "bob", "ok, welcome back")
    assert [m["text"] for m in mallory.recv()] == ["ok, welcome back"]


def test_password_verification_succeeds_and_feeds_next_session(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "hello")
    bob.recv()
    ra, rb = _verify_both(alice, "bob", bob, "alice", "purple elephant 42", "purple elephant 42")
    assert ra.returncode == 0, ra.stderr
    assert rb.returncode == 0, rb.stderr
    assert "bob" in alice.ok("contacts") and "unverified" not in alice.ok("contacts")
    assert "unverified" not in bob.ok("contacts")
    # The next session mixes in the PAKE output as a pre-shared key, on both sides.
    alice.ok("send", "bob", "after verification")
    assert [m["text"] for m in bob.recv()] == ["after verification"]
    bob.ok("send", "alice", "reply on the psk session")
    assert [m["text"] for m in alice.recv()] == ["reply on the psk session"]
    for user in (alice, bob):
        db = sqlite3.connect(user.home / "profiles" / user.name / "profile.db")
        assert db.execute("SELECT count(*) FROM sessions WHERE with_psk=1").fetchone()[0] == 1


def test_wrong_password_fails_both_sides_and_blocks(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "hello")
    bob.recv()
    ra, rb = _verify_both(alice, "bob", bob, "alice", "purple elephant 42", "purple elephant 43")
    for r in (ra, rb):
        assert r.returncode == 1
        assert "verification FAILED" in r.stderr
        assert "password differs or a key" in r.stderr   # the same words whatever the cause
    for user in (alice, bob):
        assert "BLOCKED" in user.ok("contacts")
    result = alice.run("send", "bob", "blocked?")
    assert result.returncode == 1 and "blocked" in result.stderr
    # A later successful verification lifts the block.
    ra, rb = _verify_both(alice, "bob", bob, "alice", "same now", "same now")
    assert ra.returncode == 0 and rb.returncode == 0, ra.stderr + rb.stderr
    alice.ok("send", "bob", "unblocked")


def test_substituted_key_fails_password_verification(make_user, relay: RelayProcess, tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    shadow, _mallory = _mallory_as_bob(tmp_path)
    backup = _substitute_bob(relay, shadow, tmp_path)
    # First contact through the malicious relay: alice pins Mallory's key for "bob" (TOFU).
    alice.ok("send", "bob", "hi bob, first message")
    # The operator covers its tracks: bob's real keys are back.
    relay.stop()
    _copy_account(RelayProcess(backup), relay, "bob")
    relay.start(port=relay.port)
    ra, rb = _verify_both(alice, "bob", bob, "alice", "our secret", "our secret")
    assert ra.returncode == 1 and rb.returncode == 1, ra.stdout + rb.stdout
    assert "verification FAILED" in ra.stderr and "verification FAILED" in rb.stderr, ra.stderr + rb.stderr
    result = alice.run("send", "bob", "blocked now")
    assert result.returncode == 1 and "blocked" in result.stderr
    # The real bob could not decrypt the first message and asked alice to resend it (a decryption
    # error report); trying to, alice fetched bob's real key: the contact may show that too.
    contacts = alice.ok("contacts")
    assert "BLOCKED" in contacts or "KEY CHANGED" in contacts


def test_concurrent_verifications_and_attempt_limit(make_user, relay: RelayProcess) -> None:
    users = {n: make_user(n) for n in ("alice", "bob", "carol")}
    users["alice"].ok("send", "bob", "hi")
    users["alice"].ok("send", "carol", "hi")

    async def scenario() -> None:
        clients = {n: Client.open(u.home, n, PASSPHRASE) for n, u in users.items()}
        try:
            for c in clients.values():
                await c.connect()
            a = clients["alice"]
            # alice verifies bob and carol at the same time; each pair with its own password.
            await asyncio.gather(
                a.verify_password("bob", "pw-bob", timeout=20),
                clients["bob"].verify_password("alice", "pw-bob", timeout=20),
                a.verify_password("carol", "pw-carol", timeout=20),
                clients["carol"].verify_password("alice", "pw-carol", timeout=20),
            )
            assert a.contact("bob").verified and a.contact("carol").verified
            assert clients["bob"].contact("alice").verified and clients["carol"].contact("alice").verified
            # Each attempt is one online guess: after 3 in an hour the client refuses a fourth.
            from cipherpost.client.errors import ClientError, VerificationError
            errors = []
            for _ in range(4):
                try:
                    await clients["bob"].verify_password("carol", "guess", timeout=0.3)
                except VerificationError as exc:
                    errors.append("timeout" if "timed out" in str(exc) else str(exc))
                except ClientError as exc:
                    errors.append(str(exc))
            assert errors[:2] == ["timeout", "timeout"]
            assert "too many password verification attempts" in errors[3]
        finally:
            for c in clients.values():
                await c.close()
    asyncio.run(scenario())
