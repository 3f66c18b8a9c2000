"""The RelayStore contract (store/base.py, docs/contracts.md section 1), run against every backend.

Each test gets ``make_store``, a factory: calling it again opens the same store (restarts). SQLite
group-commit specifics stay in test_relay_store.py; migrations in test_store_migrations.py.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pg_support import NEEDS_POSTGRES, PG_URL, drop_schema, fresh_name
from relay_harness import run

from cipherpost.store.base import (
    MAX_BLOCKS,
    MAX_FANOUT,
    AccountDeleted,
    AccountState,
    AccountSuspended,
    BlockListFull,
    Delivery,
    EnqueueResult,
    InvalidDelivery,
    InvalidName,
    MailboxFull,
    MailboxPolicy,
    NameConfusable,
    NameReserved,
    NewMessage,
    NoPrekeys,
    PoolCounts,
    PrekeyPoolFull,
    QuotaExceeded,
    RecipientResult,
    RecipientStatus,
    RelayStore,
    SenderCapReached,
    StoreError,
    UnknownAccount,
    UsernameTaken,
)
from cipherpost.store.migrations import DEFAULT_RESERVED
from cipherpost.store.sqlite import SqliteRelayStore

S = RecipientStatus
HOUR_MS = 3_600_000
NOW_MS = 1_800_000_000_000


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=NEEDS_POSTGRES)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], RelayStore]]:
    if request.param == "sqlite":
        yield lambda: SqliteRelayStore(tmp_path / "r.db")  # a factory: tests reopen it
        return
    from cipherpost.store.postgres import PostgresRelayStore

    schema = fresh_name("cpt")  # one schema per test, dropped afterwards (tests/server/pg_support.py)
    yield lambda: PostgresRelayStore(PG_URL, schema=schema)
    asyncio.run(drop_schema(schema))


@asynccontextmanager
async def opened(make_store: Callable[[], RelayStore]) -> AsyncIterator[RelayStore]:
    store = make_store()
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def msg(to: str, i: int, sender: str = "alice", body: bytes | None = None) -> NewMessage:
    return NewMessage(sender=sender, recipient=to, msg_id=i.to_bytes(16, "big"), kind="msg",
                      body=body if body is not None else f"body {sender} {i}".encode(), ts=NOW_MS + i)


def fan(to: list[str], i: int, sender: str = "alice", body: bytes | None = None) -> Delivery:
    return Delivery(sender=sender, msg_id=i.to_bytes(16, "big"), kind="msg",
                    body=body if body is not None else f"fan {sender} {i}".encode(), ts=NOW_MS + i,
                    recipients=to)


def statuses(results: list[RecipientResult]) -> list[RecipientStatus]:
    return [r.status for r in results]


async def accounts(store: RelayStore, *names: str) -> None:
    for i, name in enumerate(names):
        await store.create_account(name, f"identity of {name}".encode(), NOW_MS + i)


async def bodies(store: RelayStore, name: str) -> list[bytes]:
    return [m.body for m in await store.pending(name, 0, 1000)]


POLICY = MailboxPolicy()


# --- durability, idempotency, order ----------------------------------------------------------

def test_accepted_message_and_accounts_survive_restart(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "alice", "bob")
            first = await store.enqueue(msg("bob", 1, body=b"\x00secret\xff" * 10), POLICY)
            results = await store.enqueue_many(fan(["alice", "bob"], 2, sender="carol"), POLICY)
        async with opened(make_store) as store:
            queued = await store.pending("bob", 0, 10)
            assert [(m.seq, m.sender, m.body) for m in queued] == [
                (first.seq, "alice", b"\x00secret\xff" * 10), (results[1].seq, "carol", b"fan carol 2")]
            assert await store.get_identity("bob") == b"identity of bob"
            assert await bodies(store, "alice") == [b"fan carol 2"]
    run(scenario())


def test_sequence_numbers_never_repeat_across_restarts(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob")
            first = await store.enqueue(msg("bob", 1), 10)
            assert await store.ack("bob", [first.seq]) == 1  # the highest seq is gone
        async with opened(make_store) as store:
            second = await store.enqueue(msg("bob", 2), 10)
            assert second.seq > first.seq
            again = await store.enqueue(msg("bob", 1), 10)  # dedup survives ack and restart
            assert again.duplicate and again.seq == first.seq
            assert await store.ack("bob", [second.seq]) == 1
            await store.prune(now_ms=10**15, dedup_window_ms=0)  # every remembered id is forgotten
        async with opened(make_store) as store:
            third = await store.enqueue(msg("bob", 3), 10)
            assert third.seq > second.seq
    run(scenario())


def test_concurrent_take_bundle_is_atomic_at_store_level(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob")
            await store.put_prekeys("bob", signed_prekey=b"spk",
                                    one_time=[(i, os.urandom(32)) for i in range(50)],
                                    kem_one_time=[(i, os.urandom(40)) for i in range(30)],
                                    kem_last_resort=b"lr", max_pool=100)
            bundles = await asyncio.gather(*[store.take_bundle("bob") for _ in range(60)])
        one_time = [b.one_time_prekey for b in bundles if b.one_time_prekey]
        assert len(one_time) == len(set(one_time)) == 50
        kem = [b.kem_prekey for b in bundles if b.kem_prekey != b"lr"]
        assert len(kem) == len(set(kem)) == 30
        assert bundles[-1].remaining.one_time == 0
    run(scenario())


def test_retried_send_is_duplicate_with_its_first_seq_and_stored_once(
        make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob")
            results = await asyncio.gather(*[store.enqueue(msg("bob", 7), POLICY) for _ in range(5)])
            assert [r.duplicate for r in results] == [False, True, True, True, True]
            assert {r.seq for r in results} == {results[0].seq}
            # the same id from another sender is another message
            other = await store.enqueue(msg("bob", 7, sender="carol"), POLICY)
            assert not other.duplicate and other.seq > results[0].seq
            assert len(await store.pending("bob", 0, 10)) == 2
    run(scenario())


def test_each_recipient_sees_its_messages_in_send_order(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            names = ["bob", "carol", "dave"]
            await accounts(store, *names)
            sends: list[Awaitable[object]] = []
            for i in range(90):  # one burst: they share group commits
                if i % 10 == 0:
                    sends.append(store.enqueue_many(fan(names, 1000 + i), POLICY))
                else:
                    sends.append(store.enqueue(msg(names[i % 3], i), POLICY))
            await asyncio.gather(*sends)
            for name in names:
                queued = await store.pending(name, 0, 1000)
                seqs = [m.seq for m in queued]
                assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
                ids = [int.from_bytes(m.msg_id, "big") for m in queued]
                assert ids == sorted(ids)  # send order
                # paging after a seq returns exactly the rest
                assert [m.seq for m in await store.pending(name, seqs[4], 1000)] == seqs[5:]
    run(scenario())


def test_ack_touches_only_the_given_recipient(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob", "carol")
            await store.enqueue(msg("bob", 0), POLICY)
            to_bob = await store.enqueue(msg("bob", 1), POLICY)
            # seqs may be global (SQLite) or per recipient (PostgreSQL): carol's one message has
            # neither bob's second seq
            await store.enqueue(msg("carol", 2), POLICY)
            assert await store.ack("carol", [to_bob.seq]) == 0
            assert len(await store.pending("bob", 0, 10)) == 2
            assert await store.ack("bob", [to_bob.seq, to_bob.seq, 10**9]) == 1
    run(scenario())


# --- multi-recipient enqueue (contracts 1.1) -----------------------------------------------------

def test_fan_out_reports_a_status_per_recipient_in_order(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob", "carol", "dave")
            await store.set_state("dave", AccountState.SUSPENDED, "operator", "spam")
            results = await store.enqueue_many(fan(["carol", "nobody", "dave", "bob"], 1), POLICY)
            assert [r.recipient for r in results] == ["carol", "nobody", "dave", "bob"]
            assert statuses(results) == [S.ACCEPTED, S.UNKNOWN_USER, S.SUSPENDED, S.ACCEPTED]
            assert results[0].seq is not None and results[3].seq is not None
            assert results[1].seq is None and results[2].seq is None
            assert await bodies(store, "bob") == await bodies(store, "carol") == [b"fan alice 1"]
            # the body outlives the first ack and goes with the last
            assert await store.ack("bob", [results[3].seq]) == 1
            assert await bodies(store, "carol") == [b"fan alice 1"]
            assert await store.ack("carol", [results[0].seq]) == 1
            assert await bodies(store, "carol") == []
    run(scenario())


def test_fan_out_retry_is_duplicate_for_accepted_and_stores_the_refused(
        make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob", "carol")
            small = MailboxPolicy(max_queue=1, max_queue_per_sender=1)
            filler = await store.enqueue(msg("carol", 1, sender="dave"), small)
            first = await store.enqueue_many(fan(["bob", "carol"], 9), small)
            assert statuses(first) == [S.ACCEPTED, S.MAILBOX_FULL]
            assert await store.ack("carol", [filler.seq]) == 1
            again = await store.enqueue_many(fan(["bob", "carol"], 9), small)
            assert statuses(again) == [S.DUPLICATE, S.ACCEPTED]
            assert again[0].seq == first[0].seq
            third = await store.enqueue_many(fan(["carol", "bob"], 9), small)
            assert statuses(third) == [S.DUPLICATE, S.DUPLICATE]
            assert [r.seq for r in third] == [again[1].seq, first[0].seq]
            assert await bodies(store, "bob") == await bodies(store, "carol") == [b"fan alice 9"]
        async with opened(make_store) as store:  # remembered across a restart
            assert statuses(await store.enqueue_many(fan(["bob", "carol"], 9), small)) == [S.DUPLICATE] * 2
    run(scenario())


def test_malformed_recipient_lists_are_refused(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob")
            for recipients in ([], ["bob", "bob"], [f"u{i:05d}" for i in range(MAX_FANOUT + 1)]):
                with pytest.raises(InvalidDelivery):
                    await store.enqueue_many(fan(recipients, 1), POLICY)
            assert await store.pending("bob", 0, 10) == []
            assert len(await store.enqueue_many(fan([f"u{i:05d}" for i in range(MAX_FANOUT)], 2), POLICY)) \
                == MAX_FANOUT
    run(scenario())


# --- caps, quotas and blocks (contracts 1.2) ---------------------------------------------------

def test_a_stranger_cannot_fill_a_mailbox_that_friends_still_reach(
        make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        policy = MailboxPolicy(max_queue=5, max_queue_per_sender=2)
        async with opened(make_store) as store:
            await accounts(store, "bob", "mallory", "alice", "carol")
            spam = [await store.enqueue_many(fan(["bob"], i, sender="mallory"), policy) for i in range(3)]
            assert [r[0].status for r in spam] == [S.ACCEPTED, S.ACCEPTED, S.SENDER_CAP]
            with pytest.raises(SenderCapReached):
                await store.enqueue(msg("bob", 3, sender="mallory"), policy)
            assert not (await store.enqueue(msg("bob", 1, sender="alice"), policy)).duplicate
        async with opened(make_store) as store:  # the counters are rebuilt after a restart
            with pytest.raises(SenderCapReached):
                await store.enqueue(msg("bob", 4, sender="mallory"), policy)
            assert not (await store.enqueue(msg("bob", 2, sender="alice"), policy)).duplicate
            assert not (await store.enqueue(msg("bob", 1, sender="carol"), policy)).duplicate
            with pytest.raises(MailboxFull) as full:  # 5 queued: the total cap
                await store.enqueue(msg("bob", 2, sender="carol"), policy)
            assert type(full.value) is MailboxFull
            refused = await store.enqueue_many(fan(["bob"], 3, sender="carol"), policy)
            assert statuses(refused) == [S.MAILBOX_FULL]
            first = spam[0][0].seq
            assert first is not None and await store.ack("bob", [first]) == 1
            assert not (await store.enqueue(msg("bob", 5, sender="mallory"), policy)).duplicate
    run(scenario())


def test_byte_quota_counts_stored_mail_and_frees_on_ack(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        policy = MailboxPolicy(max_stored_bytes=250)
        async with opened(make_store) as store:
            await accounts(store, "bob", "carol")
            a = await store.enqueue(msg("bob", 1, body=bytes(100)), policy)
            await store.enqueue_many(fan(["bob", "carol"], 2, body=bytes(100)), policy)  # 100 each
            with pytest.raises(QuotaExceeded):
                await store.enqueue(msg("bob", 3, body=bytes(51)), policy)
            assert not (await store.enqueue(msg("bob", 4, body=bytes(50)), policy)).duplicate  # exactly 250
            assert not (await store.enqueue(msg("carol", 5, body=bytes(150)), policy)).duplicate
        async with opened(make_store) as store:
            results = await store.enqueue_many(fan(["bob", "carol"], 6, body=b"x"), policy)
            assert statuses(results) == [S.QUOTA_EXCEEDED, S.QUOTA_EXCEEDED]
            assert await store.ack("bob", [a.seq]) == 1
            results = await store.enqueue_many(fan(["bob", "carol"], 6, body=b"x"), policy)
            assert statuses(results) == [S.ACCEPTED, S.QUOTA_EXCEEDED]
    run(scenario())


def test_disk_budget_counts_a_fan_out_body_once(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        policy = MailboxPolicy(disk_budget_bytes=300)
        async with opened(make_store) as store:
            await accounts(store, "bob", "carol", "dave")
            first = await store.enqueue_many(fan(["bob", "carol", "dave"], 1, body=bytes(150)), policy)
            assert statuses(first) == [S.ACCEPTED] * 3  # 150 bytes on disk, not 450
            assert not (await store.enqueue(msg("bob", 2, body=bytes(150)), policy)).duplicate
            refused = await store.enqueue_many(fan(["bob", "carol"], 3, body=b"y"), policy)
            assert statuses(refused) == [S.QUOTA_EXCEEDED] * 2
            with pytest.raises(QuotaExceeded):
                await store.enqueue(msg("dave", 4, body=b"z"), policy)
        async with opened(make_store) as store:
            for result in first[:2]:  # the shared body stays until its last reference goes
                assert result.seq is not None and await store.ack(result.recipient, [result.seq]) == 1
            with pytest.raises(QuotaExceeded):
                await store.enqueue(msg("dave", 4, body=b"z"), policy)
            assert first[2].seq is not None and await store.ack("dave", [first[2].seq]) == 1
            assert not (await store.enqueue(msg("dave", 4, body=b"z"), policy)).duplicate
    run(scenario())


def test_single_enqueue_keeps_working_with_an_int_and_raises_typed_errors(
        make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob", "carol")
            await store.set_state("carol", AccountState.SUSPENDED, "operator", "")
            for i in range(3):  # an int is the first slice's max_queue, with no per-sender share
                assert not (await store.enqueue(msg("bob", i), 3)).duplicate
            with pytest.raises(MailboxFull):
                await store.enqueue(msg("bob", 3), 3)
            with pytest.raises(AccountSuspended) as suspended:
                await store.enqueue(msg("carol", 4), 3)
            assert isinstance(suspended.value, UnknownAccount)  # older handlers refuse it too
            assert issubclass(SenderCapReached, MailboxFull) and issubclass(QuotaExceeded, MailboxFull)
            with pytest.raises(UnknownAccount):
                await store.enqueue(msg("nobody", 5), 3)
            done: asyncio.Future[tuple[EnqueueResult | None, StoreError | None]] = \
                asyncio.get_running_loop().create_future()
            store.enqueue_then(msg("bob", 1), 3, lambda result, error: done.set_result((result, error)))
            result, error = await done
            assert error is None and result is not None and result.duplicate
    run(scenario())


def test_blocked_sender_reads_accepted_and_nothing_is_stored(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob", "carol", "mallory")
            await store.set_block("bob", "mallory", True)
            await store.set_block("bob", "mallory", True)  # idempotent
            assert await store.blocked("bob") == ["mallory"]
            dropped = await store.enqueue(msg("bob", 1, sender="mallory"), POLICY)
            assert dropped.dropped and not dropped.duplicate
            retry = await store.enqueue(msg("bob", 1, sender="mallory"), POLICY)
            assert retry.duplicate  # exactly as for a stored message
            results = await store.enqueue_many(fan(["bob", "carol"], 2, sender="mallory"), POLICY)
            assert statuses(results) == [S.ACCEPTED, S.ACCEPTED]
            assert results[0].seq is None and results[1].seq is not None
            assert await store.pending("bob", 0, 10) == []
            assert await bodies(store, "carol") == [b"fan mallory 2"]
            # blocked messages do not count against the caps the sender could otherwise probe
            tight = MailboxPolicy(max_queue=1, max_queue_per_sender=1)
            assert not (await store.enqueue(msg("bob", 3, sender="carol"), tight)).duplicate
        async with opened(make_store) as store:
            assert (await store.enqueue(msg("bob", 4, sender="mallory"), POLICY)).dropped
            await store.set_block("bob", "mallory", False)
            assert await store.blocked("bob") == []
            later = await store.enqueue(msg("bob", 5, sender="mallory"), POLICY)
            assert not later.dropped
            assert [m.sender for m in await store.pending("bob", 0, 10)] == ["carol", "mallory"]
            with pytest.raises(UnknownAccount):
                await store.set_block("bob", "nobody", True)
            with pytest.raises(UnknownAccount):
                await store.set_block("nobody", "bob", True)
    run(scenario())


def test_block_list_is_bounded(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            names = [f"user{i:05d}" for i in range(MAX_BLOCKS + 1)]
            await asyncio.gather(*[store.create_account(name, b"id", NOW_MS) for name in ["bob", *names]])
            await asyncio.gather(*[store.set_block("bob", name, True) for name in names[:MAX_BLOCKS]])
            with pytest.raises(BlockListFull):
                await store.set_block("bob", names[-1], True)
            await store.set_block("bob", names[0], True)  # already blocked: no new row, no error
            await store.set_block("bob", names[0], False)
            await store.set_block("bob", names[-1], True)
            assert len(await store.blocked("bob")) == MAX_BLOCKS
    run(scenario(), timeout=120)


# --- account states and lifecycle (contracts 1.4) ----------------------------------------------

def test_suspended_account_neither_logs_in_nor_receives_and_keeps_its_mail(
        make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "alice", "bob")
            await store.put_prekeys("bob", signed_prekey=b"spk", one_time=[], kem_one_time=[],
                                    kem_last_resort=b"lr", max_pool=10)
            kept = await store.enqueue(msg("bob", 1), POLICY)
            await store.set_state("bob", AccountState.SUSPENDED, "op-ann", "abuse report 17")
            info = await store.get_account("bob")
            assert info is not None and info.state is AccountState.SUSPENDED
            assert (info.state_by, info.state_reason) == ("op-ann", "abuse report 17")
            assert await store.get_identity("bob") is None
            with pytest.raises(UnknownAccount):
                await store.take_bundle("bob")
            assert statuses(await store.enqueue_many(fan(["bob", "alice"], 2), POLICY)) == \
                [S.SUSPENDED, S.ACCEPTED]
            with pytest.raises(ValueError, match="delete_account"):
                await store.set_state("bob", AccountState.DELETED, "op", "")
        async with opened(make_store) as store:
            assert (await store.get_account("bob")).state is AccountState.SUSPENDED  # type: ignore[union-attr]
            await store.set_state("bob", AccountState.ACTIVE, "op-ann", "appeal")
            assert await store.get_identity("bob") == b"identity of bob"
            assert [m.seq for m in await store.pending("bob", 0, 10)] == [kept.seq]
            assert not (await store.enqueue(msg("bob", 3), POLICY)).duplicate
            assert (await store.take_bundle("bob")).kem_prekey == b"lr"
            with pytest.raises(UnknownAccount):
                await store.set_state("nobody", AccountState.SUSPENDED, "op", "")
    run(scenario())


def test_deleted_account_loses_everything_but_reserves_its_name(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "alice", "bob", "carol")
            await store.put_prekeys("bob", signed_prekey=b"spk", one_time=[(1, b"otk")],
                                    kem_one_time=[(1, b"k")],
                                    kem_last_resort=b"lr", max_pool=10)
            await store.set_recovery_public("bob", b"recovery")
            await store.enqueue(msg("bob", 1), POLICY)
            shared = await store.enqueue_many(fan(["bob", "carol"], 2), POLICY)
            await store.set_block("bob", "alice", True)
            await store.set_block("carol", "bob", True)
            await store.delete_account("bob", "op-ann", "user request")
            await store.delete_account("bob", "op-ann", "again")  # idempotent
            info = await store.get_account("bob")
            assert info is not None and info.state is AccountState.DELETED
            assert info.identity == b"" and info.recovery_public is None
            assert info.state_reason == "user request"
            assert await store.get_identity("bob") is None
            assert await store.pending("bob", 0, 10) == []
            assert (await store.prekey_counts("bob")).one_time == 0
            assert await store.blocked("bob") == [] and await store.blocked("carol") == []
            assert await bodies(store, "carol") == [b"fan alice 2"]  # the shared body is still carol's
            assert shared[1].seq is not None and await store.ack("carol", [shared[1].seq]) == 1
            assert statuses(await store.enqueue_many(fan(["bob"], 3), POLICY)) == [S.SUSPENDED]
        async with opened(make_store) as store:
            with pytest.raises(NameReserved):
                await store.create_account("bob", b"new", NOW_MS)
            with pytest.raises(NameReserved):
                await store.create_account("b0b", b"new", NOW_MS)  # a look-alike of the deleted name
            with pytest.raises(AccountDeleted):
                await store.set_state("bob", AccountState.ACTIVE, "op", "")
            with pytest.raises(AccountDeleted):
                await store.rebind_identity("bob", b"new", None)
            with pytest.raises(UnknownAccount):
                await store.delete_account("nobody", "op", "")
            assert (await store.stats()).accounts == 2
            assert [a.username for a in await store.list_accounts()] == ["alice", "bob", "carol"]
    run(scenario())


def test_reserved_and_look_alike_names_cannot_register(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob", "william")
            with pytest.raises(NameConfusable) as confusable:
                await store.create_account("b0b", b"id", NOW_MS)
            assert confusable.value.similar_to == "bob" and isinstance(confusable.value, UsernameTaken)
            for lookalike in ("bob_", "vvilliam", "wi1liam"):
                with pytest.raises(NameConfusable):
                    await store.create_account(lookalike, b"id", NOW_MS)
            with pytest.raises(UsernameTaken):
                await store.create_account("bob", b"id", NOW_MS)
            await store.unreserve(list(DEFAULT_RESERVED))  # the defaults a migration seeds
            await store.reserve(["admin", "security"])
            await store.reserve(["admin"])  # idempotent
            assert await store.reserved() == ["admin", "security"]
            for name in ("admin", "adm1n", "security."):
                with pytest.raises(NameReserved):
                    await store.create_account(name, b"id", NOW_MS)
            with pytest.raises(InvalidName):
                await store.reserve(["Not A Name"])
            with pytest.raises(InvalidName):
                await store.create_account("x", b"id", NOW_MS)
        async with opened(make_store) as store:
            assert await store.reserved() == ["admin", "security"]
            await store.unreserve(["admin"])
            await store.create_account("adm1n", b"id", NOW_MS)
            with pytest.raises(NameConfusable):
                await store.create_account("admin", b"id", NOW_MS)
            assert await store.get_identity("adm1n") == b"id"
    run(scenario())


def test_recovery_rebinds_the_name_drops_prekeys_and_keeps_mail(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await store.create_account("bob", b"old identity", NOW_MS, recovery_public=b"rec-1")
            info = await store.get_account("bob")
            assert info is not None and info.recovery_public == b"rec-1" and info.state is AccountState.ACTIVE
            await store.set_recovery_public("bob", b"rec-2")
            await store.put_prekeys("bob", signed_prekey=b"spk", one_time=[(1, b"otk")], kem_one_time=[],
                                    kem_last_resort=b"lr", max_pool=10)
            queued = await store.enqueue(msg("bob", 1), POLICY)
            assert await store.bump_login("bob", 9)
            await store.rebind_identity("bob", b"new identity", b"rec-3")
        async with opened(make_store) as store:
            info = await store.get_account("bob")
            assert info is not None
            assert (info.identity, info.recovery_public, info.login_counter) == (b"new identity", b"rec-3", 0)
            assert await store.get_identity("bob") == b"new identity"
            with pytest.raises(NoPrekeys):
                await store.take_bundle("bob")
            assert (await store.prekey_counts("bob")).one_time == 0
            assert [m.seq for m in await store.pending("bob", 0, 10)] == [queued.seq]
            assert await store.bump_login("bob", 1)
            with pytest.raises(UnknownAccount):
                await store.rebind_identity("nobody", b"x", None)
            with pytest.raises(UnknownAccount):
                await store.set_recovery_public("nobody", b"x")
    run(scenario())


def test_login_counter_only_moves_forward(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob")
            assert (await store.get_account("bob")).login_counter == 0  # type: ignore[union-attr]
            assert await store.bump_login("bob", 5)
            assert not await store.bump_login("bob", 4)  # an old copy of the profile
            assert await store.bump_login("bob", 5)  # the same copy again
        async with opened(make_store) as store:
            assert not await store.bump_login("bob", 3)
            assert await store.bump_login("bob", 6)
            assert (await store.get_account("bob")).login_counter == 6  # type: ignore[union-attr]
            with pytest.raises(UnknownAccount):
                await store.bump_login("nobody", 1)
    run(scenario())


# --- counters and the epoch (contracts 1.5) ----------------------------------------------------

def test_usage_counts_deliveries_and_bytes_per_sender(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "alice", "bob", "carol", "mallory")
            await store.set_block("carol", "mallory", True)
            for i in range(3):
                await store.enqueue(msg("bob", i, body=bytes(100)), POLICY)
            await store.enqueue(msg("bob", 0, body=bytes(100)), POLICY)  # a duplicate counts nothing
            fanned = await store.enqueue_many(fan(["bob", "carol"], 9, sender="mallory", body=bytes(10)),
                                              POLICY)
            with pytest.raises(UnknownAccount):
                await store.enqueue(msg("nobody", 5, sender="carol"), POLICY)
            assert fanned[0].seq is not None and await store.ack("bob", [fanned[0].seq]) == 1
            rows = await store.usage(NOW_MS - HOUR_MS)
            assert [(r.sender, r.messages, r.bytes_sent, r.bytes_stored) for r in rows] == [
                ("alice", 3, 300, 300), ("mallory", 2, 20, 0)]
        async with opened(make_store) as store:  # written to disk
            rows = await store.usage(NOW_MS - HOUR_MS)
            assert [(r.sender, r.messages, r.bytes_stored) for r in rows] == [
                ("alice", 3, 300), ("mallory", 2, 0)]
            later = await store.usage(NOW_MS + 2 * HOUR_MS)  # only what is stored now
            assert [(r.sender, r.messages, r.bytes_sent, r.bytes_stored) for r in later] == [
                ("alice", 0, 0, 300)]
    run(scenario())


def test_epoch_is_random_stable_and_renewable(make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            first = await store.epoch()
            assert len(first) == 16 and first != bytes(16)
        async with opened(make_store) as store:
            assert await store.epoch() == first
            renewed = await store.renew_epoch()
            assert renewed != first and await store.epoch() == renewed
        async with opened(make_store) as store:
            assert await store.epoch() == renewed
    run(scenario())


# --- blobs: metadata and the shared quota ledger (migration 3, docs/attachments.md) -------------

def test_blob_metadata_shares_the_quota_ledger_with_mail_across_restarts(
        make_store: Callable[[], RelayStore]) -> None:
    from cipherpost.store.base import BlobConflict, BlobNotFound

    async def scenario() -> None:
        policy = MailboxPolicy(max_stored_bytes=1000)
        blob, other = bytes(16), b"\x01" * 16
        async with opened(make_store) as store:
            await accounts(store, "alice", "bob", "carol")
            info = await store.blob_reserve("alice", blob, 600, 100, NOW_MS, policy)
            assert (info.owner, info.size, info.committed, info.readers) == ("alice", 600, False, ())
            assert await store.blob_reserve("alice", blob, 600, 100, NOW_MS, policy) == info  # resume
            with pytest.raises(BlobConflict):
                await store.blob_reserve("alice", blob, 601, 100, NOW_MS, policy)
            with pytest.raises(BlobNotFound):                      # someone else's id
                await store.blob_reserve("bob", blob, 600, 100, NOW_MS, policy)
            with pytest.raises(QuotaExceeded):
                await store.blob_reserve("alice", other, 401, 100, NOW_MS, policy)
        async with opened(make_store) as store:                    # the charge survives a restart
            with pytest.raises(QuotaExceeded):                     # mail to alice: the same ledger
                await store.enqueue(msg("alice", 1, sender="bob", body=bytes(401)), policy)
            await store.enqueue(msg("alice", 2, sender="bob", body=bytes(400)), policy)
            done = await store.blob_commit(blob, "alice", ["bob", "carol", "nobody"])
            assert done.committed and done.readers == ("bob", "carol")
            assert done.may_read("bob") and not done.may_read("mallory")
            with pytest.raises(BlobNotFound):
                await store.blob_release(blob, "mallory")
            assert not await store.blob_release(blob, "alice")     # committed: the readers decide
            assert not await store.blob_release(blob, "bob")
            assert await store.blob_release(blob, "carol")         # the last reader: deleted
            assert await store.blob_info(blob) is None
            await store.blob_reserve("alice", other, 600, 100, NOW_MS, policy)  # quota returned
            assert await store.blobs_expired(NOW_MS) == []
            assert await store.blobs_expired(NOW_MS + 1) == [other]
            assert await store.blob_info(other) is None
    run(scenario())


# --- any sequence of operations: the store agrees with a model of the rules -------------------

class SendOp(NamedTuple):
    sender: int
    targets: list[int]
    msg: int
    size: int
    single: bool  # through enqueue() when there is one target


class AckOp(NamedTuple):
    recipient: int
    position: int  # in the recipient's queue; past its end: a seq that is not queued


class BlockOp(NamedTuple):
    owner: int
    sender: int
    on: bool


class RestartOp(NamedTuple):
    pass


_SEND = st.builds(SendOp, st.integers(0, 1), st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True),
                  st.integers(0, 3), st.sampled_from([60, 100]), st.booleans())
_ACK = st.builds(AckOp, st.integers(0, 1), st.integers(0, 2))
_BLOCK = st.builds(BlockOp, st.integers(0, 1), st.integers(0, 1), st.booleans())
_RESTART = st.builds(RestartOp)
# Few names, ids and sizes, mostly sends and acks, so that caps, duplicates and acks meet often;
# restarts rarely (they reload every counter from the database, which would hide a drifting one).
_OPS: st.SearchStrategy[SendOp | AckOp | BlockOp | RestartOp] = st.integers(0, 19).flatmap(
    lambda k: _SEND if k < 11 else _ACK if k < 17 else _BLOCK if k < 19 else _RESTART)
_EXAMPLES = itertools.count()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_OPS, min_size=5, max_size=30))
# Found on PostgreSQL: a retried single send to a recipient who blocks the sender read as stored.
@example(ops=[AckOp(0, 0), BlockOp(0, 0, True), SendOp(0, [0], 0, 60, False), SendOp(0, [0], 0, 60, False),
              SendOp(0, [0], 0, 60, True)])
def test_any_sequence_of_sends_acks_blocks_and_restarts_matches_the_rules(
        make_store: Callable[[], RelayStore], ops: list[SendOp | AckOp | BlockOp | RestartOp]) -> None:
    """Caps, quotas, blocks, dedup and the running counters behind them, against a plain model.
    (It fails if an ack forgets to release a message's bytes or its sender's share.)"""
    policy = MailboxPolicy(max_queue=4, max_queue_per_sender=2, max_stored_bytes=250)
    n = next(_EXAMPLES)  # one store for every example: names of their own
    senders = [f"x{n}s{i}" for i in range(2)]
    recipients = [f"x{n}r{i}" for i in range(2)]
    queues: dict[str, list[tuple[int, str, bytes]]] = {r: [] for r in recipients}  # seq, sender, body
    accepted: dict[tuple[str, int], dict[str, int | None]] = {}  # (sender, id) -> recipient -> seq
    blocks: set[tuple[str, str]] = set()

    def expect(sender: str, name: str, key: tuple[str, int], size: int) -> RecipientStatus:
        queue = queues[name]
        if name in accepted.get(key, {}):
            return S.DUPLICATE
        if (name, sender) in blocks:
            return S.ACCEPTED
        if len(queue) >= policy.max_queue:
            return S.MAILBOX_FULL
        if sum(1 for _, s, _ in queue if s == sender) >= policy.max_queue_per_sender:
            return S.SENDER_CAP
        if sum(len(b) for _, _, b in queue) + size > policy.max_stored_bytes:
            return S.QUOTA_EXCEEDED
        return S.ACCEPTED

    async def send(store: RelayStore, op: SendOp) -> None:
        sender, names = senders[op.sender], [recipients[t] for t in op.targets]
        key, body = (sender, op.msg), bytes([op.msg]) * op.size
        wanted = [expect(sender, name, key, len(body)) for name in names]
        seqs: list[int | None] = [None]
        if op.single and len(names) == 1:
            try:
                message = NewMessage(sender=sender, recipient=names[0], msg_id=bytes([op.msg]) * 16,
                                     kind="msg", body=body, ts=NOW_MS)
                r = await store.enqueue(message, policy)
                got, seqs = [S.DUPLICATE if r.duplicate else S.ACCEPTED], [None if r.dropped else r.seq]
            except SenderCapReached:
                got = [S.SENDER_CAP]
            except QuotaExceeded:
                got = [S.QUOTA_EXCEEDED]
            except MailboxFull:
                got = [S.MAILBOX_FULL]
        else:
            delivery = Delivery(sender=sender, msg_id=bytes([op.msg]) * 16, kind="msg", body=body, ts=NOW_MS,
                                recipients=names)
            results = await store.enqueue_many(delivery, policy)
            got, seqs = statuses(results), [r.seq for r in results]
        assert got == wanted
        for name, status, seq in zip(names, got, seqs, strict=True):
            if status is S.ACCEPTED:
                assert (seq is None) == ((name, sender) in blocks)
                accepted.setdefault(key, {})[name] = seq
                if seq is not None:
                    queues[name].append((seq, sender, body))
            elif status is S.DUPLICATE and seq is not None:
                assert seq == accepted[key][name]

    async def scenario() -> None:
        store = make_store()
        await store.open()
        try:
            await accounts(store, *senders, *recipients)
            for op in ops:
                if isinstance(op, SendOp):
                    await send(store, op)
                elif isinstance(op, AckOp):
                    name = recipients[op.recipient]
                    queue = queues[name]
                    seq = queue[op.position][0] if op.position < len(queue) else 10**9
                    assert await store.ack(name, [seq]) == (1 if op.position < len(queue) else 0)
                    queues[name] = [m for m in queue if m[0] != seq]
                elif isinstance(op, BlockOp):
                    pair = (recipients[op.owner], senders[op.sender])
                    await store.set_block(*pair, op.on)
                    if op.on:
                        blocks.add(pair)
                    else:
                        blocks.discard(pair)
                else:
                    await store.close()
                    store = make_store()
                    await store.open()
                for name in recipients:
                    queued = await store.pending(name, 0, 100)
                    assert [(m.seq, m.sender, m.body) for m in queued] == queues[name]
        finally:
            await store.close()

    run(scenario())


def test_put_prekeys_replace_pools_drops_both_one_time_pools_atomically(
        make_store: Callable[[], RelayStore]) -> None:
    async def scenario() -> None:
        async with opened(make_store) as store:
            await accounts(store, "bob", "carol")
            for who in ("bob", "carol"):
                await store.put_prekeys(who, signed_prekey=b"spk",
                                        one_time=[(i, b"old%d" % i) for i in range(5)],
                                        kem_one_time=[(i, b"oldk%d" % i) for i in range(4)],
                                        kem_last_resort=b"lr", max_pool=10)
            with pytest.raises(PrekeyPoolFull):  # refused: nothing dropped
                await store.put_prekeys("bob", signed_prekey=None, one_time=[(i, b"x") for i in range(11)],
                                        kem_one_time=[], kem_last_resort=None, max_pool=10,
                                        replace_pools=True)
            assert await store.prekey_counts("bob") == PoolCounts(5, 4)
            counts = await store.put_prekeys("bob", signed_prekey=b"spk2",
                                             one_time=[(100 + i, b"new%d" % i) for i in range(10)],
                                             kem_one_time=[(100, b"newk")], kem_last_resort=b"lr2",
                                             max_pool=10, replace_pools=True)
            assert counts == PoolCounts(10, 1)
        async with opened(make_store) as store:  # committed, and carol's pools untouched
            assert await store.prekey_counts("carol") == PoolCounts(5, 4)
            bundles = [await store.take_bundle("bob") for _ in range(11)]
            assert {b.one_time_prekey for b in bundles} == {b"new%d" % i for i in range(10)} | {None}
            assert [b.kem_prekey for b in bundles[:2]] == [b"newk", b"lr2"]
            assert bundles[0].signed_prekey == b"spk2"
            await store.put_prekeys("bob", signed_prekey=None, one_time=[], kem_one_time=[],
                                    kem_last_resort=None, max_pool=10, replace_pools=True)
            assert await store.prekey_counts("bob") == PoolCounts(0, 0)
    run(scenario())
