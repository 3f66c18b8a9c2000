"""Terminal and scripting conventions of the CLI (issue 8 items 13-14), through real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_support import PASSPHRASE, RelayProcess, User

from cipherpost.cli.common import contact_state
from cipherpost.cli.main import build_parser
from cipherpost.client.profile import Contact

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cipherpost", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_global_options_are_accepted_after_the_subcommand(relay: RelayProcess, tmp_path: Path) -> None:
    home = tmp_path / "shared-home"
    for name in ("alice", "bob"):
        User(name, home).ok("init", name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)
    env = {"CIPHERPOST_PASSPHRASE": PASSPHRASE}
    env.pop("CIPHERPOST_HOME", None)
    after = _cli("send", "bob", "hello", "--user", "alice", "--home", str(home), env=env)
    assert after.returncode == 0, after.stderr
    before = _cli("--home", str(home), "--user", "bob", "recv", "--json", env=env)
    assert [json.loads(line)["text"] for line in before.stdout.splitlines()] == ["hello"]
    mixed = _cli("--home", str(home), "contacts", "--user", "alice", env=env)
    assert mixed.returncode == 0 and mixed.stdout.startswith("bob ")
    # Without --user, a home with two profiles is refused with the choice named.
    none = _cli("contacts", "--home", str(home), env=env)
    assert none.returncode == 1 and "pass --user NAME" in none.stderr


def _actions(parser) -> list[tuple[str, object]]:  # type: ignore[no-untyped-def]
    import argparse
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                helps = {a.dest: a.help for a in action._choices_actions}
                found.append((f"{name}", helps.get(name)))
                found += [(f"{name} {dest}", h) for dest, h in _actions(sub)]
        elif not isinstance(action, argparse._HelpAction):
            found.append((action.dest, action.help))
    return found


def test_every_subcommand_and_option_has_a_help_text() -> None:
    missing = [name for name, text in _actions(build_parser()) if not text]
    assert missing == []
    for command in ("client", "init", "send", "recv", "contacts", "fingerprint", "verify", "history",
                    "passphrase", "demo", "server", "invite"):
        result = _cli(command, "--help")
        assert result.returncode == 0 and "usage: cipherpost " + command in result.stdout


def test_every_environment_variable_is_documented_in_help_and_readme() -> None:
    used = set()
    for path in (REPO / "src").rglob("*.py"):
        used |= set(re.findall(r"\bCIPHERPOST_[A-Z_]+\b", path.read_text()))
    assert {"CIPHERPOST_VERIFY_PASSWORD", "CIPHERPOST_PASSPHRASE", "CIPHERPOST_HOME"} <= used
    top_help = _cli("--help").stdout
    readme = (REPO / "README.md").read_text()
    assert sorted(v for v in used if v not in top_help) == []
    assert sorted(v for v in used if v not in readme) == []
    assert "CIPHERPOST_VERIFY_PASSWORD" in _cli("verify", "--help").stdout


def test_contacts_json_gives_a_fixed_state_beside_the_display_text(make_user) -> None:
    alice, _ = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "hi")
    [row] = [json.loads(line) for line in alice.ok("contacts", "--json").splitlines()]
    assert (row["name"], row["state"], row["display"]) == ("bob", "unverified", "unverified")
    digits = re.search(r"((?:\d{5}\s*){12})", alice.ok("fingerprint", "bob")).group(1)  # type: ignore[union-attr]
    alice.ok("verify", "bob", "--safety-number", digits)
    [row] = [json.loads(line) for line in alice.ok("contacts", "--json").splitlines()]
    assert (row["state"], row["verified"]) == ("verified", True)


@pytest.mark.parametrize(("contact", "state"), [
    (Contact("b", b"k", False, None, 1, None), "unverified"),
    (Contact("b", b"k", True, None, 1, 2), "verified"),
    (Contact("b", b"k", True, b"new", 1, 2), "key_changed"),
    (Contact("b", b"k", False, b"new", 1, None), "key_changed"),
    (Contact("b", b"k", False, None, 1, None, blocked="verification failed"), "blocked"),
    (Contact("b", b"k", True, None, 1, 2, blocked="verification failed"), "blocked"),
])
def test_contact_states_are_one_of_four_fixed_values(contact: Contact, state: str) -> None:
    assert contact_state(contact)[0] == state


def test_send_json_prints_the_id_and_status(make_user, relay: RelayProcess) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    [sent] = [json.loads(line) for line in alice.ok("send", "bob", "one", "--json").splitlines()]
    assert sent["status"] == "sent" and sent["to"] == "bob" and re.fullmatch(r"[0-9a-f]{32}", sent["id"])
    many = [json.loads(line) for line in alice.ok("send", "bob", "--stdin", "--json",
                                                   stdin="two\nthree\n").splitlines()]
    assert [m["status"] for m in many] == ["sent", "sent"]
    assert [m["id"] for m in bob.recv()] == [sent["id"], *(m["id"] for m in many)]
    relay.stop()
    queued = alice.run("send", "bob", "four", "--json")
    assert queued.returncode == 1 and json.loads(queued.stdout)["status"] == "queued"


def test_init_refuses_a_bad_address_before_asking_or_making_anything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = _cli("init", "erin", "--server", "http://example.org", "--home", str(home),
                  env={"CIPHERPOST_PASSPHRASE": PASSPHRASE})
    assert result.returncode == 1 and "server address must look like wss://HOST:PORT" in result.stderr
    assert "prekeys" not in result.stderr and not home.exists()


def test_invite_refuses_a_directory_without_a_relay(relay: RelayProcess, tmp_path: Path) -> None:
    typo = tmp_path / "typo"
    result = _cli("invite", "--data", str(typo))
    assert result.returncode == 1 and "no relay data" in result.stderr and not typo.exists()
    token = _cli("invite", "--data", str(relay.data))
    assert token.returncode == 0 and len(token.stdout.strip()) >= 20
