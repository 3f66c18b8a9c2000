"""Cap ``batch`` (issue 11): several envelopes in one ``send`` frame, one ``accepted_many`` reply with
a status per envelope, durable before the reply, refused envelopes refusing only themselves, order
per recipient kept, and limits counted per envelope. Against a real relay over real TLS with a real
SQLite file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from relay_client import RelayClient
from relay_harness import harness, run

from cipherpost.protocol.frames import (
    MAX_BATCH_ENVELOPES,
    Accepted,
    AcceptedMany,
    Deliver,
    Envelope,
    Error,
    Ok,
    SendBatch,
)
from cipherpost.store.base import AccountState

pytestmark = pytest.mark.usefixtures("relay_backend")   # SQLite, and PostgreSQL where configured


def env(to: str, body: bytes, msg_id: bytes | None = None, kind: str = "msg") -> Envelope:
    return Envelope(to=to, id=msg_id or os.urandom(16), kind=kind, body=body)


async def batch(client: RelayClient, envelopes: list[Envelope]) -> AcceptedMany | Error:
    reply = await client.request(SendBatch(rid=client.rid(), envelopes=envelopes))
    assert isinstance(reply, AcceptedMany | Error), reply
    return reply


async def no_more_messages(client: RelayClient, wait_s: float = 0.5) -> bool:
    """True when no ``deliver`` frame arrives within ``wait_s`` (other pushes are skipped)."""
    try:
        while True:
            if isinstance(await client.next_push(timeout=wait_s), Deliver):
                return False
    except TimeoutError:
        return True


def test_the_relay_announces_batch(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            assert "batch" in (await h.connect()).hello.caps
    run(scenario())


def test_each_envelope_gets_its_own_status_and_a_refused_one_does_not_block_the_others(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_queue=3, max_queue_per_sender=2, max_stored_bytes=10_000,
                           max_body=8000) as h:
            alice, _ = await h.user("alice")
            bob, _ = await h.user("bob")
            x, _ = await h.user("xavier")
            y, _ = await h.user("yvonne")
            for name in ("dana", "full", "capped", "sus", "fat"):
                await (await h.user(name))[0].close()
            await h.server.store.set_state("sus", AccountState.SUSPENDED, "operator", "test")
            dup_id = os.urandom(16)
            assert isinstance(await alice.send("dana", b"earlier", dup_id), Accepted)
            for sender in (x, x, y):
                assert isinstance(await sender.send("full", b"filler"), Accepted)
            for _ in range(2):
                assert isinstance(await alice.send("capped", b"mine"), Accepted)
            assert isinstance(await x.send("fat", os.urandom(8000)), Accepted)
            envelopes = [env("bob", b"first"), env("nobody", b"?"), env("dana", b"again", dup_id),
                         env("full", b"no room"), env("bob", b"second"), env("capped", b"over my share"),
                         env("sus", b"hello?"), env("fat", os.urandom(4000)), env("dana", b"last")]
            reply = await batch(alice, envelopes)
            assert isinstance(reply, AcceptedMany)
            assert reply.ids == [e.id for e in envelopes]
            assert reply.status == ["accepted", "unknown_user", "duplicate", "mailbox_full", "accepted",
                                    "sender_cap", "suspended", "quota_exceeded", "accepted"]
            got = await bob.receive_messages(2)
            assert [(m.sender, m.body) for m in got] == [("alice", b"first"), ("alice", b"second")]
            assert isinstance(await alice.send("xavier", b"after"), Accepted)  # the connection goes on
    run(scenario())


def test_a_retried_batch_reads_duplicate_and_delivers_each_message_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            bob, bob_id = await h.user("bob")
            await bob.close()
            envelopes = [env("bob", b"m%d" % i) for i in range(MAX_BATCH_ENVELOPES)]
            first = await batch(alice, envelopes)
            assert isinstance(first, AcceptedMany) and first.status == ["accepted"] * MAX_BATCH_ENVELOPES
            again = await batch(alice, envelopes)  # the reply was lost, say: the client sends it again
            assert isinstance(again, AcceptedMany) and again.status == ["duplicate"] * MAX_BATCH_ENVELOPES
            bob = await h.connect()
            assert isinstance(await bob.auth(bob_id, "bob"), Ok)
            got = await bob.receive_messages(MAX_BATCH_ENVELOPES)
            assert [m.body for m in got] == [e.body for e in envelopes]
            assert [m.id for m in got] == [e.id for e in envelopes]
            await bob.ack([m.seq for m in got])
            assert await no_more_messages(bob)
    run(scenario())


def test_pipelined_batches_reach_each_recipient_in_send_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            bob, _ = await h.user("bob")
            carol, _ = await h.user("carol")
            frames = [[env("bob" if (f * 7 + i) % 3 else "carol", b"%d.%d" % (f, i))
                       for i in range(1 + f % MAX_BATCH_ENVELOPES)] for f in range(40)]
            replies = await asyncio.gather(*[batch(alice, envelopes) for envelopes in frames])
            assert all(isinstance(r, AcceptedMany) and set(r.status) == {"accepted"} for r in replies)
            sent = [e for envelopes in frames for e in envelopes]
            to_bob = [e.body for e in sent if e.to == "bob"]
            to_carol = [e.body for e in sent if e.to == "carol"]
            assert [m.body for m in await bob.receive_messages(len(to_bob))] == to_bob
            assert [m.body for m in await carol.receive_messages(len(to_carol))] == to_carol
    run(scenario())


def test_the_connection_bucket_is_charged_per_envelope_and_a_refused_frame_stores_nothing(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, rate_per_second=0.01, rate_burst=40) as h:
            alice, _ = await h.user("alice")  # spends 1 token (register)
            bob, bob_id = await h.user("bob")
            await bob.close()
            full = [env("bob", b"a%d" % i) for i in range(MAX_BATCH_ENVELOPES)]
            assert isinstance(await batch(alice, full), AcceptedMany)  # 16 more: 17 spent
            assert isinstance(await batch(alice, full[:MAX_BATCH_ENVELOPES]), AcceptedMany)  # 33
            refused = await batch(alice, [env("bob", b"b%d" % i) for i in range(MAX_BATCH_ENVELOPES)])
            assert isinstance(refused, Error) and refused.code == "rate_limited"  # 49 > 40: per envelope
            bob = await h.connect()
            assert isinstance(await bob.auth(bob_id, "bob"), Ok)
            got = await bob.receive_messages(MAX_BATCH_ENVELOPES)
            assert [m.body for m in got] == [e.body for e in full]
            assert await no_more_messages(bob)  # none of the refused frame's envelopes
    run(scenario())


def test_a_frame_with_a_bad_envelope_is_refused_whole_with_a_clear_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_body=1000) as h:
            alice, _ = await h.user("alice")
            bob, bob_id = await h.user("bob")
            await bob.close()
            cases = [([env("bob", b"ok"), env("bob", b"x", kind="pake")], "bad_frame", "pake"),
                     ([env("bob", b"ok"), env("Bob Smith", b"x")], "invalid_username", ""),
                     ([env("bob", b"ok"), env("bob", bytes(1001))], "too_large", "1001 bytes")]
            for envelopes, code, text in cases:
                reply = await batch(alice, envelopes)
                assert isinstance(reply, Error) and reply.code == code, reply
                assert text in reply.message
            bob = await h.connect()
            assert isinstance(await bob.auth(bob_id, "bob"), Ok)
            assert await no_more_messages(bob)
    run(scenario())
