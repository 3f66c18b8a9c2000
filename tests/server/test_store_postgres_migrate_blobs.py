"""``migrate-store`` carries attachments (issue 13): blob rows and readers move to PostgreSQL,
verified like every table, and their bytes stay in the owner's quota ledger there."""

from __future__ import annotations

from pathlib import Path

import pytest
from pg_support import NEEDS_POSTGRES, PG_URL, pg_schema, with_query
from relay_harness import run
from test_store_postgres_migrate import _migrate

from cipherpost.store.base import MailboxPolicy, NewMessage, QuotaExceeded
from cipherpost.store.postgres import PostgresRelayStore
from cipherpost.store.sqlite import SqliteRelayStore

pytestmark = NEEDS_POSTGRES
__all__ = ["pg_schema"]  # the fixture, imported for pytest
BLOB, OPEN_UPLOAD = b"B" * 16, b"U" * 16
POLICY = MailboxPolicy(max_stored_bytes=10_000)


def test_blob_rows_and_their_quota_move_to_postgresql(tmp_path: Path, pg_schema: str) -> None:
    source = tmp_path / "relay.db"

    async def populate() -> None:
        store = SqliteRelayStore(source)
        await store.open()
        try:
            for name in ("alice", "bob", "carol"):
                await store.create_account(name, f"identity {name}".encode(), 1_800_000_000_000)
            await store.blob_reserve("alice", BLOB, 6000, 1000, 1_800_000_000_000, POLICY)
            await store.blob_commit(BLOB, "alice", ["bob", "carol"])
            await store.blob_reserve("alice", OPEN_UPLOAD, 3000, 1000, 1_800_000_000_001, POLICY)
        finally:
            await store.close()
    run(populate())
    target = with_query(PG_URL, "schema", pg_schema)
    result = _migrate(source, target)
    assert result.returncode == 0, result.stderr
    assert "blobs: 2 rows" in result.stdout and "blob_readers: 2 rows" in result.stdout

    async def check() -> None:
        store = PostgresRelayStore(target)
        await store.open()
        try:
            info = await store.blob_info(BLOB)
            assert info is not None and info.committed and info.readers == ("bob", "carol")
            open_upload = await store.blob_info(OPEN_UPLOAD)
            assert open_upload is not None and not open_upload.committed
            with pytest.raises(QuotaExceeded):   # 9,000 of alice's 10,000 bytes are blobs
                await store.enqueue(NewMessage("bob", "alice", b"m" * 16, "msg", bytes(1001), 1), POLICY)
            await store.enqueue(NewMessage("bob", "alice", b"n" * 16, "msg", bytes(1000), 2), POLICY)
            assert not await store.blob_release(BLOB, "bob")
            assert await store.blob_release(BLOB, "carol")          # quota returned
            await store.enqueue(NewMessage("bob", "alice", b"o" * 16, "msg", bytes(5000), 3), POLICY)
        finally:
            await store.close()
    run(check())
