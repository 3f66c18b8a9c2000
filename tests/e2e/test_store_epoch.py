"""The relay's store epoch (docs/contracts.md 1.5): after a restored backup (or a ``migrate-store``)
the relay announces a new epoch and each client drops and republishes its prekeys on its next
connection, so no one-time prekey is handed out twice. Real relay processes, real SQLite files."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_support import PASSPHRASE, RelayProcess, User

from cipherpost.client import epoch
from cipherpost.client.client import Client
from cipherpost.crypto.prekey_store import PrekeyStore
from cipherpost.crypto.prekeys import PrekeyBundle

PG_URL = os.environ.get("CIPHERPOST_TEST_POSTGRES", "")


def _prekeys(user: User) -> tuple[PrekeyStore, bytes | None]:
    """The private prekey store and the remembered relay epoch of ``user``'s profile (not connecting)."""
    async def read() -> tuple[PrekeyStore, bytes | None]:
        async with Client.open(user.home, user.name, PASSPHRASE) as c:
            return c.prekeys, c.db.get_secret_meta(epoch.META_KEY)
    return asyncio.run(read())


def _fetch_bundle(by: User, target: str) -> PrekeyBundle:
    """One bundle of ``target``, as a first contact gets it (consumes a one-time key on the relay)."""
    async def fetch() -> PrekeyBundle:
        async with Client.open(by.home, by.name, PASSPHRASE) as c:
            await c.connect()
            r = await c._require_conn().request({"t": "fetch_bundle", "username": target})
            return PrekeyBundle.from_parts(r["identity"], r["signed_prekey"], r["kem_prekey"],
                                           r.get("one_time_prekey"))
    return asyncio.run(fetch())


def _connect(user: User) -> None:
    async def go() -> None:
        async with Client.open(user.home, user.name, PASSPHRASE) as c:
            await c.connect()
    asyncio.run(go())


def _users(relay: RelayProcess, tmp: Path, *names: str) -> list[User]:
    users = [User(n, tmp / f"home-{n}") for n in names]
    for u in users:
        u.ok("init", u.name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)
    return users


def _assert_fresh(bundle: PrekeyBundle, before: PrekeyStore) -> None:
    """Every key of ``bundle`` was made after ``before`` (ids only grow): republished keys."""
    assert bundle.one_time_prekey is not None
    assert bundle.one_time_prekey.key_id >= before.next_one_time_id
    assert bundle.signed_prekey.key_id >= before.next_signed_id
    assert bundle.kem_prekey.key_id >= before.next_kem_id


def test_a_restored_backup_makes_clients_republish_and_no_used_one_time_key_is_served(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay")
    relay.start()
    try:
        alice, bob, carol, dave = _users(relay, tmp_path, "alice", "bob", "carol", "dave")
        published, first_epoch = _prekeys(alice)
        assert first_epoch is not None and len(first_epoch) == 16  # init remembered the relay's epoch

        relay.stop()  # a backup of the stopped relay
        backup = tmp_path / "backup"
        backup.mkdir()
        for f in relay.data.glob("relay.db*"):
            shutil.copy2(f, backup / f.name)
        relay.start()
        bob.ok("send", "alice", "before the restore")  # spends one of alice's one-time keys
        assert [m["text"] for m in alice.recv()] == ["before the restore"]
        held, _ = _prekeys(alice)
        used = set(published.one_time) - set(held.one_time)
        assert len(used) == 1  # alice deleted its private half: that key must never be served again

        relay.stop()  # restore the backup, renew the epoch, restart
        for f in relay.data.glob("relay.db*"):
            f.unlink()
        for f in backup.iterdir():
            shutil.copy2(f, relay.data / f.name)
        done = alice.run("admin", "--data", str(relay.data), "renew-epoch")
        assert done.returncode == 0 and "store epoch renewed" in done.stdout, done.stderr
        relay.start()

        # The hazard: until alice republishes, the restored relay serves the key bob already used.
        stale = _fetch_bundle(carol, "alice")
        assert stale.one_time_prekey is not None and stale.one_time_prekey.key_id in used
        # A first message sent now uses alice's old keys: still decryptable after the republish.
        dave.ok("send", "alice", "in flight across the republish")

        _connect(alice)  # new epoch: fresh prekeys uploaded with replace, then the epoch remembered
        _assert_fresh(_fetch_bundle(carol, "alice"), held)  # old pools dropped, new ones served
        after, remembered = _prekeys(alice)
        assert remembered is not None and remembered != first_epoch
        carol.ok("send", "alice", "after the restore")
        texts = sorted(str(m["text"]) for m in alice.recv())
        assert texts == ["after the restore", "in flight across the republish"]
        _connect(alice)  # same epoch again: nothing republished
        assert _prekeys(alice)[0].next_signed_id == after.next_signed_id
    finally:
        relay.stop()


@pytest.mark.skipif(not PG_URL, reason="CIPHERPOST_TEST_POSTGRES is not set (see tests/server/pg_support.py)")
def test_migrate_store_makes_clients_republish(tmp_path: Path) -> None:
    import asyncpg

    schema = f"cpt_{secrets.token_hex(6)}"
    target = f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"
    relay = RelayProcess(tmp_path / "relay")
    relay.start()
    try:
        alice, bob = _users(relay, tmp_path, "alice", "bob")
        before, first_epoch = _prekeys(alice)
        relay.stop()
        moved = subprocess.run([sys.executable, "-m", "cipherpost", "migrate-store", "--from",
                                f"sqlite:{relay.data / 'relay.db'}", "--to", target],
                               capture_output=True, text=True, timeout=120)
        assert moved.returncode == 0, moved.stderr
        relay.start(extra=["--store", target])  # same data dir: same certificate, pins still match
        _connect(alice)
        _assert_fresh(_fetch_bundle(bob, "alice"), before)
        assert _prekeys(alice)[1] not in (None, first_epoch)
        bob.ok("send", "alice", "on postgresql")
        assert [m["text"] for m in alice.recv()] == ["on postgresql"]
    finally:
        relay.stop()

        async def drop() -> None:
            conn = await asyncpg.connect(PG_URL)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
        asyncio.run(drop())


def test_renew_epoch_refuses_a_directory_without_a_relay(tmp_path: Path) -> None:
    empty = tmp_path / "typo"
    empty.mkdir()
    done = User("ops", tmp_path / "home").run("admin", "--data", str(empty), "renew-epoch")
    assert done.returncode == 1 and "no relay data" in done.stderr and "Traceback" not in done.stderr
    assert list(empty.iterdir()) == []  # nothing created
