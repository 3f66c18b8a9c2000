"""Attachments with several relay instances (issue 13, docs/attachments.md section 5): blob rows in
the shared PostgreSQL schema, blob files on one shared directory (``--blob-dir``); a blob uploaded
through one instance is read through another, and the last release there deletes the file."""

from __future__ import annotations

import os
from pathlib import Path

from pg_support import NEEDS_POSTGRES, NEEDS_REDIS, REDIS_URL, with_query
from relay_harness import run
from test_multi_instance import _register, cluster, pg_schema, redis_prefix  # noqa: F401 (fixtures)

from cipherpost.protocol.frames import (
    BlobBegin,
    BlobCommit,
    BlobData,
    BlobGet,
    BlobPut,
    BlobRelease,
    BlobState,
    Ok,
)


@NEEDS_POSTGRES
@NEEDS_REDIS
def test_a_blob_uploaded_through_one_instance_is_read_through_another(
        tmp_path: Path, pg_schema: str, redis_prefix: str) -> None:  # noqa: F811
    shared = tmp_path / "shared-volume"
    bus = with_query(REDIS_URL, "prefix", redis_prefix)
    with cluster(tmp_path, pg_schema, bus, 2, ["--blob-dir", str(shared)]) as c:
        async def scenario() -> None:
            alice, _ = await _register(c, 0, "alice")
            bob, _ = await _register(c, 1, "bob")
            blob_id, data = os.urandom(16), os.urandom(2500)
            begun = await alice.request(BlobBegin(alice.rid(), blob_id, len(data), 1000))
            assert isinstance(begun, BlobState)
            for i in range(3):
                piece = data[i * 1000:(i + 1) * 1000]
                assert isinstance(await alice.request(BlobPut(alice.rid(), blob_id, i, piece)), BlobState)
            done = await alice.request(BlobCommit(alice.rid(), blob_id, ["bob"]))
            assert isinstance(done, BlobState) and done.committed
            got = [await bob.request(BlobGet(bob.rid(), blob_id, i)) for i in range(3)]
            assert b"".join(g.data for g in got if isinstance(g, BlobData)) == data
            assert isinstance(await bob.request(BlobRelease(bob.rid(), blob_id)), Ok)
            assert [p for p in shared.rglob("*") if p.is_file()] == []
            await alice.close()
            await bob.close()
        run(scenario(), timeout=60)
