"""``cipherpost admin`` end to end: an operator acts on a running relay through its data directory."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from e2e_support import PASSPHRASE, RelayProcess, User

from cipherpost.client.client import Client


def _admin(relay: RelayProcess, *args: str, operator: str = "ops-dana") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cipherpost", "admin", "--data", str(relay.data),
                           "--as", operator, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))


def _admin_ok(relay: RelayProcess, *args: str) -> str:
    result = _admin(relay, *args)
    assert result.returncode == 0, f"admin {args}: {result.stderr}{result.stdout}"
    return result.stdout


def _accounts(relay: RelayProcess) -> dict[str, dict[str, object]]:
    rows = [json.loads(line) for line in _admin_ok(relay, "list", "--json").splitlines()]
    return {str(r["name"]): r for r in rows}


def test_suspend_closes_live_connections_refuses_login_and_senders_until_unsuspended(
        make_user, relay: RelayProcess) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "before")
    assert [m["text"] for m in bob.recv()] == ["before"]

    async def suspended_while_connected() -> str:
        client = Client.open(bob.home, "bob", PASSPHRASE)
        try:
            await client.connect()
            conn = client._require_conn()
            out = await asyncio.to_thread(_admin_ok, relay, "suspend", "bob", "--reason", "spam reports")
            await asyncio.wait_for(conn.closed.wait(), 30)   # the relay polls the operator log
            assert "suspended by the relay's operator" in conn.close_reason, conn.close_reason
            return out
        finally:
            await client.close()
    out = asyncio.run(suspended_while_connected())
    assert "ops-dana: suspend bob (spam reports)" in out
    info = _accounts(relay)["bob"]
    assert info["state"] == "suspended" and info["state_by"] == "ops-dana"
    assert info["state_reason"] == "spam reports"
    # Cannot log in or receive; senders get a clear refusal.
    result = bob.run("recv")
    assert result.returncode == 1 and "suspended" in result.stderr and "Traceback" not in result.stderr
    result = alice.run("send", "bob", "during")
    assert result.returncode == 1 and "suspended" in result.stderr, result.stderr
    assert "(failed: suspended)" in alice.ok("history", "bob")   # refused, not left to retry
    carol = make_user("carol")                                    # a first contact is told too
    result = carol.run("send", "bob", "hello?")
    assert result.returncode == 1 and "is suspended" in result.stderr, result.stderr
    # Suspending twice says so; unsuspending restores everything.
    again = _admin(relay, "suspend", "bob")
    assert again.returncode == 1 and "already suspended" in again.stderr
    _admin_ok(relay, "unsuspend", "bob", "--reason", "appeal granted")
    assert _accounts(relay)["bob"]["state"] == "active"
    alice.ok("send", "bob", "after")
    # "during" was encrypted before the relay refused it, so bob's ratchet sees a gap: said, not hidden
    assert [m["text"] for m in bob.recv()] == [
        "1 message from alice did not arrive (if it still comes, it is shown then)", "after"]
    # Every action is in the operator log: who, what, when, why.
    log = [json.loads(line) for line in _admin_ok(relay, "log", "--json").splitlines()]
    assert [(e["operator"], e["action"], e["names"], e["reason"]) for e in log] == [
        ("ops-dana", "suspend", ["bob"], "spam reports"),
        ("ops-dana", "unsuspend", ["bob"], "appeal granted")]
    assert all(isinstance(e["ts_ms"], int) for e in log)


def test_operator_delete_reserve_unreserve_list_and_top(make_user, relay: RelayProcess,
                                                       tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    bob.ok("send", "alice", "reply")
    for i in range(3):
        alice.ok("send", "bob", f"m{i}")      # queued: bob is offline
    relay.stop()              # the relay writes its usage counters every 10 s, and when it stops
    relay.start(port=relay.port)
    top = [json.loads(line) for line in _admin_ok(relay, "top", "--json").splitlines()]
    by_sender = {r["sender"]: r for r in top}
    assert by_sender["alice"]["messages_1h"] == 3 and by_sender["alice"]["messages_24h"] == 3
    assert by_sender["bob"]["messages_1h"] == 1
    assert by_sender["alice"]["bytes_1h"] > 0 and by_sender["alice"]["bytes_stored"] > 0
    assert "m0" not in _admin_ok(relay, "top")     # counts only, never contents

    _admin_ok(relay, "delete", "bob", "--reason", "abuse")
    assert _accounts(relay)["bob"]["state"] == "deleted"
    assert bob.run("recv").returncode == 1
    result = User("bob", tmp_path / "other").run("init", "bob", "--server", relay.url,
                                                 "--server-fingerprint", relay.fingerprint)
    assert result.returncode == 1 and "name_reserved" in result.stderr
    # Reserved names, and their look-alikes, cannot be registered until released.
    _admin_ok(relay, "reserve", "acme", "helpdesk")
    assert {"acme", "helpdesk"} <= {n for n, r in _accounts(relay).items() if r["state"] == "reserved"}
    for name in ("acme", "acme_", "he1pdesk"):
        result = User(name, tmp_path / name).run("init", name, "--server", relay.url,
                                                 "--server-fingerprint", relay.fingerprint)
        assert result.returncode == 1 and "name_reserved" in result.stderr, (name, result.stderr)
    _admin_ok(relay, "unreserve", "acme")
    User("acme", tmp_path / "acme-ok").ok("init", "acme", "--server", relay.url,
                                          "--server-fingerprint", relay.fingerprint)
    # Bad input gets a clear error and changes nothing.
    for args, words in ((("suspend", "nobody"), "no account named 'nobody'"),
                        (("unreserve", "acme"), "not reserved"),
                        (("reserve", "no spaces"), "username may contain only"),
                        (("suspend", "bob"), "deleted")):
        result = _admin(relay, *args)
        assert result.returncode == 1 and words in result.stderr and "Traceback" not in result.stderr, args
    result = subprocess.run([sys.executable, "-m", "cipherpost", "admin", "--data", str(tmp_path / "typo"),
                             "list"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no relay data" in result.stderr
    assert not (tmp_path / "typo").exists()
    actions = [json.loads(line)["action"] for line in _admin_ok(relay, "log", "--json").splitlines()]
    assert actions == ["delete", "reserve", "unreserve"]
