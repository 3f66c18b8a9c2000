"""Receiving in batches (one transaction per delivered batch) keeps exactly-once delivery.

A real relay queues the messages while the recipient is offline, so they arrive in one ``deliver``
page; the recipient's process is killed hard (``os._exit``) in the middle of the batch, before its
commit, and again after the commit but before the ack.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

from e2e_support import PASSPHRASE, User

from cipherpost.client.client import Client

CRASH_AT_STEP = textwrap.dedent("""
    import asyncio, os, sys
    from pathlib import Path
    from cipherpost.client.client import Client

    home, user, event, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    seen = 0

    def observer(name, details):
        global seen
        if name == event:
            seen += 1
            if seen == nth:
                os._exit(17)   # a hard crash: no commit of the open batch, no ack

    async def main():
        client = Client.open(Path(home), user, os.environ["CIPHERPOST_PASSPHRASE"], observer=observer)
        await client.receive(wait=5)
        await client.close()

    asyncio.run(main())
""")


def _crash(user: User, event: str, nth: int) -> int:
    env = {**os.environ, "CIPHERPOST_PASSPHRASE": user.passphrase}
    return subprocess.run([sys.executable, "-c", CRASH_AT_STEP, str(user.home), user.name, event, str(nth)],
                          env=env, capture_output=True, text=True, timeout=60).returncode


def _send_all(user: User, to: str, texts: list[str]) -> None:
    async def go() -> None:
        async with Client.open(user.home, user.name, PASSPHRASE) as client:
            await client.connect()
            for text in texts:
                await client.send(to, text)
    asyncio.run(go())


def test_sigkill_inside_a_batch_then_after_its_commit_still_gives_exactly_once(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    texts = [f"batched {i:02d}" for i in range(30)]
    _send_all(alice, "bob", texts)
    assert _crash(bob, "batch_step", 12) == 17        # killed mid-batch: nothing of it committed
    assert _crash(bob, "decrypt", 3) == 17            # killed after the commit, before the ack
    received = bob.recv()
    assert [m["text"] for m in received] == texts     # each exactly once, in order
    assert bob.recv() == []
    bob.ok("accept", "alice")
    bob.ok("send", "alice", "and the session still works")
    assert [m["text"] for m in alice.recv()] == ["and the session still works"]


def test_a_bad_message_inside_a_batch_is_an_error_row_and_the_rest_is_stored(make_user) -> None:
    alice, bob, mallory = make_user("alice"), make_user("bob"), make_user("mallory")
    _send_all(alice, "bob", ["before"])

    async def junk() -> None:
        async with Client.open(mallory.home, "mallory", PASSPHRASE) as m:
            await m.connect()
            await m._require_conn().request({"t": "send", "to": "bob", "id": os.urandom(16), "kind": "msg",
                                             "body": b"\x95\x01 broken"})
    asyncio.run(junk())
    _send_all(alice, "bob", ["after"])
    got = bob.recv()
    assert [m["text"] for m in got if m["warning"] != "undecryptable"] == ["before", "after"]
    assert [m["from"] for m in got if m["warning"] == "undecryptable"] == ["mallory"]
    assert bob.recv() == []                           # the whole batch was acked, the bad one too
