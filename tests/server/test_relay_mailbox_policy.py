"""No user can fill another's mailbox or the disk (issue 9): per-(sender, recipient) caps below the
recipient's total, per-account byte quotas, a disk budget, blocks, and send_many's per-recipient
statuses. Against a real relay over real TLS with a real SQLite file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from relay_harness import harness, run

from cipherpost.protocol.frames import Accepted, Block, Deliver, Error, Ok, Results, SendMany
from cipherpost.server.limits import MemoryLimiter


def test_a_stranger_cannot_fill_a_mailbox_and_contacts_still_get_through(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_queue=50, max_queue_per_sender=10) as h:
            stranger, _ = await h.user("stranger")
            friend, _ = await h.user("friend")
            await h.user("victim")
            replies = await asyncio.gather(*[stranger.send("victim", b"spam %d" % i) for i in range(60)])
            accepted = [r for r in replies if isinstance(r, Accepted)]
            refused = [r for r in replies if isinstance(r, Error)]
            assert len(accepted) == 10 and len(refused) == 50
            assert {r.code for r in refused} == {"sender_cap"}
            assert "your share of the mailbox" in refused[0].message
            assert isinstance(await friend.send("victim", b"hello, it's me"), Accepted)
    run(scenario())


def test_the_byte_quota_of_an_account_is_enforced_and_frees_up_on_ack(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_stored_bytes=10_000, max_body=4000) as h:
            alice, _ = await h.user("alice")
            body = os.urandom(4000)
            assert isinstance(await alice.send("bob-offline", body), Error)  # nobody: unknown_user
            bob, bob_id = await h.user("bob-offline")
            await bob.close()
            first = [await alice.send("bob-offline", body) for _ in range(3)]
            assert [type(r) for r in first] == [Accepted, Accepted, Error]
            assert isinstance(first[2], Error) and first[2].code == "quota_exceeded"
            assert "storage quota" in first[2].message
            bob = await h.connect()
            assert isinstance(await bob.auth(bob_id, "bob-offline"), Ok)
            got = await bob.receive_messages(2)
            await bob.ack([m.seq for m in got])
            await asyncio.sleep(0.2)
            assert isinstance(await alice.send("bob-offline", body), Accepted)  # room again
    run(scenario())


def test_the_disk_budget_refuses_with_a_clear_error_and_loses_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, disk_budget_bytes=10_000, max_body=4000) as h:
            alice, _ = await h.user("alice")
            for name in ("bob", "carol", "dave"):
                await (await h.user(name))[0].close()
            body = os.urandom(4000)
            replies = [await alice.send(name, body) for name in ("bob", "carol", "dave")]
            assert [type(r) for r in replies] == [Accepted, Accepted, Error]
            assert isinstance(replies[2], Error) and replies[2].code == "quota_exceeded"
            assert "disk budget" in replies[2].message
            assert len(await h.server.store.pending("bob", 0, 10)) == 1  # what was accepted is kept
            assert len(await h.server.store.pending("dave", 0, 10)) == 0
    run(scenario())


def test_a_blocked_senders_messages_read_accepted_and_are_not_stored(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            mallory, _ = await h.user("mallory")
            bob, _ = await h.user("bob")
            assert "block" in bob.hello.caps
            assert isinstance(await bob.request(Block(rid=bob.rid(), username="mallory", on=True)), Ok)
            replies = [await mallory.send("bob", b"you cannot hide") for _ in range(3)]
            assert all(isinstance(r, Accepted) for r in replies)  # the sender cannot tell
            await asyncio.sleep(0.3)
            assert bob.pushes.empty()
            assert await h.server.store.pending("bob", 0, 10) == []
            unknown = await bob.request(Block(rid=bob.rid(), username="nobody", on=True))
            assert isinstance(unknown, Error) and unknown.code == "unknown_user"
            assert isinstance(await bob.request(Block(rid=bob.rid(), username="mallory", on=False)), Ok)
            assert isinstance(await mallory.send("bob", b"unblocked"), Accepted)
            frame = await bob.next_push(5)
            assert isinstance(frame, Deliver) and [m.body for m in frame.messages] == [b"unblocked"]
    run(scenario())


def test_send_many_stores_once_and_answers_a_status_per_recipient(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_queue=20, max_queue_per_sender=1, fanout_deliveries_per_hour=8) as h:
            alice, _ = await h.user("alice")
            bob, _ = await h.user("bob")
            carol, _ = await h.user("carol")
            assert "send_many" in alice.hello.caps
            msg_id = os.urandom(16)
            frame = SendMany(rid=alice.rid(), id=msg_id, kind="msg", body=b"to the group",
                             to=["bob", "carol", "nobody"])
            reply = await alice.request(frame)
            assert isinstance(reply, Results) and reply.id == msg_id
            assert reply.status == ["accepted", "accepted", "unknown_user"]
            for client in (bob, carol):
                got = await client.receive_messages(1)
                assert [(m.sender, m.body) for m in got] == [("alice", b"to the group")]
            retry = await alice.request(SendMany(rid=alice.rid(), id=msg_id, kind="msg", body=b"to the group",
                                                 to=["bob", "carol"]))
            assert isinstance(retry, Results) and retry.status == ["duplicate", "duplicate"]
            capped = await alice.request(SendMany(rid=alice.rid(), id=os.urandom(16), kind="msg", body=b"2",
                                                  to=["bob"]))  # bob has not acked: alice's share is 1
            assert isinstance(capped, Results) and capped.status == ["sender_cap"]
            # deliveries, not frames, are counted: 3 + 2 + 1 spent of 8; 3 more do not fit
            over = await alice.request(SendMany(rid=alice.rid(), id=os.urandom(16), kind="msg", body=b"3",
                                                to=["bob", "carol", "alice"]))
            assert isinstance(over, Error) and over.code == "rate_limited" and "8 per hour" in over.message
            twice = await alice.request(SendMany(rid=alice.rid(), id=os.urandom(16), kind="msg", body=b"x",
                                                 to=["bob", "bob"]))
            assert isinstance(twice, Error) and twice.code == "bad_frame"
    run(scenario())


def test_send_many_caps_new_recipients_per_hour_and_remembers_only_real_ones(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, new_recipients_per_hour=3) as h:
            alice, _ = await h.user("alice")
            for name in ("bob", "carol", "dave", "erin"):
                await h.user(name)

            async def send_many(*to: str) -> Results | Error:
                frame = SendMany(rid=alice.rid(), id=os.urandom(16), kind="msg", body=b"hi", to=list(to))
                reply = await alice.request(frame)
                assert isinstance(reply, Results | Error)
                return reply

            assert isinstance(await send_many("bob", "carol"), Results)   # 2 new
            assert isinstance(await send_many("bob", "carol"), Results)   # written to this hour: 0 new
            over = await send_many("dave", "erin")                         # 2 more new: over 3
            assert isinstance(over, Error) and over.code == "rate_limited"
            assert "new recipients" in over.message
            ghost = await send_many("nobody-at-all")                       # the 3rd new one
            assert isinstance(ghost, Results) and ghost.status == ["unknown_user"]
            pairs = h.server.limiters.recipient_pairs
            assert isinstance(pairs, MemoryLimiter)
            assert "alice|bob" in pairs and "alice|nobody-at-all" not in pairs  # none for made-up names
            assert isinstance(await send_many("bob"), Results)              # not new: still allowed
            refused = await send_many("dave")
            assert isinstance(refused, Error) and refused.code == "rate_limited"
    run(scenario())
