"""Cap ``blobs`` (issue 13, docs/attachments.md): the relay stores opaque chunks, reports only chunks
on disk as held, lets only the owner and the named readers read, shares one quota ledger with
mail, deletes a blob when every reader released it, and survives a restart mid-upload. Against a
real relay over real TLS with a real SQLite file and real blob files."""

from __future__ import annotations

import os
from pathlib import Path

from relay_harness import harness, run

from cipherpost.protocol.frames import (
    Accepted,
    BlobBegin,
    BlobCommit,
    BlobData,
    BlobGet,
    BlobHeld,
    BlobPut,
    BlobRelease,
    BlobState,
    Error,
    Ok,
)

CHUNK = 1000


def chunks(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]


async def upload(client, blob_id: bytes, data: bytes, readers: list[str]) -> BlobState:  # type: ignore[no-untyped-def]
    state = await client.request(BlobBegin(client.rid(), blob_id, len(data), CHUNK))
    assert isinstance(state, BlobState), state
    for i, piece in enumerate(chunks(data)[state.held:], start=state.held):
        assert isinstance(await client.request(BlobPut(client.rid(), blob_id, i, piece)), BlobState)
    done = await client.request(BlobCommit(client.rid(), blob_id, readers))
    assert isinstance(done, BlobState) and done.committed, done
    return done


async def download(client, blob_id: bytes, size: int) -> bytes:  # type: ignore[no-untyped-def]
    out = []
    for i in range(len(chunks(bytes(size)))):
        reply = await client.request(BlobGet(client.rid(), blob_id, i))
        assert isinstance(reply, BlobData), reply
        out.append(reply.data)
    return b"".join(out)


def blob_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "blobs").rglob("*") if p.is_file())


def test_a_blob_round_trips_and_is_deleted_when_every_reader_released_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            bob, _ = await h.user("bob")
            carol, _ = await h.user("carol")
            assert "blobs" in alice.hello.caps
            blob_id, data = os.urandom(16), os.urandom(5500)
            state = await upload(alice, blob_id, data, ["bob", "carol"])
            assert (state.held, state.size) == (6, 5500)
            assert await download(bob, blob_id, len(data)) == data
            assert await download(carol, blob_id, len(data)) == data
            assert isinstance(await bob.request(BlobRelease(bob.rid(), blob_id)), Ok)
            assert len(blob_files(tmp_path)) == 2  # fetched by both, saved by one: kept
            assert await download(carol, blob_id, len(data)) == data
            assert isinstance(await carol.request(BlobRelease(carol.rid(), blob_id)), Ok)
            assert blob_files(tmp_path) == []
            gone = await carol.request(BlobGet(carol.rid(), blob_id, 0))
            assert isinstance(gone, Error) and gone.code == "not_found"
    run(scenario())


def test_someone_elses_blob_id_reads_exactly_like_an_unknown_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            await h.user("bob")
            mallory, _ = await h.user("mallory")
            blob_id = os.urandom(16)
            await upload(alice, blob_id, os.urandom(3000), ["bob"])
            for frame in (BlobGet(mallory.rid(), blob_id, 0), BlobHeld(mallory.rid(), blob_id),
                          BlobRelease(mallory.rid(), blob_id),
                          BlobCommit(mallory.rid(), blob_id, ["mallory"]),
                          BlobPut(mallory.rid(), blob_id, 0, b"x" * CHUNK),
                          BlobBegin(mallory.rid(), blob_id, 3000, CHUNK)):
                theirs = await mallory.request(frame)
                rest = [getattr(frame, f) for f in frame.__slots__[2:]]
                unknown = await mallory.request(type(frame)(mallory.rid(), os.urandom(16), *rest))
                assert isinstance(theirs, Error) and theirs.code == "not_found", (frame, theirs)
                if not isinstance(frame, BlobBegin):  # begin of a fresh id creates it
                    assert isinstance(unknown, Error) and unknown.message == theirs.message
    run(scenario())


def test_chunks_out_of_order_or_of_the_wrong_size_and_early_commits_are_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            blob_id = os.urandom(16)
            await alice.request(BlobBegin(alice.rid(), blob_id, 3500, CHUNK))
            skip = await alice.request(BlobPut(alice.rid(), blob_id, 1, b"x" * CHUNK))
            assert isinstance(skip, Error) and "in order" in skip.message
            short = await alice.request(BlobPut(alice.rid(), blob_id, 0, b"x" * 999))
            assert isinstance(short, Error) and "must be 1000 bytes" in short.message
            assert isinstance(await alice.request(BlobPut(alice.rid(), blob_id, 0, b"x" * CHUNK)), BlobState)
            early = await alice.request(BlobCommit(alice.rid(), blob_id, []))
            assert isinstance(early, Error) and "holds 1 of 4 chunks" in early.message
    run(scenario())


def test_max_blob_size_and_the_quota_shared_with_mail_are_enforced(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_blob_bytes=20_000, max_stored_bytes=30_000, max_body=8000) as h:
            alice, _ = await h.user("alice")
            big = await alice.request(BlobBegin(alice.rid(), os.urandom(16), 20_001, CHUNK))
            assert isinstance(big, Error) and big.code == "too_large"
            first = os.urandom(16)
            assert isinstance(await alice.request(BlobBegin(alice.rid(), first, 20_000, CHUNK)), BlobState)
            over = await alice.request(BlobBegin(alice.rid(), os.urandom(16), 10_001, CHUNK))
            assert isinstance(over, Error) and over.code == "quota_exceeded"
            bob, _ = await h.user("bob")
            assert isinstance(await bob.send("alice", os.urandom(8000)), Accepted)  # 28,000 of 30,000
            mail_over = await bob.send("alice", os.urandom(3000))
            assert isinstance(mail_over, Error) and mail_over.code == "quota_exceeded"  # one ledger
            # the owner abandons the upload: its bytes go back to the ledger
            assert isinstance(await alice.request(BlobRelease(alice.rid(), first)), Ok)
            assert isinstance(await bob.send("alice", os.urandom(3000)), Accepted)
    run(scenario())


def test_after_a_relay_restart_held_counts_the_chunks_on_disk_and_not_a_torn_one(tmp_path: Path) -> None:
    blob_id, data = os.urandom(16), os.urandom(9500)

    async def first() -> None:
        async with harness(tmp_path) as h:
            alice, identity = await h.user("alice")
            await alice.request(BlobBegin(alice.rid(), blob_id, len(data), CHUNK))
            for i, piece in enumerate(chunks(data)[:6]):
                await alice.request(BlobPut(alice.rid(), blob_id, i, piece))
            sign, dh = identity.private_bytes()
            (tmp_path / "identity").write_bytes(sign + dh)
    run(first())
    blob, = [p for p in blob_files(tmp_path) if p.suffix == ".blob"]
    with blob.open("r+b") as f:  # a torn write of chunk 5 (what a power cut can leave)
        f.seek(5 * CHUNK + 10)
        f.write(b"\0" * 20)

    async def second() -> None:
        from cipherpost.crypto.identity import IdentityKeyPair
        async with harness(tmp_path) as h:
            alice = await h.connect()
            raw = (tmp_path / "identity").read_bytes()
            identity = IdentityKeyPair.from_private_bytes(raw[:32], raw[32:])
            assert (await alice.auth(identity, "alice")).t == "ok"
            state = await alice.request(BlobBegin(alice.rid(), blob_id, len(data), CHUNK))
            assert isinstance(state, BlobState) and state.held == 5
            await h.user("bob")
            await upload(alice, blob_id, data, ["bob"])
    run(second())


def test_blobs_expire_after_30_days_and_when_every_reader_is_deleted(tmp_path: Path) -> None:
    import time

    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            await h.user("bob")
            old, kept = os.urandom(16), os.urandom(16)
            await upload(alice, old, os.urandom(2000), ["bob"])
            service = h.server.blob_service
            now = time.time_ns() // 1_000_000
            assert await service.expire(now) == 0
            await h.user("carol")
            await upload(alice, kept, os.urandom(2000), ["carol"])
            await h.server.store.delete_account("carol", "operator", "test")
            assert await service.expire(now) == 1           # its only reader is gone
            assert len(blob_files(tmp_path)) == 2
            assert await service.expire(now + 30 * 24 * 3600 * 1000 + 1) == 1   # 30 days
            assert blob_files(tmp_path) == []
            gone = await alice.request(BlobHeld(alice.rid(), old))
            assert isinstance(gone, Error) and gone.code == "not_found"
    run(scenario())
