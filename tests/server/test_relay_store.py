"""SQLite specifics the server relies on: group commit isolation, one stored body per fan-out, what stays
on disk after an ack. The contract every backend meets is tests/server/test_store_contract.py."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest
from relay_client import RelayClient
from relay_harness import harness, run

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Ok
from cipherpost.server.tls import certificate_der, ensure_self_signed, fingerprint_text
from cipherpost.store.base import (
    AccountState,
    Delivery,
    MailboxFull,
    MailboxPolicy,
    NewMessage,
    RecipientStatus,
    UnknownAccount,
)
from cipherpost.store.sqlite import SqliteRelayStore


def _msg(to: str, i: int, sender: str = "alice", body: bytes = b"b") -> NewMessage:
    return NewMessage(sender=sender, recipient=to, msg_id=i.to_bytes(16, "big"), kind="msg", body=body, ts=1)


def test_one_refused_send_does_not_spoil_its_group_commit(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteRelayStore(tmp_path / "r.db")
        await store.open()
        await store.create_account("bob", b"id", 0)
        futures = [store.enqueue(_msg("bob", i), 3) for i in range(5)]
        futures.insert(2, store.enqueue(_msg("nobody", 99), 3))
        futures.insert(3, store.enqueue(_msg("bob", 0), 3))  # duplicate of the first
        results = await asyncio.gather(*futures, return_exceptions=True)
        await store.close()
        assert store.batches < len(futures)  # they really shared commits
        ok = [r for r in results if not isinstance(r, BaseException)]
        assert [r.duplicate for r in ok] == [False, False, True, False]
        assert ok[2].seq == ok[0].seq
        assert isinstance(results[2], UnknownAccount)
        assert [type(r) for r in results[5:]] == [MailboxFull, MailboxFull]
        # what was accepted is on disk, in a fresh connection
        with sqlite3.connect(tmp_path / "r.db") as db:
            assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
    run(scenario())


def test_fan_out_stores_its_body_once_and_dedup_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteRelayStore(tmp_path / "r.db")
        await store.open()
        for name in ("bob", "carol", "dave"):
            await store.create_account(name, b"id", 0)
        body = os.urandom(3000)
        delivery = Delivery(sender="alice", msg_id=bytes(16), kind="msg", body=body, ts=1,
                            recipients=["bob", "carol", "dave"])
        results = await store.enqueue_many(delivery, MailboxPolicy())
        single = await store.enqueue(_msg("bob", 5), MailboxPolicy())
        with sqlite3.connect(tmp_path / "r.db") as db:
            assert db.execute("SELECT count(*), sum(length(body)) FROM bodies").fetchone() == (1, 3000)
            assert db.execute("SELECT count(*) FROM messages WHERE body IS NULL").fetchone()[0] == 3
            assert db.execute("SELECT length(body) FROM messages WHERE seq=?",
                              (single.seq,)).fetchone()[0] == 1  # a 1:1 body stays in its row
            assert db.execute("SELECT count(*) FROM sent").fetchone()[0] == 2  # one per (sender, msg_id)
        for result in results:
            assert result.seq is not None
            assert await store.ack(result.recipient, [result.seq]) == 1
        await store.close()
        with sqlite3.connect(tmp_path / "r.db") as db:
            assert db.execute("SELECT count(*) FROM bodies").fetchone()[0] == 0
            assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    run(scenario())


def _on_disk(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def test_acked_bodies_leave_the_database_and_wal_at_the_checkpoint(tmp_path: Path) -> None:
    """docs/contracts.md 1.6: secure_delete zeroes the rows, the truncating checkpoint removes the WAL
    frames that still held them."""
    async def scenario() -> None:
        path = tmp_path / "relay.db"
        store = SqliteRelayStore(path, checkpoint_interval_s=0.05)
        await store.open()
        for name in ("bob", "carol"):
            await store.create_account(name, b"id", 0)
        small, large, shared = os.urandom(200), os.urandom(20_000), os.urandom(300)  # large: overflow pages
        kept = os.urandom(200)
        seqs = [(await store.enqueue(_msg("bob", i, body=body), 10)).seq
                for i, body in enumerate((small, large))]
        fanned = await store.enqueue_many(Delivery(sender="alice", msg_id=b"f" * 16, kind="msg", body=shared,
                                                   ts=1, recipients=["bob", "carol"]), MailboxPolicy())
        await store.enqueue(_msg("carol", 9, body=kept), 10)
        on_disk = _on_disk(path)
        assert all(body[:64] in on_disk for body in (small, large, shared, kept))  # the probe finds them
        assert await store.ack("bob", [*seqs, fanned[0].seq or 0]) == 3
        assert await store.ack("carol", [fanned[1].seq or 0]) == 1
        acked_in = store.batches
        deadline = time.monotonic() + 30
        while store.checkpointed_batch < acked_in:  # wait for the writer's next checkpoint
            assert time.monotonic() < deadline, "no checkpoint ran"
            await asyncio.sleep(0.01)
        on_disk = _on_disk(path)
        for body in (small, large, shared):
            for start in range(0, len(body) - 32, 500):
                assert body[start:start + 32] not in on_disk
        assert kept[:64] in on_disk  # what is still queued is still there
        await store.close()
    run(scenario())


def test_an_operator_change_from_another_process_is_seen_by_the_writer(tmp_path: Path) -> None:
    """The writer's cached account states are reloaded when another connection commits."""
    async def scenario() -> None:
        store = SqliteRelayStore(tmp_path / "r.db")
        await store.open()
        await store.create_account("bob", b"id", 0)
        await store.enqueue(_msg("bob", 1), 10)  # bob's state is cached now
        with sqlite3.connect(tmp_path / "r.db") as db:
            db.execute("UPDATE accounts SET state=? WHERE username='bob'", (AccountState.SUSPENDED.value,))
        results = await store.enqueue_many(Delivery(sender="alice", msg_id=b"x" * 16, kind="msg", body=b"b",
                                                    ts=1, recipients=["bob"]), MailboxPolicy())
        assert results[0].status is RecipientStatus.SUSPENDED
        await store.close()
    run(scenario())


def test_operator_certificate(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path / "operator", "127.0.0.1")

    async def scenario() -> None:
        async with harness(tmp_path / "data", tls_cert=cert, tls_key=key) as h:
            assert h.server.cert_fingerprint == fingerprint_text(certificate_der(cert))
            assert not (tmp_path / "data" / "tls-cert.pem").exists()  # no self-signed one made
            client = await RelayClient.connect(h.server.url, cert)
            h.clients.append(client)
            assert isinstance(await client.register(IdentityKeyPair.generate(), "alice"), Ok)
    run(scenario())


def test_cert_without_key_is_refused(tmp_path: Path) -> None:
    from cipherpost.server.config import ServerConfig

    with pytest.raises(ValueError, match="together"):
        ServerConfig(data_dir=tmp_path, tls_cert=tmp_path / "c.pem").validate()
