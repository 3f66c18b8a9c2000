"""Burst sends (issue 8, "Client speed"): ``Client.send_many`` shares one profile commit and sends 16
envelopes a frame (cap ``batch``); recipient order equals send order, also when the relay refuses
one for a moment (it and every later message to that recipient wait in the outbox, in order, while
other recipients go on). Through a real relay process and real profiles; CLI ``send --stdin``."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from e2e_support import PASSPHRASE, RelayProcess, User

from cipherpost.client.client import Client
from cipherpost.client.errors import ServerError


def _texts(user: User) -> list[str]:
    return [str(m["text"]) for m in user.recv()]


def test_send_many_commits_once_and_sends_sixteen_envelopes_a_frame_in_order(make_user) -> None:  # type: ignore[no-untyped-def]
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    events: list[tuple[str, dict[str, Any]]] = []
    items = [("bob" if i % 4 else "carol", f"burst {i}") for i in range(40)]

    async def scenario() -> list[bytes]:
        async with Client.open(alice.home, "alice", PASSPHRASE,
                               observer=lambda e, d: events.append((e, d))) as a:
            await a.connect()
            ids = await a.send_many(items)
            assert a.pending_outbox() == 0
            return ids
    ids = asyncio.run(scenario())
    assert len(set(ids)) == 40
    assert [d["count"] for e, d in events if e == "encrypt_many"] == [40]   # one profile commit
    assert [d["envelopes"] for e, d in events if e == "accepted_many"] == [16, 16, 8]
    assert not [e for e, _ in events if e == "accepted"]                    # no one-at-a-time send
    assert _texts(bob) == [t for n, t in items if n == "bob"]
    assert _texts(carol) == [t for n, t in items if n == "carol"]


def test_a_message_refused_for_a_moment_waits_with_everything_after_it_and_goes_in_order(
        tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "capped-relay")
    relay.start(extra=["--max-queue-per-sender", "10"])
    users = {n: User(n, tmp_path / f"home-{n}") for n in ("alice", "bob", "carol")}
    for u in users.values():
        u.ok("init", u.name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    items = [("bob" if i % 3 else "carol", f"m{i}") for i in range(36)]   # 24 to bob, 12 to carol

    async def burst() -> int:
        async with Client.open(alice.home, "alice", PASSPHRASE) as a:
            await a.connect()
            with pytest.raises(ServerError) as info:
                await a.send_many(items)
            assert info.value.code == "sender_cap"
            return a.pending_outbox()

    async def flush() -> int:
        async with Client.open(alice.home, "alice", PASSPHRASE) as a:
            await a.connect()   # flushes the outbox; a refusal for a moment leaves it queued
            with contextlib.suppress(ServerError):
                await a.flush_outbox()
            return a.pending_outbox()
    try:
        assert asyncio.run(burst()) == 14 + 2        # bob: 10 of 24 in; carol: 10 of 12 in
        to_bob = [t for n, t in items if n == "bob"]
        to_carol = [t for n, t in items if n == "carol"]
        got_bob, got_carol = _texts(bob), _texts(carol)   # read and acked: room again
        assert got_bob == to_bob[:10] and got_carol == to_carol[:10]
        assert asyncio.run(flush()) == 4              # bob: 10 more; carol: the last 2
        got_bob += _texts(bob)
        got_carol += _texts(carol)
        assert asyncio.run(flush()) == 0
        got_bob += _texts(bob)
        assert got_bob == to_bob                      # in send order, each once
        assert got_carol == to_carol
    finally:
        relay.stop()


def test_send_stdin_sends_every_line_in_order_in_one_process(make_user) -> None:  # type: ignore[no-untyped-def]
    alice, bob = make_user("alice"), make_user("bob")
    lines = [f"line {i}" for i in range(50)]
    out = alice.ok("send", "bob", "--stdin", "--json", stdin="\n".join(lines) + "\n")
    assert len([s for s in out.splitlines() if s.strip()]) == 50 and '"queued"' not in out
    assert _texts(bob) == lines


def test_large_messages_are_packed_into_frames_under_the_relays_max_frame(make_user) -> None:  # type: ignore[no-untyped-def]
    alice, bob = make_user("alice"), make_user("bob")
    events: list[tuple[str, dict[str, Any]]] = []
    texts = [f"{i:02d}" + "q" * 30_000 for i in range(20)]   # 16 of them would be ~500 KB > 256 KiB

    async def scenario() -> None:
        async with Client.open(alice.home, "alice", PASSPHRASE,
                               observer=lambda e, d: events.append((e, d))) as a:
            await a.connect()
            await a.send_many([("bob", t) for t in texts])
            assert a.pending_outbox() == 0
    asyncio.run(scenario())
    frames = [d["envelopes"] for e, d in events if e == "accepted_many"]
    assert sum(frames) == 20 and max(frames) <= 8   # 8 x ~30 KB fit in 256 KiB; 9 would not
    assert _texts(bob) == texts
