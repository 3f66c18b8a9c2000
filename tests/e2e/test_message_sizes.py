"""Message sizes through a real relay (issue 8 item 1): every boundary arrives intact, the one
limit is printed in `send --help`, and what is refused is refused before the ratchet moves."""

from __future__ import annotations

import asyncio
import json

import pytest
from e2e_support import PASSPHRASE, RelayProcess

from cipherpost.client.client import Client
from cipherpost.client.plaintext import MAX_TEXT_BYTES, EmptyMessage, MessageTooLong

SIZES = [1, 4095, 4096, 4097, 16 * 1024, MAX_TEXT_BYTES]


def _text(size: int, tag: str) -> str:
    return (tag + ":" + "m" * size)[:size] if size > len(tag) + 1 else "m" * size


def test_every_size_up_to_the_limit_arrives_through_the_cli(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    # The longest text goes first: the first message of a session also carries the PQXDH
    # initial message (~1.3 KB more) and must still fit.
    texts = [_text(MAX_TEXT_BYTES, "first"), *(_text(n, str(n)) for n in SIZES),
             "é" * (MAX_TEXT_BYTES // 2)]
    for text in texts:
        assert alice.run("send", "bob", "-", stdin=text).returncode == 0
    received = bob.recv()
    assert [m["text"] for m in received] == texts
    # alice is a stranger to bob: her messages are requests, and nothing else is flagged.
    assert all(m["warning"] is None or m["warning"].startswith("message request: alice") for m in received)
    bob.ok("accept", "alice")
    # Both sides' history decodes every record, long ones included.
    for user, peer in ((alice, "bob"), (bob, "alice")):
        out = user.ok("history", peer, "--json", "--limit", "100")
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["text"] for r in rows] == texts
    # And the conversation goes on, both ways.
    bob.ok("send", "alice", "b" * 5000)
    alice.ok("send", "bob", "after")
    assert [m["text"] for m in alice.recv()] == ["b" * 5000]
    assert [m["text"] for m in bob.recv()] == ["after"]


@pytest.mark.parametrize("text", ["", "   ", " \n\t "])
def test_empty_or_whitespace_text_is_refused_through_the_cli(make_user, text: str) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    result = alice.run("send", "bob", "-", stdin=text)
    assert result.returncode == 2
    assert "empty or only whitespace" in result.stderr and "Traceback" not in result.stderr
    assert alice.run("send", "bob", text).returncode == 2
    assert alice.ok("contacts").startswith("no contacts yet")   # nothing fetched, nothing pinned
    alice.ok("send", "bob", "real")
    assert [m["text"] for m in bob.recv()] == ["real"]


def test_one_byte_over_the_limit_is_refused_and_the_next_message_still_decrypts(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "start")
    result = alice.run("send", "bob", "-", stdin="o" * (MAX_TEXT_BYTES + 1))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{MAX_TEXT_BYTES + 1} bytes; at most {MAX_TEXT_BYTES} bytes" in result.stderr
    alice.ok("send", "bob", "-", stdin="o" * MAX_TEXT_BYTES)
    assert [m["text"] for m in bob.recv()] == ["start", "o" * MAX_TEXT_BYTES]
    rows = [json.loads(line) for line in alice.ok("history", "bob", "--json").splitlines()]
    assert [r["text"] for r in rows] == ["start", "o" * MAX_TEXT_BYTES]   # the refused one left no row


def test_send_help_names_the_limit(make_user) -> None:
    alice = make_user("alice", init=False)
    assert f"{MAX_TEXT_BYTES} bytes" in alice.ok("send", "--help").replace("\n", " ")


def test_every_size_through_the_api_and_refusals_leave_the_session_untouched(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")

    async def scenario() -> None:
        async with Client.open(alice.home, "alice", PASSPHRASE) as a, \
                Client.open(bob.home, "bob", PASSPHRASE) as b:
            await a.connect()
            texts = [_text(n, f"api{n}") for n in [MAX_TEXT_BYTES, *SIZES]]
            for text in texts:
                await a.send("bob", text)
            contact = a.contact("bob")
            before = a.db.latest_session("bob", contact.identity)
            for bad, error in (("", EmptyMessage), ("  \n", EmptyMessage),
                               ("x" * (MAX_TEXT_BYTES + 1), MessageTooLong)):
                with pytest.raises(error):
                    await a.send("bob", bad)
            after = a.db.latest_session("bob", contact.identity)
            assert before is not None and after is not None
            assert before[0] == after[0] and before[1] == after[1]   # state byte-identical
            assert [m.text for m in await b.receive()] == texts
            assert [m.text for m in b.history("alice", 100)] == texts
            assert [m.text for m in a.history("bob", 100)] == texts
    asyncio.run(scenario())


def test_a_relay_with_a_smaller_body_limit_is_honoured_before_encrypting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from e2e_support import User
    relay = RelayProcess(tmp_path / "small-relay")
    relay.start(extra=["--max-body", "8192"])
    try:
        alice, bob = User("alice", tmp_path / "home-alice"), User("bob", tmp_path / "home-bob")
        for user in (alice, bob):
            user.ok("init", user.name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)
        result = alice.run("send", "bob", "-", stdin="s" * 7000)
        assert result.returncode == 1 and "on this relay" in result.stderr
        alice.ok("send", "bob", "-", stdin="s" * 5000)
        assert [m["text"] for m in bob.recv()] == ["s" * 5000]
    finally:
        relay.stop()


def test_send_stdin_refuses_the_whole_batch_naming_the_line_that_is_too_long(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    lines = ["fine", "L" * (MAX_TEXT_BYTES + 1), "also fine"]
    result = alice.run("send", "bob", "--stdin", stdin="\n".join(lines) + "\n")
    assert result.returncode == 1 and "line 2: message too long" in result.stderr
    assert "nothing was sent" in result.stderr and bob.recv() == []
