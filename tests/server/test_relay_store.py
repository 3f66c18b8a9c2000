"""SQLite store behaviour the server relies on: group commit isolation, seq monotonicity, atomicity."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest
from relay_client import RelayClient
from relay_harness import harness, run

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Ok
from cipherpost.server.tls import certificate_der, ensure_self_signed, fingerprint_text
from cipherpost.store.base import MailboxFull, NewMessage, UnknownAccount
from cipherpost.store.sqlite import SqliteRelayStore


def _msg(to: str, i: int, sender: str = "alice") -> NewMessage:
    return NewMessage(sender=sender, recipient=to, msg_id=i.to_bytes(16, "big"), kind="msg", body=b"b", ts=1)


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


def test_sequence_numbers_never_repeat_across_restarts(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteRelayStore(tmp_path / "r.db")
        await store.open()
        await store.create_account("bob", b"id", 0)
        first = await store.enqueue(_msg("bob", 1), 10)
        assert await store.ack("bob", [first.seq]) == 1  # the highest seq is gone
        await store.close()
        store = SqliteRelayStore(tmp_path / "r.db")
        await store.open()
        second = await store.enqueue(_msg("bob", 2), 10)
        assert second.seq > first.seq
        again = await store.enqueue(_msg("bob", 1), 10)  # dedup survives ack and restart
        assert again.duplicate and again.seq == first.seq
        assert await store.ack("bob", [second.seq]) == 1
        await store.prune(now_ms=10**15, dedup_window_ms=0)  # every remembered id is forgotten
        await store.close()
        store = SqliteRelayStore(tmp_path / "r.db")
        await store.open()
        third = await store.enqueue(_msg("bob", 3), 10)
        assert third.seq > second.seq
        await store.close()
    run(scenario())


def test_concurrent_take_bundle_is_atomic_at_store_level(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteRelayStore(tmp_path / "r.db")
        await store.open()
        await store.create_account("bob", b"id", 0)
        await store.put_prekeys("bob", signed_prekey=b"spk",
                                one_time=[(i, os.urandom(32)) for i in range(50)],
                                kem_one_time=[(i, os.urandom(40)) for i in range(30)],
                                kem_last_resort=b"lr", max_pool=100)
        bundles = await asyncio.gather(*[store.take_bundle("bob") for _ in range(60)])
        await store.close()
        one_time = [b.one_time_prekey for b in bundles if b.one_time_prekey]
        assert len(one_time) == len(set(one_time)) == 50
        kem = [b.kem_prekey for b in bundles if b.kem_prekey != b"lr"]
        assert len(kem) == len(set(kem)) == 30
        assert bundles[-1].remaining.one_time == 0
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
