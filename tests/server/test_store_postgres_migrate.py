"""``cipherpost migrate-store --from sqlite:PATH --to postgresql://...``: a relay moves to PostgreSQL
with nothing lost (verified by counts and checksums), refusing a live source and a used target."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from pg_support import NEEDS_POSTGRES, PG_URL, pg_execute, pg_schema, with_query
from relay_harness import REPO, ServerProcess, run

from cipherpost.store.base import Delivery, MailboxPolicy, NewMessage, RecipientStatus
from cipherpost.store.postgres import PostgresRelayStore
from cipherpost.store.sqlite import SqliteRelayStore

pytestmark = NEEDS_POSTGRES
__all__ = ["pg_schema"]  # the fixture, imported for pytest
FIXTURE_V1 = Path(__file__).parent / "fixtures" / "relay_v1.sql"  # a store made by the first slice


def _migrate(source: Path, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cipherpost", "migrate-store", "--from", f"sqlite:{source}",
                           "--to", target], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def _msg(to: str, i: int, sender: str = "alice") -> NewMessage:
    return NewMessage(sender=sender, recipient=to, msg_id=i.to_bytes(16, "big"), kind="msg",
                      body=f"{sender} to {to} #{i}".encode(), ts=1_800_000_000_000 + i)


async def _populate(path: Path) -> tuple[dict[str, list[tuple[int, str, bytes, bytes]]], bytes]:
    store = SqliteRelayStore(path)
    await store.open()
    try:
        for name in ("alice", "bob", "carol", "dave"):
            await store.create_account(name, f"identity {name}".encode(), 1_800_000_000_000)
        await store.put_prekeys("bob", signed_prekey=b"spk", one_time=[(i, os.urandom(32)) for i in range(5)],
                                kem_one_time=[(i, os.urandom(40)) for i in range(3)], kem_last_resort=b"lr",
                                max_pool=100)
        await store.set_block("dave", "alice", True)
        await store.unreserve([n for n in await store.reserved() if n != "admin"])  # edited defaults
        await store.reserve(["admin"])
        await store.log_operator_action("ops", "unreserve", ["root"], "", 1_800_000_000_000)
        for i in range(10):
            await store.enqueue(_msg("bob", i), MailboxPolicy())
        acked = await store.enqueue(_msg("carol", 99), MailboxPolicy())
        await store.ack("carol", [acked.seq])  # gone, but its id is remembered
        await store.enqueue_many(Delivery(sender="carol", msg_id=b"F" * 16, kind="msg", body=b"to all",
                                          ts=1_800_000_000_100, recipients=["alice", "bob", "dave"]),
                                 MailboxPolicy())
        queued = {name: [(m.seq, m.sender, m.msg_id, m.body) for m in await store.pending(name, 0, 100)]
                  for name in ("alice", "bob", "carol", "dave")}
        return queued, await store.epoch()
    finally:
        await store.close()


def test_a_stopped_relay_moves_to_postgresql_with_nothing_lost(tmp_path: Path, pg_schema: str) -> None:
    source = tmp_path / "relay.db"
    queued, old_epoch = run(_populate(source))
    target = with_query(PG_URL, "schema", pg_schema)
    done = _migrate(source, target)
    assert done.returncode == 0, done.stderr
    for table in ("accounts", "messages", "one_time_prekeys", "sent", "blocks", "reserved_names"):
        assert f"{table}: " in done.stdout and " ok" in done.stdout
    assert "messages: 13 rows" in done.stdout and "accounts: 4 rows" in done.stdout

    async def check() -> None:
        store = PostgresRelayStore(target)
        await store.open()
        try:
            for name, want in queued.items():
                got = [(m.seq, m.sender, m.msg_id, m.body) for m in await store.pending(name, 0, 100)]
                assert got == want
            assert await store.epoch() != old_epoch  # renewed: clients republish their prekeys
            assert await store.get_identity("carol") == b"identity carol"
            bundle = await store.take_bundle("bob")
            assert bundle.one_time_prekey is not None and bundle.remaining.one_time == 4
            assert await store.blocked("dave") == ["alice"] and await store.reserved() == ["admin"]
            [logged] = await store.operator_log(0, 10)
            assert (logged.operator, logged.action, logged.names) == ("ops", "unreserve", ("root",))
            again = await store.enqueue(_msg("carol", 99), MailboxPolicy())  # acked, still deduplicated
            assert again.duplicate
            new = await store.enqueue(_msg("bob", 1000), MailboxPolicy())  # seqs keep growing
            assert new.seq > max(seq for seq, *_ in queued["bob"])
            fanned = await store.enqueue_many(Delivery(sender="carol", msg_id=b"F" * 16, kind="msg",
                                                       body=b"to all", ts=1, recipients=["alice", "bob"]),
                                              MailboxPolicy())
            assert [r.status for r in fanned] == [RecipientStatus.DUPLICATE] * 2
            assert await store.ack("alice", [queued["alice"][0][0]]) == 1  # the shared body's counts hold
            assert (await store.stats()).queued_messages == 13
        finally:
            await store.close()
    run(check())


def test_a_first_slice_data_dir_migrates_too(tmp_path: Path, pg_schema: str) -> None:
    source = tmp_path / "relay.db"
    with sqlite3.connect(source) as db:
        db.executescript(FIXTURE_V1.read_text())
    done = _migrate(source, with_query(PG_URL, "schema", pg_schema))
    assert done.returncode == 0, done.stderr
    assert "source schema brought from version 1" in done.stdout and "messages: 6 rows" in done.stdout


def test_a_running_relay_is_refused_and_nothing_is_written(tmp_path: Path, pg_schema: str) -> None:
    server = ServerProcess(tmp_path / "data").start()
    try:
        refused = _migrate(tmp_path / "data" / "relay.db", with_query(PG_URL, "schema", pg_schema))
    finally:
        server.terminate()
    assert refused.returncode == 1 and "in use" in refused.stderr and "Traceback" not in refused.stderr
    rows = asyncio.run(pg_execute("information_schema", "SELECT count(*) FROM information_schema.schemata "
                                  "WHERE schema_name = $1", pg_schema))
    assert rows[0][0] == 0  # type: ignore[index]


def test_a_target_that_holds_accounts_is_refused(tmp_path: Path, pg_schema: str) -> None:
    source = tmp_path / "relay.db"
    run(_populate(source))
    target = with_query(PG_URL, "schema", pg_schema)

    async def used() -> None:
        store = PostgresRelayStore(target)
        await store.open()
        await store.create_account("zed", b"z", 0)
        await store.close()
    run(used())
    refused = _migrate(source, target)
    assert refused.returncode == 1 and "already holds accounts" in refused.stderr
    rows = asyncio.run(pg_execute(pg_schema, "SELECT username FROM accounts"))
    assert [r[0] for r in rows] == ["zed"]  # type: ignore[union-attr]
