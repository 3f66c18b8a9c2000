"""PostgreSQL store behaviour that only shows with several connections or instances: seq order under
a delayed COMMIT, a COMMIT cut off by a terminated backend, prekeys across pools, migrations racing.

The contract every backend shares is in test_store_contract.py (parametrised over backends)."""

from __future__ import annotations

import asyncio
import os

import pytest
from pg_support import NEEDS_POSTGRES, PG_URL, SLOW_MARKER, CommitGate, pg_execute, pg_schema, terminate
from relay_harness import run

from cipherpost.store.base import MailboxFull, NewMessage, SchemaTooNew, UnknownAccount
from cipherpost.store.migrations import LATEST
from cipherpost.store.postgres import OutcomeUnknown, PostgresRelayStore, StoreUnavailable

pytestmark = NEEDS_POSTGRES
__all__ = ["pg_schema"]  # the fixture, imported for pytest


def _msg(to: str, i: int, body: bytes = b"b", sender: str = "alice") -> NewMessage:
    return NewMessage(sender=sender, recipient=to, msg_id=i.to_bytes(16, "big"), kind="msg", body=body, ts=1)


async def _open(schema: str) -> PostgresRelayStore:
    store = PostgresRelayStore(PG_URL, schema=schema)
    await store.open()
    return store


def test_commit_cut_off_by_terminated_backend_fails_and_the_retry_stores_once(pg_schema: str) -> None:
    async def scenario() -> None:
        store = await _open(pg_schema)
        gate = CommitGate(pg_schema)
        try:
            await store.create_account("bob", b"id", 0)
            await gate.close_gate()
            sending = store.enqueue(_msg("bob", 1, SLOW_MARKER + b"x"), 10)
            await terminate(await gate.waiting_backend())  # during COMMIT
            with pytest.raises(OutcomeUnknown, match="connection"):
                await sending
            await gate.open_gate()
            retry = await store.enqueue(_msg("bob", 1, SLOW_MARKER + b"x"), 10)  # the client's retry
            again = await store.enqueue(_msg("bob", 1, SLOW_MARKER + b"x"), 10)
            assert not retry.duplicate and again.duplicate and again.seq == retry.seq
            queued = await store.pending("bob", 0, 10)
            assert [m.msg_id for m in queued] == [(1).to_bytes(16, "big")]  # exactly once
            assert (await store.stats()).queued_messages == 1
        finally:
            await gate.close()
            await store.close()
    run(scenario())


def test_a_recipients_seqs_commit_in_order_across_two_instances(pg_schema: str) -> None:
    async def scenario() -> None:
        a, b = await _open(pg_schema), await _open(pg_schema)
        gate = CommitGate(pg_schema)
        try:
            await a.create_account("bob", b"id", 0)
            await gate.close_gate()
            first = a.enqueue(_msg("bob", 1, SLOW_MARKER), 10)  # took a seq, its COMMIT is held
            slow_pid = await gate.waiting_backend()
            second = b.enqueue(_msg("bob", 2, sender="carol"), 10)
            while not await gate.waiters_on_heads(slow_pid):  # b waits for bob's mailbox head
                await asyncio.sleep(0.01)
            assert not second.done()  # a later seq cannot commit before the earlier one
            await gate.open_gate()
            r1, r2 = await first, await second
            assert r2.seq == r1.seq + 1
            assert [m.seq for m in await b.pending("bob", 0, 10)] == [r1.seq, r2.seq]
        finally:
            await gate.close()
            await a.close()
            await b.close()
    run(scenario())


def test_fanned_out_sends_in_opposite_orders_do_not_deadlock(pg_schema: str) -> None:
    async def scenario() -> None:
        stores = [await _open(pg_schema) for _ in range(3)]
        try:
            names = ["anna", "bert", "cleo", "dora", "emil", "finn"]
            for n in names:
                await stores[0].create_account(n, b"id", 0)
            sends = []
            for i in range(300):  # each store's batches lock heads of many recipients at once
                to = names[i % 6] if i % 2 else names[5 - i % 6]
                sends.append(stores[i % 3].enqueue(_msg(to, i, sender=f"s{i % 7}"), 10_000))
            results = await asyncio.gather(*sends)
            assert not any(r.duplicate for r in results)
            for n in names:  # every recipient's seqs are 1..k without a gap
                seqs = [m.seq for m in await stores[1].pending(n, 0, 1000)]
                assert seqs == list(range(1, len(seqs) + 1))
        finally:
            for s in stores:
                await s.close()
    run(scenario(), timeout=60)


def test_concurrent_bundle_fetches_across_instances_never_share_or_skip_a_key(pg_schema: str) -> None:
    async def scenario() -> None:
        stores = [await _open(pg_schema) for _ in range(3)]
        try:
            await stores[0].create_account("bob", b"id", 0)
            await stores[0].put_prekeys("bob", signed_prekey=b"spk",
                                        one_time=[(i, os.urandom(32)) for i in range(40)],
                                        kem_one_time=[(i, os.urandom(40)) for i in range(40)],
                                        kem_last_resort=b"last-resort", max_pool=100)
            bundles = await asyncio.gather(*[stores[i % 3].take_bundle("bob") for i in range(40)])
            one_time = [b.one_time_prekey for b in bundles]
            kem = [b.kem_prekey for b in bundles]
            assert None not in one_time and len(set(one_time)) == 40
            # the pool had exactly one KEM key per fetch: none may fall back to the last-resort key
            assert b"last-resort" not in kem and len(set(kem)) == 40
            after = await stores[1].take_bundle("bob")
            assert after.one_time_prekey is None and after.kem_prekey == b"last-resort"
        finally:
            for s in stores:
                await s.close()
    run(scenario(), timeout=60)


def test_instances_starting_together_migrate_once(pg_schema: str) -> None:
    async def scenario() -> None:
        stores = [PostgresRelayStore(PG_URL, schema=pg_schema) for _ in range(4)]
        await asyncio.gather(*[s.open() for s in stores])
        for s in stores:
            await s.close()
        rows = await pg_execute(pg_schema, "SELECT version FROM schema_version ORDER BY version")
        assert [r[0] for r in rows] == list(range(1, LATEST + 1))  # type: ignore[index]
    run(scenario())


def test_store_newer_than_the_code_refuses_to_open(pg_schema: str) -> None:
    async def scenario() -> None:
        store = await _open(pg_schema)
        await store.close()
        await pg_execute(pg_schema, "INSERT INTO schema_version VALUES (999, 'future', 0)")
        with pytest.raises(SchemaTooNew, match="version 999"):
            await _open(pg_schema)
    run(scenario())


def test_unreachable_database_is_a_clear_error() -> None:
    async def scenario() -> None:
        store = PostgresRelayStore("postgresql://postgres@127.0.0.1:1/test")
        with pytest.raises(StoreUnavailable, match="cannot reach PostgreSQL"):
            await store.open()
    run(scenario())


def test_refused_sends_leave_no_dedup_rows(pg_schema: str) -> None:
    """A flood of sends to names that do not exist (or to full mailboxes) must not grow the store."""
    async def scenario() -> None:
        store = await _open(pg_schema)
        try:
            await store.create_account("bob", b"id", 0)
            for i in range(20):
                with pytest.raises(UnknownAccount):
                    await store.enqueue(_msg(f"nobody{i}", i), 10)
            await store.enqueue(_msg("bob", 100), 1)
            with pytest.raises(MailboxFull):
                await store.enqueue(_msg("bob", 101), 1)
            rows = await pg_execute(pg_schema, "SELECT count(*) FROM sent")
            assert rows[0][0] == 1  # type: ignore[index]  # only the accepted one
            assert not (await store.enqueue(_msg("bob", 101), 2)).duplicate  # a refused id can be retried
        finally:
            await store.close()
    run(scenario())
