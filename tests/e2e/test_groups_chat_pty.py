"""Groups in the interactive chat (``/groups``, ``/group NAME``), through a pseudo-terminal."""

from __future__ import annotations

from pathlib import Path

from e2e_support import PASSPHRASE, RelayProcess
from test_chat_pty import Terminal, create_through_prompts


def test_group_in_the_chat(make_user, relay: RelayProcess, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bob, carol = make_user("bob"), make_user("carol")
    alice = Terminal(tmp_path / "home-alice", "--server", relay.url, passphrase=PASSPHRASE)
    try:
        create_through_prompts(alice, "alice", relay, type_server=False, type_passphrase=False)
        bob.ok("group", "create", "team", "alice", "carol")
        alice.wait_for(r"\[team\] -- bob added you to the group team")
        alice.line("/groups")
        alice.wait_for(r"team  3 members  \(member\)")
        alice.line("/group nope")
        alice.wait_for(r"no group named 'nope'")
        alice.line("/group team")
        alice.wait_for(r"writing to the group team")
        alice.wait_for(r"#team> ?")
        alice.line("hello team")
        alice.wait_for(r"you -> \[team\]: hello team\n")
        rows = carol.recv(wait=10)
        assert [(r["from"], r["text"], r["group"]) for r in rows if r["from"] == "alice"] == [
            ("alice", "hello team", "team")]
        carol.ok("send", "--group", "team", "hi alice")
        alice.wait_for(r"\[team\] carol: hi alice\n")
        alice.line("/to bob")
        alice.wait_for(r"bob> ?")                 # back to one person
        alice.line("/quit")
        assert alice.exit_code() == 0
    finally:
        alice.kill()
