"""Schema migrations (store/migrations.py, docs/contracts.md section 4): a relay store made by the first
slice's code (tests/server/fixtures/relay_v1.sql, made at commit 7e818ef) opens with nothing lost; a
store newer than the code is refused untouched; the PostgreSQL runner runs each step once."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pg_support import NEEDS_POSTGRES, PG_URL, drop_schema, fresh_name
from relay_harness import harness, run

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Accepted, Error, Ok
from cipherpost.store.base import (
    MailboxPolicy,
    NameConfusable,
    NewMessage,
    SchemaTooNew,
    SenderCapReached,
)
from cipherpost.store.migrations import LATEST, MIGRATIONS, migrate_postgres
from cipherpost.store.sqlite import SqliteRelayStore

FIXTURE = Path(__file__).parent / "fixtures" / "relay_v1.sql"


def v1_store(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.executescript(FIXTURE.read_text())
    return path


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def blob(label: str, n: int = 48) -> bytes:  # as tests/server/fixtures/make_relay_v1.py made them
    digest = hashlib.sha256(label.encode()).digest()
    return digest * (n // 32) + digest[:n % 32]


def test_a_first_slice_store_migrates_with_nothing_lost(tmp_path: Path) -> None:
    path = v1_store(tmp_path / "relay.db")
    assert rows(path, "PRAGMA user_version") == [(1,)]
    before_messages = rows(path, "SELECT seq, recipient, sender, msg_id, kind, body, ts FROM messages "
                                 "ORDER BY seq")
    before_accounts = rows(path, "SELECT username, identity, created_ms, signed_prekey, kem_last_resort "
                                 "FROM accounts ORDER BY username")
    before_prekeys = rows(path, "SELECT * FROM one_time_prekeys ORDER BY 1, 2, 3")
    before_invites = rows(path, "SELECT * FROM invites")
    assert len(before_messages) == 6 and len(before_accounts) == 4

    async def scenario() -> None:
        store = SqliteRelayStore(path)
        await store.open()
        queued = {}
        for name in ("alice", "bob"):
            queued[name] = [(m.seq, name, m.sender, m.msg_id, m.kind, m.body, m.ts)
                            for m in await store.pending(name, 0, 100)]
        assert sorted(queued["alice"] + queued["bob"]) == before_messages
        for account in before_accounts:
            assert await store.get_identity(str(account[0])) == account[1]
        bundle = await store.take_bundle("bob")
        assert bundle.one_time_prekey == blob("otk 0", 32) and bundle.kem_prekey == blob("kem 0", 40)
        # a first-slice message id is still a duplicate, acked (carol -> alice, seq 7) or queued
        resend = NewMessage(sender="carol", recipient="alice", msg_id=blob("id carol 1", 16), kind="msg",
                            body=b"again", ts=1)
        again = await store.enqueue(resend, MailboxPolicy())
        assert again.duplicate and again.seq == 7
        queued_id = NewMessage(sender="alice", recipient="bob", msg_id=blob("id alice 0", 16), kind="msg",
                               body=b"again", ts=1)
        assert (await store.enqueue(queued_id, MailboxPolicy())).seq == 1
        # new sequence numbers continue above every old one, acked ones included
        fresh = await store.enqueue(NewMessage(sender="bob", recipient="alice", msg_id=b"n" * 16, kind="msg",
                                               body=b"new", ts=1), MailboxPolicy())
        assert fresh.seq == 8
        # the old queue counts against the new caps: alice has 4 messages waiting for bob
        with pytest.raises(SenderCapReached):
            await store.enqueue(NewMessage(sender="alice", recipient="bob", msg_id=b"m" * 16, kind="msg",
                                           body=b"x", ts=1), MailboxPolicy(max_queue_per_sender=4))
        # look-alikes: b0b was registered before the rule and keeps its name; a third one is refused
        assert await store.get_identity("b0b") == blob("identity b0b", 64)
        with pytest.raises(NameConfusable):
            await store.create_account("bob_", b"id", 1)
        # the invite made by the old code is still usable, once
        await store.create_account("dave", b"id", 1, invite_hash=blob("invite", 32))
        usage = {r.sender: r.bytes_stored for r in await store.usage(0)}
        assert usage == {"alice": 406, "bob": 100 + 3, "carol": 100}  # 3: "new"
        assert len(await store.epoch()) == 16
        await store.close()

    run(scenario())
    assert rows(path, "SELECT version FROM schema_version ORDER BY version") == [
        (v,) for v in range(1, LATEST + 1)]
    # the first slice's code opens only user_version 0 or 1: it refuses this store instead of misreading it
    assert rows(path, "PRAGMA user_version") == [(LATEST,)]
    assert rows(path, "SELECT * FROM invites") == []
    assert before_invites and before_prekeys


def test_a_failed_migration_leaves_the_old_store_whole(tmp_path: Path) -> None:
    path = v1_store(tmp_path / "relay.db")
    with sqlite3.connect(path) as db:  # something in the way of version 2, found after its first steps
        db.execute("CREATE TABLE usage (x INTEGER)")
    before = rows(path, "SELECT * FROM messages ORDER BY seq")

    async def scenario() -> None:
        with pytest.raises(sqlite3.OperationalError, match="usage"):
            await SqliteRelayStore(path).open()

    run(scenario())
    assert rows(path, "PRAGMA user_version") == [(1,)]
    assert rows(path, "SELECT * FROM messages ORDER BY seq") == before
    assert rows(path, "SELECT name FROM sqlite_master "
                      "WHERE name IN ('schema_version', 'sent', 'bodies')") == []
    assert [c[1] for c in rows(path, "PRAGMA table_info(accounts)")] == [
        "username", "identity", "created_ms", "signed_prekey", "kem_last_resort"]


def test_a_store_newer_than_the_code_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"

    async def make() -> None:
        store = SqliteRelayStore(path)
        await store.open()
        await store.create_account("bob", b"id", 1)
        await store.close()

    run(make())
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (LATEST + 7,))
    before = path.read_bytes()

    async def reopen() -> None:
        with pytest.raises(SchemaTooNew) as refused:
            await SqliteRelayStore(path).open()
        assert f"version {LATEST + 7}" in str(refused.value) and f"up to {LATEST}" in str(refused.value)

    run(reopen())
    assert path.read_bytes() == before


def test_a_fresh_store_records_every_version(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteRelayStore(tmp_path / "relay.db")
        await store.open()
        await store.close()

    run(scenario())
    assert rows(tmp_path / "relay.db", "SELECT version, name FROM schema_version ORDER BY version") == [
        (m.version, m.name) for m in MIGRATIONS]


@NEEDS_POSTGRES
def test_postgres_runner_runs_each_version_once_when_instances_start_together() -> None:
    import asyncpg

    schema = fresh_name("cp_migrations")

    async def connect() -> Any:
        return await asyncpg.connect(PG_URL, server_settings={"search_path": schema})

    async def instance(conn: Any) -> int:
        async with conn.transaction():
            return await migrate_postgres(conn.execute, conn.fetchval)

    async def scenario() -> None:
        admin = await asyncpg.connect(PG_URL)
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            conns = [await connect() for _ in range(3)]
            started = await asyncio.gather(*[instance(c) for c in conns])
            assert sorted(started) == [0, LATEST, LATEST]  # one ran the steps, the others found them done
            versions = await admin.fetch(f'SELECT version FROM "{schema}".schema_version')
            assert sorted(r["version"] for r in versions) == list(range(1, LATEST + 1))
            assert await instance(conns[0]) == LATEST
            for c in conns:
                await c.close()
        finally:
            await admin.close()
            await drop_schema(schema)

    run(scenario())


def test_a_relay_serves_a_first_slice_data_dir(tmp_path: Path) -> None:
    """The real relay (TLS, auth, delivery) on a data dir whose relay.db the first slice made: the queued
    mail is delivered byte for byte, the old names stay taken, new users register and send."""
    data = tmp_path / "data"
    data.mkdir()
    path = v1_store(data / "relay.db")
    queued = rows(path, "SELECT seq, sender, body FROM messages WHERE recipient='bob' ORDER BY seq")
    bob = IdentityKeyPair.generate()

    async def scenario() -> None:
        store = SqliteRelayStore(path)  # the fixture's identities are made up: give bob a real one
        await store.open()
        await store.rebind_identity("bob", bob.public.encode(), None)
        await store.close()
        async with harness(data) as h:
            client = await h.connect()
            assert isinstance(await client.auth(bob, "bob"), Ok)
            got = await client.receive_messages(len(queued))
            assert [(m.seq, m.sender, m.body) for m in got] == queued
            await client.ack([m.seq for m in got])
            other = await h.connect()
            taken = await other.register(IdentityKeyPair.generate(), "alice")
            assert isinstance(taken, Error) and taken.code == "username_taken"
            erin, _ = await h.user("erin")
            reply = await erin.send("bob", b"after the migration")
            assert isinstance(reply, Accepted)
            assert [m.body for m in await client.receive_messages(1)] == [b"after the migration"]

    run(scenario())
