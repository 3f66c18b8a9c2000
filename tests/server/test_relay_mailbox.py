"""Store-and-forward: live push, offline delivery, redelivery until ack, idempotent ids, limits."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from relay_harness import harness, run

from cipherpost.protocol.frames import Accepted, Deliver, Error, PrekeysLow

pytestmark = pytest.mark.usefixtures("relay_backend")  # every test on SQLite and on PostgreSQL


async def _drain(client, timeout: float = 0.3) -> list:  # type: ignore[no-untyped-def]
    """Messages pushed within ``timeout`` (ignoring prekeys_low notices)."""
    out = []
    try:
        while True:
            frame = await client.next_push(timeout)
            if isinstance(frame, Deliver):
                out.extend(frame.messages)
            else:
                assert isinstance(frame, PrekeysLow), frame
    except TimeoutError:
        return out


def test_live_push_and_offline_delivery(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            bob, bob_id = await h.user("bob")
            reply = await alice.send("bob", b"live")
            assert isinstance(reply, Accepted)
            [m] = await bob.receive_messages(1)
            assert (m.sender, m.body, m.id, m.kind) == ("alice", b"live", reply.id, "msg")
            await bob.ack([m.seq])
            await bob.close()
            ids = []
            for i in range(5):  # bob is offline: stored
                r = await alice.send("bob", f"offline {i}".encode(), kind="msg")
                assert isinstance(r, Accepted)
                ids.append(r.id)
            bob2 = await h.connect()
            await bob2.auth(bob_id, "bob")
            got = await bob2.receive_messages(5)
            assert [m.id for m in got] == ids
            assert [m.body for m in got] == [f"offline {i}".encode() for i in range(5)]
            assert [m.seq for m in got] == sorted(m.seq for m in got)
            assert not await _drain(bob2)  # the acked first message is not redelivered
    run(scenario())


def test_redelivery_until_ack(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            bob, bob_id = await h.user("bob")
            for i in range(3):
                await alice.send("bob", bytes([i]))
            first = await bob.receive_messages(3)
            await bob.ack([first[0].seq])  # ack only one, then drop the connection
            await asyncio.sleep(0.1)
            await bob.close()
            bob2 = await h.connect()
            await bob2.auth(bob_id, "bob")
            again = await bob2.receive_messages(2)
            assert [m.seq for m in again] == [m.seq for m in first[1:]]
            assert [m.body for m in again] == [b"\x01", b"\x02"]
            await bob2.ack([m.seq for m in again])
            await asyncio.sleep(0.1)
            await bob2.close()
            bob3 = await h.connect()
            await bob3.auth(bob_id, "bob")
            assert await _drain(bob3) == []
    run(scenario())


def test_retried_id_is_accepted_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            bob, _ = await h.user("bob")
            msg_id = os.urandom(16)
            replies = await asyncio.gather(*[alice.send("bob", b"same", msg_id=msg_id) for _ in range(3)])
            assert all(isinstance(r, Accepted) and r.id == msg_id for r in replies)
            [m] = await bob.receive_messages(1)
            assert await _drain(bob) == []
            await bob.ack([m.seq])
            await asyncio.sleep(0.1)
            # a retry after the recipient acked is still recognised: no second copy
            assert isinstance(await alice.send("bob", b"same", msg_id=msg_id), Accepted)
            assert await _drain(bob) == []
            # another sender may use the same id: ids are per sender
            carol, _ = await h.user("carol")
            assert isinstance(await carol.send("bob", b"carol's", msg_id=msg_id), Accepted)
            [m2] = await bob.receive_messages(1)
            assert m2.sender == "carol"
            assert h.server.metrics.messages_duplicate == 3
    run(scenario())


def test_ack_of_someone_elses_seq_leaves_their_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            bob, bob_id = await h.user("bob")
            mallory, _ = await h.user("mallory")
            await alice.send("bob", b"for bob")
            [m] = await bob.receive_messages(1)
            await bob.close()
            await mallory.ack([m.seq, m.seq + 1, 0])
            await asyncio.sleep(0.2)
            bob2 = await h.connect()
            await bob2.auth(bob_id, "bob")
            [again] = await bob2.receive_messages(1)
            assert again.seq == m.seq and again.body == b"for bob"
            assert await _drain(mallory) == []  # and mallory never saw it
    run(scenario())


def test_send_errors(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_queue=3, max_body=1000, pake_per_hour=2) as h:
            alice, _ = await h.user("alice")
            await h.user("bob")
            unknown = await alice.send("nobody", b"x")
            assert isinstance(unknown, Error) and unknown.code == "unknown_user"
            not_normal = await alice.send("Bob", b"x")
            assert isinstance(not_normal, Error) and not_normal.code == "invalid_username"
            big = await alice.send("bob", b"x" * 1001)
            assert isinstance(big, Error) and big.code == "too_large" and "1000" in big.message
            for _ in range(3):
                assert isinstance(await alice.send("bob", b"x" * 1000), Accepted)
            full = await alice.send("bob", b"x")
            assert isinstance(full, Error) and full.code == "mailbox_full" and full.rid is not None
            carol, _ = await h.user("carol")
            assert isinstance(await carol.send("alice", b"p1", kind="pake"), Accepted)
            assert isinstance(await carol.send("alice", b"p2", kind="pake"), Accepted)
            limited = await carol.send("alice", b"p3", kind="pake")
            assert isinstance(limited, Error) and limited.code == "rate_limited"
            assert isinstance(await carol.send("alice", b"m", kind="msg"), Accepted)  # only pake is limited
            got = await alice.receive_messages(3)
            assert [m.kind for m in got] == ["pake", "pake", "msg"]
    run(scenario())


def test_multiple_deliveries_batch_into_few_frames(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            bob, bob_id = await h.user("bob")
            await bob.close()
            await asyncio.gather(*[alice.send("bob", i.to_bytes(2, "big")) for i in range(300)])
            bob2 = await h.connect()
            await bob2.auth(bob_id, "bob")
            frames = []
            count = 0
            while count < 300:
                f = await bob2.next_push()
                if isinstance(f, Deliver):
                    frames.append(f)
                    count += len(f.messages)
            assert count == 300 and len(frames) <= 4
            bodies = sorted(int.from_bytes(m.body, "big") for f in frames for m in f.messages)
            assert bodies == list(range(300))
    run(scenario())


def test_drained_follows_every_message_queued_before_auth(tmp_path: Path) -> None:
    """``drained`` (hello cap) comes after the last queued message, so ``recv`` can stop at once;
    a connection with nothing queued gets it straight away, and live messages follow it."""
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            bob, bob_id = await h.user("bob")
            assert "drained" in bob.hello.caps
            await asyncio.wait_for(bob.drained.wait(), 5)
            assert bob.delivered_before_drained == 0
            await bob.close()
            for i in range(300):   # more than one sync page (SYNC_PAGE = 256)
                assert isinstance(await alice.send("bob", b"%d" % i + b"x" * 2000), Accepted)
            again = await h.connect()
            await again.auth(bob_id, "bob")
            await asyncio.wait_for(again.drained.wait(), 10)
            assert again.delivered_before_drained == 300
            got = await again.receive_messages(300)
            assert [m.body[:3].rstrip(b"x") for m in got] == [b"%d" % i for i in range(300)]
            await alice.send("bob", b"live")
            [live] = await again.receive_messages(1)
            assert live.body == b"live"
    run(scenario())
