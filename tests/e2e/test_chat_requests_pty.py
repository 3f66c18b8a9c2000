"""The interactive chat (a real pty) with strangers: a request is shown apart, /accept and /block."""

from __future__ import annotations

from pathlib import Path

from e2e_support import PASSPHRASE, RelayProcess
from test_chat_pty import Terminal, create_through_prompts


def test_chat_shows_a_request_apart_then_accepts_one_and_blocks_another(make_user, relay: RelayProcess,
                                                                         tmp_path: Path) -> None:
    carol, mallory = make_user("carol"), make_user("mallory")
    alice = Terminal(tmp_path / "home-alice", "--server", relay.url, passphrase=PASSPHRASE)
    try:
        create_through_prompts(alice, "alice", relay, type_server=False, type_passphrase=False)
        carol.ok("send", "alice", "hi from carol")
        alice.wait_for(r"WARNING: message request: carol is not among your contacts")
        alice.wait_for(r"carol: hi from carol\n")
        alice.wait_for(r"/accept carol, or /block carol")
        alice.line("/requests")
        alice.wait_for(r"carol: 1 message\(s\) since")
        alice.line("/accept carol")
        alice.wait_for(r"-- carol is now a contact")
        alice.line("/contacts")
        alice.wait_for(r"  carol  unverified")
        mallory.ok("send", "alice", "spam 1")
        alice.wait_for(r"mallory: spam 1\n")
        alice.line("/block mallory")
        alice.wait_for(r"-- blocked mallory")
        mallory.ok("send", "alice", "spam 2")
        carol.ok("send", "alice", "still here")
        alice.wait_for(r"carol: still here\n")
        assert "spam 2" not in alice.screen
        alice.line("/requests")
        alice.wait_for(r"no message requests")
        alice.line("/quit")
        assert alice.exit_code() == 0
    finally:
        alice.kill()
