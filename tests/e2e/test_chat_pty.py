"""The interactive chat driven through a pseudo-terminal, as a person would use it, against a real relay.

Every client has its own home. prompt_toolkit redraws with escape sequences, so the screen is read
as a text stream with ANSI sequences and carriage returns removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

import pexpect
from e2e_support import PASSPHRASE, RelayProcess

TIMEOUT = 20.0
ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_=>])")
SAFETY_NUMBER = re.compile(r"safety number with (\w+):\n((?:\d{5}[ \n]){11}\d{5})")


class Terminal:
    """One `cipherpost client` in a pty; :meth:`wait_for` reads the screen stream up to a pattern."""

    def __init__(self, home: Path, *args: str, passphrase: str | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CIPHERPOST_")}
        # PROMPT_TOOLKIT_NO_CPR: pexpect does not answer cursor-position requests as a real terminal
        # does (it only costs prompt_toolkit a timeout there, users do not need it).
        env.update({"CIPHERPOST_HOME": str(home), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1",
                    "PYTHONUNBUFFERED": "1"})
        if passphrase is not None:
            env["CIPHERPOST_PASSPHRASE"] = passphrase
        self.child = pexpect.spawn(sys.executable, ["-m", "cipherpost", "client", *args], env=env,
                                   dimensions=(40, 160), encoding="utf-8", timeout=TIMEOUT)
        self.raw = ""
        self.screen = ""
        self.pos = 0

    def _read(self, timeout: float) -> bool:
        try:
            self.raw += self.child.read_nonblocking(65536, timeout=timeout)
        except pexpect.TIMEOUT:
            return True
        except pexpect.EOF:
            return False
        self.screen = ANSI.sub("", self.raw).replace("\r", "")
        return True

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first match of ``pattern`` after the previous match; the cursor moves past it."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        alive = True
        while True:
            found = regex.search(self.screen, self.pos)
            if found:
                self.pos = found.end()
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not alive:
                raise AssertionError(f"never saw {pattern!r}; screen since the last match:\n"
                                     f"{self.screen[self.pos:][-3000:]}")
            alive = self._read(min(remaining, 0.2))

    def type(self, text: str) -> None:
        self.child.send(text)

    def line(self, text: str) -> None:
        self.child.send(text + "\r")

    def exit_code(self) -> int:
        while self._read(TIMEOUT):
            pass
        self.child.close()
        assert self.child.exitstatus is not None, f"killed by signal {self.child.signalstatus}"
        return int(self.child.exitstatus)

    def kill(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


def create_through_prompts(term: Terminal, name: str, relay: RelayProcess, *, type_server: bool,
                           type_passphrase: bool, paste_fingerprint: bool = False) -> None:
    term.wait_for(r"Username \(pick one.*\): ?")
    term.line(name)
    term.wait_for(f"'{name}' is new here")
    if type_server:
        term.wait_for(r"Server address \[wss://127\.0\.0\.1:8765\]: ?")
        term.line(relay.url)
    shown = term.wait_for(r"fingerprint is\n\s+(SHA256:[0-9a-f]{64})")
    assert shown.group(1) == relay.fingerprint     # the pin the person confirms is the real one
    term.wait_for(r"Does it match\? \[Y/n, or paste the fingerprint to compare\] ?")
    if paste_fingerprint:
        term.line(relay.fingerprint)
        term.wait_for(r"the fingerprints match\.")
    else:
        term.line("y")
    if type_passphrase:
        term.wait_for(r"New passphrase .*: ?")
        term.line(PASSPHRASE)
        term.wait_for(r"Repeat passphrase: ?")
        term.line(PASSPHRASE)
    term.wait_for(f"registered {name}")
    term.wait_for(r"recovery code for .*\n\s+[A-Z2-7]{4}(-[A-Z2-7]{4}){8}\n")  # shown once, at creation
    term.wait_for(r"/help lists commands.*\n")
    term.wait_for(r"-- connected\n> ?")


def test_two_interactive_clients_chat_live_both_ways(relay: RelayProcess, tmp_path: Path) -> None:
    alice = Terminal(tmp_path / "home-alice")                        # types everything, passphrase too
    bob = Terminal(tmp_path / "home-bob", "--server", relay.url, passphrase=PASSPHRASE)
    try:
        create_through_prompts(alice, "alice", relay, type_server=True, type_passphrase=True,
                               paste_fingerprint=True)
        create_through_prompts(bob, "bob", relay, type_server=False, type_passphrase=False)
        assert PASSPHRASE not in alice.screen                         # the passphrase was masked
        alice.line("/to bob")
        alice.wait_for(r"-- talking to bob.*\n")
        alice.wait_for(r"bob> ?")
        alice.line("hello bob, from alice")
        alice.wait_for(r"\] you -> bob: hello bob, from alice\n")
        bob.wait_for(r"\] alice: hello bob, from alice\n")             # live, bob pressed nothing
        bob.wait_for(r"now talking to alice")                         # the sender became bob's peer
        bob.wait_for(r"alice> ?")
        bob.line("hi alice, bob here")
        bob.wait_for(r"\] you -> alice: hi alice, bob here\n")
        alice.wait_for(r"\] bob: hi alice, bob here\n")
        assert "queued" not in alice.screen + bob.screen and "NOT SENT" not in alice.screen + bob.screen
        # The typed chat line is shown in clear, not masked like the passphrase before it.
        alice.wait_for(r"bob> ?")
        alice.type("visible")
        alice.wait_for(r"visible", timeout=5)
        alice.line("")
        bob.wait_for(r"alice: visible\n")
        alice.line("//slash is text")                            # "//" escapes a leading slash
        bob.wait_for(r"\] alice: /slash is text\n")
        # Password verification from both chats, then the conversation goes on.
        alice.wait_for(r"bob> ?")
        alice.line("/verify bob password")
        alice.wait_for(r"Password you share with bob: ?")
        alice.line("tuna sandwich")
        bob.wait_for(r"-- alice started a password verification with you: type /verify alice password")
        bob.line("/verify alice password")
        bob.wait_for(r"Password you share with alice: ?")
        bob.line("tuna sandwich")
        alice.wait_for(r"bob is verified")
        bob.wait_for(r"alice is verified")
        assert "bob started a password verification" not in alice.screen   # it was her own request
        alice.line("/contacts")
        alice.wait_for(r"  bob  verified\n")
        alice.line("after verification")
        bob.wait_for(r"\] alice: after verification\n")
        alice.line("/quit")
        bob.line("/quit")
        assert alice.exit_code() == 0 and bob.exit_code() == 0
        assert "tuna sandwich" not in alice.screen + bob.screen
    finally:
        alice.kill()
        bob.kill()


def test_incoming_message_keeps_the_half_typed_line(make_user, relay: RelayProcess, tmp_path: Path) -> None:
    bob, carol = make_user("bob"), make_user("carol")      # command-line users next to the chat
    alice = Terminal(tmp_path / "home-alice", "--server", relay.url, passphrase=PASSPHRASE)
    try:
        create_through_prompts(alice, "alice", relay, type_server=False, type_passphrase=False)
        alice.line("/to bob")
        alice.wait_for(r"bob> ?")
        alice.type("half-typed")
        alice.wait_for(r"half-typed", timeout=5)
        # An escape sequence from a sender is shown, not obeyed (the screen here is stripped of real ones).
        carol.ok("send", "alice", "an interruption \x1b[2J")
        alice.wait_for(r"\] carol: an interruption \\x1b\[2J\n")
        alice.wait_for(r"-- to answer carol: /to carol \(you are talking to bob\)")
        alice.wait_for(r"bob> ?half-typed")               # the prompt is redrawn with the typed text
        alice.line(" rest")
        alice.wait_for(r"\] you -> bob: half-typed rest\n")
        assert [(m["from"], m["text"]) for m in bob.recv(wait=10)] == [("alice", "half-typed rest")]
        alice.line("/quit")
        assert alice.exit_code() == 0
    finally:
        alice.kill()


def test_commands(make_user, relay: RelayProcess, tmp_path: Path) -> None:
    bob = make_user("bob")
    alice = Terminal(tmp_path / "home-alice", "--server", relay.url, passphrase=PASSPHRASE)
    try:
        create_through_prompts(alice, "alice", relay, type_server=False, type_passphrase=False)
        alice.line("/contacts")
        alice.wait_for(r"no contacts yet")
        alice.line("hello?")                                      # no peer chosen yet
        alice.wait_for(r"\(not sent\) who is it for\? /to NAME")
        alice.line("/to bob first message")                       # switch and send in one go
        alice.wait_for(r"-- talking to bob")
        alice.wait_for(r"you -> bob: first message\n")
        assert [m["text"] for m in bob.recv(wait=10)] == ["first message"]
        bob.ok("accept", "alice")                                 # alice was a stranger to bob
        alice.line("/contacts")
        alice.wait_for(r"  bob  unverified \(compare: /safety bob\)")
        alice.line("/safety bob")
        shown = alice.wait_for(SAFETY_NUMBER.pattern)
        groups = shown.group(2).split()
        assert shown.group(1) == "bob" and len(groups) == 12 and all(len(g) == 5 for g in groups)
        # bob computes the same 60 digits on his side: the number really is the shared one.
        on_bobs_side = SAFETY_NUMBER.search(bob.ok("fingerprint", "alice"))
        assert on_bobs_side is not None and on_bobs_side.group(2).split() == groups
        alice.line("/history bob")
        alice.wait_for(r"\] you: first message\n")
        alice.line("/verify bob")
        alice.wait_for(r"Does bob see exactly the same number\? \[y/N\] ?")
        alice.type("\x03")                                         # Ctrl-C at the question
        alice.wait_for(r"-- cancelled")
        alice.line("/contacts")
        alice.wait_for(r"  bob  unverified")
        # Ctrl-C while a command waits (a password verification nobody answers) cancels only it.
        alice.line("/verify bob password")
        alice.wait_for(r"Password you share with bob: ?")
        alice.line("a shared secret")
        alice.wait_for(r"waiting up to 120s")
        alice.type("\x03")
        alice.wait_for(r"-- cancelled")
        alice.line("/help")
        alice.wait_for(r"/history NAME .*\n(.*\n)*  /quit ")
        alice.line("/frobnicate")
        alice.wait_for(r"unknown command: /frobnicate \(try /help\)")
        alice.line("/to")
        alice.wait_for(r"usage: /to NAME")
        alice.line("/to nobody")
        alice.wait_for(r"nobody> ?")
        alice.line("anyone there?")
        alice.wait_for(r"NOT SENT: there is no user 'nobody'")
        alice.wait_for(r"nobody> ?")
        alice.type("discard-me")
        alice.wait_for(r"discard-me", timeout=5)
        alice.type("\x03")                                         # Ctrl-C clears the line, stays
        alice.wait_for(r"Ctrl-C clears the line; /quit or Ctrl-D leaves")
        alice.line("/quit")
        assert alice.exit_code() == 0
        assert "discard-me/quit" not in alice.screen      # Ctrl-C really emptied the line
        assert "Traceback" not in alice.screen and "a shared secret" not in alice.screen
    finally:
        alice.kill()


def test_wrong_passphrase_and_cancel_exit_cleanly(make_user, tmp_path: Path) -> None:
    alice_cli = make_user("alice")
    alice = Terminal(alice_cli.home)
    try:
        alice.wait_for(r"Username \[alice\] \(a new name creates a new identity\): ?")
        alice.line("")                                           # the only profile is the default
        alice.wait_for(r"Passphrase for alice: ?")
        alice.line("not the passphrase")
        alice.wait_for(r"unlocking\.\.\.\n")
        alice.wait_for(r"!! wrong passphrase; try again\n")     # asked again, not thrown out
        alice.wait_for(r"Passphrase for alice: ?")
        alice.line(PASSPHRASE)
        alice.wait_for(r"You are alice on ")
        alice.line("/quit")
        assert alice.exit_code() == 0
        assert "Traceback" not in alice.screen
    finally:
        alice.kill()
    # Three wrong passphrases end it, with one line.
    alice = Terminal(alice_cli.home)
    try:
        alice.wait_for(r"Username \[alice\] \(a new name creates a new identity\): ?")
        alice.line("")
        for _ in range(3):
            alice.wait_for(r"Passphrase for alice: ?")
            alice.line("not the passphrase")
        assert alice.exit_code() == 1
        assert alice.screen[alice.pos:].strip().endswith("cipherpost: error: wrong passphrase 3 times; "
                                                         "nothing was changed")
        assert "Traceback" not in alice.screen
    finally:
        alice.kill()
    # Ctrl-D at the first question leaves without a traceback, and the profile still opens.
    again = Terminal(alice_cli.home)
    try:
        again.wait_for(r"Username \[alice\]")
        again.type("\x04")
        assert again.exit_code() == 1
        assert "cancelled" in again.screen and "Traceback" not in again.screen
    finally:
        again.kill()
    assert alice_cli.ok("contacts").startswith("no contacts yet")


def test_pasted_fingerprint_that_differs_creates_nothing(relay: RelayProcess, tmp_path: Path) -> None:
    home = tmp_path / "home-mallory"
    term = Terminal(home, "--server", relay.url, passphrase=PASSPHRASE)
    try:
        term.wait_for(r"Username .*: ?")
        term.line("mallory")
        term.wait_for(r"Does it match\? .*\] ?")
        term.line("SHA256:" + "ab" * 32)
        assert term.exit_code() == 1
        assert "does NOT match this server's certificate" in term.screen
        assert "Traceback" not in term.screen
        assert not (home / "profiles" / "mallory").exists()
    finally:
        term.kill()


def test_relay_restart_during_chat_queues_and_delivers(make_user, relay: RelayProcess) -> None:
    alice_cli, bob = make_user("alice"), make_user("bob")
    alice = Terminal(alice_cli.home, passphrase=PASSPHRASE)
    try:
        alice.wait_for(r"Username \[alice\]")
        alice.line("")
        alice.wait_for(r"-- connected\n> ?")
        alice.line("/to bob before the restart")
        alice.wait_for(r"you -> bob: before the restart\n")
        relay.stop()
        alice.wait_for(r"-- disconnected")
        alice.wait_for(r"cannot connect .*; retrying in the background")
        alice.line("while the relay is down")
        alice.wait_for(r"you -> bob: while the relay is down  \(queued: not connected")
        relay.start(port=relay.port)
        alice.wait_for(r"-- connected again; queued messages sent")
        assert [m["text"] for m in bob.recv(wait=10)] == ["before the restart", "while the relay is down"]
        alice.line("/quit")
        assert alice.exit_code() == 0
        assert "Unhandled exception" not in alice.screen and "Traceback" not in alice.screen
        assert alice.screen.count("cannot connect") == 1          # retries are reported once
    finally:
        alice.kill()


def test_reconnecting_leaves_no_orphaned_connection_tasks(relay: RelayProcess, tmp_path: Path) -> None:
    """The chat's reconnect loop must close a dead connection: an orphaned pending task is reported
    when garbage-collected, and prompt_toolkit then stops the chat with "Press ENTER to continue"."""
    import asyncio

    from cipherpost.client.client import Client
    from cipherpost.client.connection import parse_fingerprint

    def push_workers() -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Connection._push_loop")

    async def scenario() -> list[str]:
        loop_errors: list[str] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: loop_errors.append(str(context.get("message"))))
        client = await Client.create(tmp_path / "home", "alice", relay.url, PASSPHRASE,
                                     server_fingerprint=parse_fingerprint(relay.fingerprint))
        statuses: list[str] = []
        keeper = asyncio.create_task(client.stay_connected(statuses.append))
        try:
            while statuses.count("connected") < 1:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(relay.stop)   # the loop keeps running: the client sees the close
            await asyncio.to_thread(relay.start, relay.port)
            while statuses.count("connected") < 2:
                await asyncio.sleep(0.05)
            assert push_workers() == 1, statuses
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await client.close()
        return loop_errors

    assert asyncio.run(asyncio.wait_for(scenario(), TIMEOUT)) == []


def test_files_in_the_chat(make_user, relay: RelayProcess, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """/file PATH sends a file; an incoming file is saved to the Downloads folder and its path shown;
    a text over the relay's limit is offered as a file (issue 13)."""
    relay.stop()
    relay.start(port=relay.port, extra=["--max-body", "4000"])
    monkeypatch.setenv("HOME", str(tmp_path / "alice-home-dir"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "alice-home-dir" / ".config"))
    bob = make_user("bob")
    report = tmp_path / "report.pdf"
    report.write_bytes(os.urandom(200_000))
    alice = Terminal(tmp_path / "home-alice", "--server", relay.url, passphrase=PASSPHRASE)
    try:
        create_through_prompts(alice, "alice", relay, type_server=False, type_passphrase=False)
        alice.line("/to bob")
        alice.wait_for(r"-- talking to bob")
        alice.line(f"/file {report}")
        alice.wait_for(r"-- sent report\.pdf to bob")
        [row] = [json.loads(line) for line in bob.ok("recv", "--json", "--downloads",
                                                     str(tmp_path / "bob-dl")).splitlines()]
        assert Path(row["file"]["path"]).read_bytes() == report.read_bytes()
        photo = tmp_path / "photo.jpg"
        photo.write_bytes(os.urandom(100_000))
        bob.ok("send-file", "alice", str(photo))
        saved = alice.wait_for(r"-- bob's file saved to (\S+photo\.jpg)\n")
        assert Path(saved.group(1)).read_bytes() == photo.read_bytes()
        assert Path(saved.group(1)).parent == tmp_path / "alice-home-dir" / "Downloads"
        alice.line("x" * 5000)
        alice.wait_for(r"send it as a file \(message\.txt\) instead\? \[y/N\] ?")
        alice.line("y")
        alice.wait_for(r"-- sent as message\.txt to bob")
        [row] = [json.loads(line) for line in bob.ok("recv", "--json", "--downloads",
                                                     str(tmp_path / "bob-dl")).splitlines()]
        assert Path(row["file"]["path"]).read_text() == "x" * 5000
        alice.line("/quit")
        assert alice.exit_code() == 0
        assert "Traceback" not in alice.screen
    finally:
        alice.kill()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _paste_discarding_echo(term: Terminal, data: str, chunk: int = 4096) -> None:
    """Type ``data`` as a terminal would deliver a paste, keeping the screen but not the redraws of
    the long line (runs of one repeated letter are cut, so the screen stays small to search)."""
    drained: list[str] = []
    for i in range(0, len(data), chunk):
        term.child.send(data[i : i + chunk])
        with contextlib.suppress(pexpect.TIMEOUT):
            while True:
                drained.append(term.child.read_nonblocking(1 << 20, timeout=0))
    kept = re.sub(r"([a-z])\1{40,}", "", ANSI.sub("", term.raw + "".join(drained)).replace("\r", ""))
    term.raw = term.screen = kept
    term.pos = 0


def test_over_long_input_is_refused_at_once_and_memory_stays_flat(make_user, relay: RelayProcess) -> None:
    from cipherpost.client.plaintext import MAX_TEXT_BYTES
    alice_cli, bob = make_user("alice"), make_user("bob")
    alice = Terminal(alice_cli.home, passphrase=PASSPHRASE)
    try:
        alice.wait_for(r"Username \[alice\].*: ?")
        alice.line("")
        alice.wait_for(r"-- connected\n> ?")
        alice.line("/to bob")
        alice.wait_for(r"bob> ?")
        baseline = _peak_rss_mb(alice.child.pid)
        # 100 KB typed as a stream of keys (a terminal without bracketed paste), then Enter.
        _paste_discarding_echo(alice, "x" * 100_000 + "\r")
        alice.wait_for(rf"input refused: a message is at most {MAX_TEXT_BYTES} bytes; the line was cleared, "
                       "NOT sent")
        # 100 KB as a bracketed paste (what prompt_toolkit asks a terminal for): refused whole.
        _paste_discarding_echo(alice, "\x1b[200~" + "y" * 100_000 + "\x1b[201~")
        alice.wait_for(rf"input refused: a message is at most {MAX_TEXT_BYTES} bytes; nothing of the paste")
        alice.line("still here")
        alice.wait_for(r"\] you -> bob: still here\n")
        assert _peak_rss_mb(alice.child.pid) < baseline + 150     # flat: not gigabytes
        # A paste that fits is kept and sent as typed.
        alice.type("\x1b[200~" + "z" * 5000 + "\x1b[201~")
        alice.line("")
        alice.wait_for(r"\] you -> bob: z{5000}\n")
        assert [m["text"] for m in bob.recv(wait=10)] == ["still here", "z" * 5000]
        alice.line("/quit")
        assert alice.exit_code() == 0
        assert "Traceback" not in alice.screen
    finally:
        alice.kill()


def test_chat_verifies_a_non_contact_by_password_and_shows_a_block(make_user, relay: RelayProcess) -> None:
    import subprocess
    alice_cli, bob = make_user("alice"), make_user("bob")
    alice = Terminal(alice_cli.home, passphrase=PASSPHRASE)
    try:
        alice.wait_for(r"Username \[alice\].*: ?")
        alice.line("")
        alice.wait_for(r"-- connected\n> ?")
        # bob is no contact of alice yet: the chat accepts it, as `cipherpost verify --password` does.
        env = {**os.environ, "CIPHERPOST_HOME": str(bob.home), "CIPHERPOST_PASSPHRASE": PASSPHRASE,
               "CIPHERPOST_VERIFY_PASSWORD": "not the same"}
        peer = subprocess.Popen([sys.executable, "-m", "cipherpost", "verify", "alice", "--password",
                                 "--timeout", "60"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        alice.line("/verify bob password")
        alice.wait_for(r"Password you share with bob: ?")
        alice.line("a shared secret")
        alice.wait_for(r"verification FAILED")
        assert peer.wait(timeout=90) == 1
        alice.line("/contacts")
        # A blocked contact is shown as blocked, not as "unverified" (issue 8 item 14).
        alice.wait_for(r"  bob  BLOCKED: the last password verification failed.*"
                       r"\(verify again: /verify bob password\)")
        alice.line("/quit")
        assert alice.exit_code() == 0 and "Traceback" not in alice.screen
    finally:
        alice.kill()


def test_a_cancelled_verification_is_withdrawn_on_the_peers_screen(make_user, relay: RelayProcess) -> None:
    import signal
    import subprocess
    alice_cli, bob = make_user("alice"), make_user("bob")
    bob.ok("send", "alice", "hi")
    alice = Terminal(alice_cli.home, passphrase=PASSPHRASE)
    try:
        alice.wait_for(r"Username \[alice\].*: ?")
        alice.line("")
        alice.wait_for(r"-- connected\n")
        env = {**os.environ, "CIPHERPOST_HOME": str(bob.home), "CIPHERPOST_PASSPHRASE": PASSPHRASE,
               "CIPHERPOST_VERIFY_PASSWORD": "our secret"}
        peer = subprocess.Popen([sys.executable, "-m", "cipherpost", "verify", "alice", "--password",
                                 "--timeout", "60"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        alice.wait_for(r"-- bob started a password verification with you: type /verify bob password")
        peer.send_signal(signal.SIGINT)                 # bob gives up (Ctrl-C)
        _, err = peer.communicate(timeout=60)
        assert peer.returncode == 130 and "Traceback" not in err
        alice.wait_for(r"-- bob cancelled the password verification they started; nothing to do")
        alice.line("/accept bob")                           # bob's "hi" was a message request
        alice.wait_for(r"-- bob is now a contact")
        alice.line("/contacts")
        alice.wait_for(r"  bob  unverified")
        alice.line("/quit")
        assert alice.exit_code() == 0 and "Traceback" not in alice.screen
    finally:
        alice.kill()
