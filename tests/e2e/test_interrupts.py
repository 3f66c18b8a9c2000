"""Ctrl-C at any prompt (issue 8 item 12): the command ends at once with exit code 130 and one
line, and leaves nothing half-made. Each command runs in a real pseudo-terminal, where Ctrl-C is
the terminal's interrupt character, exactly as a person presses it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect
from e2e_support import PASSPHRASE, RelayProcess, User

INTERRUPTED = "cipherpost: interrupted; nothing was changed"


def _spawn(home: Path, *args: str, passphrase: str | None = None) -> pexpect.spawn:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIPHERPOST_")}
    env.update({"CIPHERPOST_HOME": str(home), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1",
                "PYTHONUNBUFFERED": "1"})
    if passphrase is not None:
        env["CIPHERPOST_PASSPHRASE"] = passphrase
    return pexpect.spawn(sys.executable, ["-m", "cipherpost", *args], env=env, encoding="utf-8",
                         timeout=30, dimensions=(40, 160))


def _interrupt_at(child: pexpect.spawn, prompt: str) -> tuple[int, str]:
    """Wait for ``prompt``, press Ctrl-C once, return (exit code, everything printed after it)."""
    child.expect(prompt)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
    return child.exitstatus, child.before.replace("\r", "")


def _check(code: int, after: str) -> None:
    assert code == 130, after
    assert "Traceback" not in after
    lines = [line for line in after.split("\n") if line.strip() and line.strip() != "^C"]
    assert lines == [INTERRUPTED], after


def test_ctrl_c_at_the_passphrase_prompt_exits_130_at_once(make_user) -> None:
    alice = make_user("alice")
    _check(*_interrupt_at(_spawn(alice.home, "fingerprint"), r"Passphrase for alice: "))
    _check(*_interrupt_at(_spawn(alice.home, "recv"), r"Passphrase for alice: "))
    assert alice.ok("fingerprint").startswith("alice: SHA256:")


def test_ctrl_c_while_choosing_a_passphrase_creates_nothing(relay: RelayProcess, tmp_path: Path) -> None:
    home = tmp_path / "home-carol"
    for prompt, typed in ((r"New passphrase for carol: ", None), (r"Repeat passphrase: ", PASSPHRASE)):
        child = _spawn(home, "init", "carol", "--server", relay.url,
                       "--server-fingerprint", relay.fingerprint)
        if typed is not None:
            child.expect(r"New passphrase for carol: ")
            child.sendline(typed)
        _check(*_interrupt_at(child, prompt))
        assert not (home / "profiles" / "carol").exists()
    carol = User("carol", home)   # the name is still free and the command simply runs again
    carol.ok("init", "carol", "--server", relay.url, "--server-fingerprint", relay.fingerprint)


def test_ctrl_c_at_yes_no_and_shared_password_prompts_verifies_nothing(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "hi")
    _check(*_interrupt_at(_spawn(alice.home, "verify", "bob", passphrase=PASSPHRASE),
                          r"Does bob see exactly the same number\? \[y/N\] "))
    _check(*_interrupt_at(_spawn(alice.home, "verify", "bob", "--password", passphrase=PASSPHRASE),
                          r"Password you share with bob: "))
    assert "unverified" in alice.ok("contacts")
    assert [m["text"] for m in bob.recv()] == ["hi"]   # no verification message went out


def test_ctrl_c_at_chat_setup_prompts_exits_130_and_creates_nothing(relay: RelayProcess,
                                                                    tmp_path: Path) -> None:
    home = tmp_path / "home-dave"
    code, after = _interrupt_at(_spawn(home, "client", "--server", relay.url), r"Username .*: ")
    assert code == 130 and "interrupted; nothing was changed" in after and "Traceback" not in after
    child = _spawn(home, "client", "--server", relay.url)
    child.expect(r"Username")
    child.send("dave\r")
    child.expect(r"Does it match")
    child.send("y\r")
    code, after = _interrupt_at(child, r"New passphrase")
    assert code == 130 and "interrupted; nothing was changed" in after and "Traceback" not in after
    assert not (home / "profiles" / "dave").exists()
