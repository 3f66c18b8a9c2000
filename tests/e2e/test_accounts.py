"""Accounts over their whole life, end to end: recovery codes, recovery on a new device, deletion,
look-alike names, and profiles made before recovery codes existed. Real relay, real CLI processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from e2e_support import RelayProcess, User

from cipherpost.crypto.recovery import RecoveryKey

CODE = re.compile(r"\b[A-Z2-7]{4}(?:-[A-Z2-7]{4}){8}\b")
REPO = Path(__file__).resolve().parents[2]
OLD_COMMIT = "7e818ef"  # the code before recovery codes and login counters


def _init(user: User, relay: RelayProcess) -> str:
    """``init`` the user; return the recovery code it printed (once)."""
    out = user.ok("init", user.name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)
    codes = CODE.findall(out)
    assert len(codes) == 1, out
    return codes[0]


def _recover(user: User, relay: RelayProcess, code: str) -> subprocess.CompletedProcess[str]:
    return user.run("recover", user.name, "--server", relay.url, "--server-fingerprint", relay.fingerprint,
                    env={"CIPHERPOST_RECOVERY_CODE": code})


def _verify(user: User, peer: str) -> None:
    digits = user.ok("fingerprint", peer).split(":", 1)[1]
    user.ok("verify", peer, "--safety-number", digits)


def test_recover_on_a_fresh_home_rebinds_the_name_and_contacts_see_the_change(
        make_user, relay: RelayProcess, tmp_path: Path) -> None:
    alice = make_user("alice", init=False)
    code = _init(alice, relay)
    bob, carol = make_user("bob"), make_user("carol")
    for peer in (bob, carol):
        alice.ok("send", peer.name, f"hi {peer.name}")
        assert [m["text"] for m in peer.recv()] == [f"hi {peer.name}"]
        peer.ok("accept", "alice")              # a stranger's first message is a request
    _verify(bob, "alice")                       # bob verified alice; carol did not
    bob.ok("send", "alice", "queued while alice is away")
    old_fingerprint = alice.ok("fingerprint")

    # alice lost her device: a fresh home, the code she wrote down, a new passphrase.
    alice_new = User("alice", tmp_path / "home-alice-new")
    result = _recover(alice_new, relay, code)
    assert result.returncode == 0, result.stderr
    assert "recovered alice" in result.stdout and "Traceback" not in result.stderr
    assert alice_new.ok("fingerprint") != old_fingerprint
    # The name now belongs to the new key: the old profile cannot log in any more.
    old = alice.run("recv")
    assert old.returncode == 1 and "auth_failed" in old.stderr
    # The queue was kept: what bob sent to the old key arrives (and cannot be read by the new key).
    [queued] = alice_new.recv()
    assert queued["from"] == "bob" and queued["warning"] == "undecryptable"

    alice_new.ok("send", "bob", "it is me, on a new phone")
    alice_new.ok("send", "carol", "it is me, on a new phone")
    # bob had verified alice: the text under the new key is held back, loudly.
    [to_bob] = bob.recv()
    assert "CHANGED" in str(to_bob["warning"]) and "held back" in str(to_bob["text"])
    assert "new phone" not in str(to_bob["text"])
    assert "KEY CHANGED (was verified)" in bob.ok("contacts")
    refused = bob.run("send", "alice", "who is this?")
    assert refused.returncode == 1 and "CHANGED" in refused.stderr
    # carol had not verified: she sees the text, with the key-change warning; never silently.
    [to_carol] = carol.recv()
    assert to_carol["text"] == "it is me, on a new phone" and "CHANGED" in str(to_carol["warning"])
    # The relay logged the recovery without the code or keys.
    log = "".join(relay.output)
    assert "event=account_recovered user=alice" in log and code not in log


def test_wrong_recovery_code_is_refused_limited_and_logged(make_user, relay: RelayProcess,
                                                           tmp_path: Path) -> None:
    alice = make_user("alice", init=False)
    code = _init(alice, relay)
    mallory = User("alice", tmp_path / "home-mallory")
    # A mistyped code is caught before anything is sent (it spends no attempt).
    typo = code[:-1] + ("A" if code[-1] != "A" else "B")
    result = _recover(mallory, relay, typo)
    assert result.returncode == 1 and "mistyped" in result.stderr and "Traceback" not in result.stderr
    assert "event=recovery_failed" not in "".join(relay.output)
    _, wrong = RecoveryKey.generate()           # well-formed, but not alice's
    for _ in range(5):                          # recovery_attempts_per_account_per_hour = 5
        result = _recover(mallory, relay, wrong)
        assert result.returncode == 1
        assert "the recovery code does not match this account" in result.stderr, result.stderr
        assert not (mallory.home / "profiles" / "alice" / "keystore.bin").exists()
    result = _recover(mallory, relay, wrong)
    assert result.returncode == 1 and "too many recovery attempts" in result.stderr
    # Limited means limited: now even the right code waits for the window to pass.
    result = _recover(User("alice", tmp_path / "home-alice-new"), relay, code)
    assert result.returncode == 1 and "too many recovery attempts" in result.stderr
    log = "".join(relay.output)
    assert log.count("event=recovery_failed user=alice") == 5
    assert "event=recovery_limited user=alice" in log
    assert code not in log and wrong not in log
    # Nothing changed for the real alice: her profile still logs in.
    assert alice.recv() == []


def test_delete_account_reserves_the_name(make_user, relay: RelayProcess, tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "hi bob")
    profile = bob.home / "profiles" / "bob"
    # The confirmation must be the account's name, typed.
    result = bob.run("delete-account", stdin="yes\n")
    assert result.returncode == 1 and "not deleted" in result.stderr
    assert profile.exists()
    # Nothing local is deleted unless the relay deleted the account first.
    relay.stop()
    result = bob.run("delete-account", stdin="bob\n")
    assert result.returncode == 1 and "cannot reach" in result.stderr and "Traceback" not in result.stderr
    assert profile.exists()
    relay.start(port=relay.port)
    result = bob.run("delete-account", stdin="bob\n", passphrase="wrong passphrase")
    assert result.returncode == 1 and "wrong passphrase" in result.stderr and profile.exists()
    result = bob.run("delete-account", stdin="bob\n")
    assert result.returncode == 0, result.stderr
    assert "cannot be undone" in result.stderr and "deleted the account bob" in result.stdout
    assert not profile.exists()
    # Nobody can take the name (and with it the trust alice placed in it).
    impostor = User("bob", tmp_path / "home-impostor")
    result = impostor.run("init", "bob", "--server", relay.url, "--server-fingerprint", relay.fingerprint)
    assert result.returncode == 1 and "name_reserved" in result.stderr, result.stderr
    # Senders are told, and nothing waits for a deleted account.
    result = alice.run("send", "bob", "are you there?")
    assert result.returncode == 1
    assert "suspended or deleted" in result.stderr or "deleted" in result.stderr, result.stderr


def test_look_alike_and_reserved_names_are_refused(make_user, relay: RelayProcess) -> None:
    make_user("bob")
    for name, similar in (("b0b", "bob"), ("bob_", "bob"), ("admin", None), ("r00t", None),
                          ("cipherpost", None)):
        user = make_user(name, init=False)
        result = user.run("init", name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)
        assert result.returncode == 1, name
        code = "name_confusable" if similar else "name_reserved"
        assert code in result.stderr, (name, result.stderr)
        if similar:
            assert f"'{similar}'" in result.stderr
        assert not (user.home / "profiles" / name / "keystore.bin").exists()
    make_user("bobby")                          # a different name is fine


def _old_code(tmp_path: Path) -> Path:
    """The source tree of the commit before recovery codes and login counters."""
    dest = tmp_path / "old-cipherpost"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "src"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def test_profile_and_relay_made_by_old_code_keep_working_and_add_a_recovery_key(tmp_path: Path) -> None:
    old_src = _old_code(tmp_path)
    old_env = {"PYTHONPATH": str(old_src)}
    data = tmp_path / "relay-data"
    proc = subprocess.Popen([sys.executable, "-m", "cipherpost", "server", "--host", "127.0.0.1",
                             "--port", "0", "--data", str(data)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **old_env})
    assert proc.stdout is not None
    url = fingerprint = ""
    for line in proc.stdout:
        m = re.search(r"listening on (wss?://[\d.]+:\d+)", line)
        url = m.group(1) if m else url
        m = re.search(r"fingerprint: (SHA256:[0-9a-f]{64})", line)
        fingerprint = m.group(1) if m else fingerprint
        if url and fingerprint:
            break
    alice, bob = User("alice", tmp_path / "home-alice"), User("bob", tmp_path / "home-bob")
    try:
        for user in (alice, bob):
            out = user.ok("init", user.name, "--server", url, "--server-fingerprint", fingerprint,
                          env=old_env)
            assert not CODE.findall(out)          # the old code had no recovery codes
        alice.ok("send", "bob", "before the upgrade", env=old_env)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    # The relay is upgraded on the same data directory, the clients too.
    relay = RelayProcess(data)
    relay.start(port=int(url.rsplit(":", 1)[1]))
    try:
        assert [m["text"] for m in bob.recv()] == ["before the upgrade"]
        bob.ok("send", "alice", "after the upgrade")
        assert [m["text"] for m in alice.recv()] == ["after the upgrade"]
        out = alice.ok("recovery-key", "--new")
        [code] = CODE.findall(out)
        # ... and that code works on a new device.
        alice_new = User("alice", tmp_path / "home-alice-new")
        result = _recover(alice_new, relay, code)
        assert result.returncode == 0, result.stderr
        alice_new.ok("send", "bob", "recovered")
        [msg] = bob.recv()
        assert msg["text"] == "recovered" and "CHANGED" in str(msg["warning"])
    finally:
        relay.stop()
