"""The relay on PostgreSQL when the database connection breaks: an error the client can act on, never
a silent drop, and a retry that stores the message once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from pg_support import NEEDS_POSTGRES, PG_URL, SLOW_MARKER, CommitGate, pg_schema, terminate, with_query
from relay_harness import harness, run

from cipherpost.protocol.frames import Accepted, Error, Send

__all__ = ["pg_schema"]  # the fixture, imported for pytest


@NEEDS_POSTGRES
def test_send_whose_commit_is_cut_off_gets_an_error_and_its_retry_is_stored_once(
        tmp_path: Path, pg_schema: str) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, store_url=with_query(PG_URL, "schema", pg_schema)) as h:
            alice, _ = await h.user("alice")
            bob, _ = await h.user("bob")
            gate = CommitGate(pg_schema)
            await gate.close_gate()
            msg_id = os.urandom(16)
            body = SLOW_MARKER + b"hello"
            try:
                sending = asyncio.create_task(
                    alice.request(Send(rid=alice.rid(), to="bob", id=msg_id, kind="msg", body=body), 30))
                pid = await gate.waiting_backend()  # the send's COMMIT is in progress
                await terminate(pid)
                reply = await sending
                assert isinstance(reply, Error) and reply.code == "internal" and "retry" in reply.message
                await gate.open_gate()
                retry = await alice.request(Send(rid=alice.rid(), to="bob", id=msg_id, kind="msg", body=body))
                again = await alice.request(Send(rid=alice.rid(), to="bob", id=msg_id, kind="msg", body=body))
                assert isinstance(retry, Accepted) and isinstance(again, Accepted)
            finally:
                await gate.close()
            [m] = await bob.receive_messages(1)
            assert (m.id, m.body) == (msg_id, body)
            assert (await h.server.store.stats()).queued_messages == 1  # once, not twice
            # the relay goes on serving with fresh connections from its pool
            assert isinstance(await alice.send("bob", b"next"), Accepted)
            assert [x.body for x in await bob.receive_messages(1)] == [b"next"]
    run(scenario(), timeout=60)


class PrivatePostgres:
    """A PostgreSQL server of this test's own (initdb + pg_ctl), to stop and start at will."""

    def __init__(self, tmp: Path) -> None:
        # PostgreSQL refuses to run as root: then run its tools as the postgres user, in a directory
        # it can reach (pytest's are private to root)
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.base = Path(tempfile.mkdtemp(prefix="cpt-pg-")) if self.prefix else tmp
        if self.prefix:
            shutil.chown(self.base, "postgres", "postgres")
        self.dir = self.base / "pg"
        self.sockets = self.base / "sock"
        self.port = _free_port()

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        for d in (self.dir, self.sockets):
            d.mkdir(mode=0o700)
            if self.prefix:
                shutil.chown(d, "postgres", "postgres")
        initdb = shutil.which("initdb")
        assert initdb, "initdb (PostgreSQL server binaries) is needed for this test"
        self._run(initdb, "-D", str(self.dir), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-w", "-l", str(self.dir / "log"), "-o",
                  f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-w", "-m", "fast", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.prefix:
            shutil.rmtree(self.base, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres?schema=relay"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("initdb") is None or shutil.which("pg_ctl") is None,
                    reason="PostgreSQL server binaries (initdb, pg_ctl) are needed for a private server")
def test_postgresql_down_sends_fail_with_an_error_and_the_relay_recovers_when_it_returns(
        tmp_path: Path) -> None:
    pg = PrivatePostgres(tmp_path)
    try:
        pg.init()
        pg.start()

        async def scenario() -> None:
            async with harness(tmp_path / "data", store_url=pg.url) as h:
                alice, _ = await h.user("alice")
                bob, _ = await h.user("bob")
                assert isinstance(await alice.send("bob", b"before"), Accepted)
                assert [m.body for m in await bob.receive_messages(1)] == [b"before"]
                await asyncio.to_thread(pg.stop)
                msg_id = os.urandom(16)
                send = Send(rid=0, to="bob", id=msg_id, kind="msg", body=b"during")
                for _ in range(2):  # a pooled connection that broke, then a refused new one
                    reply = await alice.request(dataclasses.replace(send, rid=alice.rid()), 30)
                    assert isinstance(reply, Error) and reply.code == "internal" and "retry" in reply.message
                await asyncio.to_thread(pg.start)
                for _ in range(50):  # the client's retries: the pool reconnects
                    reply = await alice.request(dataclasses.replace(send, rid=alice.rid()), 30)
                    if isinstance(reply, Accepted):
                        break
                    await asyncio.sleep(0.1)
                assert isinstance(reply, Accepted)
                assert [m.body for m in await bob.receive_messages(1, timeout=10)] == [b"during"]
                assert (await h.server.store.stats()).queued_messages == 2  # once each, nothing lost
        run(scenario(), timeout=120)
    finally:
        pg.remove()
