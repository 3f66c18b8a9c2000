"""Several ``cipherpost server`` processes on one PostgreSQL schema and one Redis: clients spread over
them see one relay. Real processes, real TLS (one certificate, as behind a TCP load balancer)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_support import (
    NEEDS_REDIS,
    PG_URL,
    REDIS_URL,
    SLOW_MARKER,
    CommitGate,
    pg_schema,
    redis_prefix,
    with_query,
)
from relay_client import RelayClient
from relay_harness import REPO, SERVER_MAIN, ServerProcess, prekey_upload, run

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Accepted, Bundle, DeliveredMessage, FetchBundle, Send
from cipherpost.server.tls import ensure_self_signed

__all__ = ["pg_schema", "redis_prefix"]  # fixtures, imported for pytest


class Cluster:
    """N relay processes sharing a store and a bus; each test talks to them directly."""

    def __init__(self, tmp: Path, schema: str, bus_url: str, n: int, extra: list[str] | None = None) -> None:
        self.cert, key = ensure_self_signed(tmp / "tls", "127.0.0.1")
        store = with_query(PG_URL, "schema", schema)
        self.servers = [ServerProcess(tmp / f"relay{i}", ["--store", store, "--bus", bus_url,
                                                          "--tls-cert", str(self.cert), "--tls-key", str(key),
                                                          *(extra or [])])
                        for i in range(n)]

    def start(self) -> Cluster:
        for s in self.servers:
            s.start()
        return self

    def url(self, i: int) -> str:
        return self.servers[i].url

    def stop(self) -> list[str]:
        logs = []
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is None:
                logs.append(s.terminate()[1])
            else:
                logs.append(s.stderr_path.read_text())
        return logs


@contextlib.contextmanager
def cluster(tmp: Path, schema: str, bus_url: str, n: int,
            extra: list[str] | None = None) -> Iterator[Cluster]:
    c = Cluster(tmp, schema, bus_url, n, extra).start()
    try:
        yield c
    finally:
        for log in c.stop():
            assert "Traceback" not in log


async def _register(c: Cluster, i: int, name: str) -> tuple[RelayClient, IdentityKeyPair]:
    identity = IdentityKeyPair.generate()
    client = await RelayClient.connect(c.url(i), c.cert)
    assert (await client.register(identity, name)).t == "ok"
    return client, identity


async def _login(c: Cluster, i: int, name: str, identity: IdentityKeyPair) -> RelayClient:
    client = await RelayClient.connect(c.url(i), c.cert)
    assert (await client.auth(identity, name)).t == "ok"
    return client


async def _drain(client: RelayClient, quiet_s: float = 1.0) -> list[DeliveredMessage]:
    """Everything pushed until nothing more comes for ``quiet_s`` (used after the fact, not timed)."""
    out: list[DeliveredMessage] = []
    while True:
        try:
            out.extend(await client.receive_messages(1, timeout=quiet_s))
        except TimeoutError:
            return out


@NEEDS_REDIS
@pytest.mark.parametrize("n", [2, 3])
def test_clients_spread_over_instances_get_every_message_live_once_and_in_order(
        tmp_path: Path, pg_schema: str, redis_prefix: str, n: int) -> None:
    bus = with_query(REDIS_URL, "prefix", redis_prefix)
    names = ["anna", "bert", "cleo", "dora", "emil", "finn"]
    with cluster(tmp_path, pg_schema, bus, n) as c:
        async def scenario() -> None:
            users = [await _register(c, i % n, name) for i, name in enumerate(names)]
            clients = {name: u[0] for name, u in zip(names, users, strict=True)}
            sends = [clients[a].send(b, f"{a}->{b} #{k}".encode()) for k in range(5) for a in names
                     for b in names if a != b]
            assert all(isinstance(r, Accepted) for r in await asyncio.gather(*sends))
            for b in names:  # live pushes only: nobody reconnects
                got = await clients[b].receive_messages(5 * (len(names) - 1), timeout=10)
                assert sorted(m.body for m in got) == sorted(f"{a}->{b} #{k}".encode() for k in range(5)
                                                              for a in names if a != b)
                assert [m.seq for m in got] == sorted(m.seq for m in got)  # seq order, no duplicate
                for a in (a for a in names if a != b):  # each sender's messages in the order it sent them
                    mine = [m.body for m in got if m.sender == a]
                    assert mine == [f"{a}->{b} #{k}".encode() for k in range(5)]
            for client in clients.values():
                await client.close()
        run(scenario(), timeout=60)
    for s in c.servers:
        log = s.stderr_path.read_text()
        assert "event=bus_up" in log and "event=bus_down" not in log  # woken, never polled


@NEEDS_REDIS
def test_a_later_seq_waiting_for_a_held_commit_reaches_the_recipient_after_it(
        tmp_path: Path, pg_schema: str, redis_prefix: str) -> None:
    """Seq order across instances with a delayed COMMIT: A's send takes bob's seq 1 and its COMMIT is
    held; B's send to bob must wait (bob's mailbox head is locked) and arrive second, live."""
    bus = with_query(REDIS_URL, "prefix", redis_prefix)
    with cluster(tmp_path, pg_schema, bus, 2) as c:
        async def scenario() -> None:
            bob, _ = await _register(c, 1, "bob")
            alice, _ = await _register(c, 0, "alice")
            carol, _ = await _register(c, 1, "carol")
            gate = CommitGate(pg_schema)
            await gate.close_gate()
            try:
                slow = asyncio.create_task(alice.request(Send(rid=alice.rid(), to="bob", id=os.urandom(16),
                                                              kind="msg", body=SLOW_MARKER + b"first"), 30))
                slow_pid = await gate.waiting_backend()
                fast = asyncio.create_task(carol.request(Send(rid=carol.rid(), to="bob", id=os.urandom(16),
                                                              kind="msg", body=b"second"), 30))
                while not await gate.waiters_on_heads(slow_pid):
                    await asyncio.sleep(0.01)
                await gate.open_gate()
                assert isinstance(await slow, Accepted) and isinstance(await fast, Accepted)
            finally:
                await gate.close()
            got = await bob.receive_messages(2, timeout=10)
            assert [m.body for m in got] == [SLOW_MARKER + b"first", b"second"]
            assert got[1].seq == got[0].seq + 1
            assert await _drain(bob, 0.5) == []  # and nothing twice
            for client in (alice, bob, carol):
                await client.close()
        run(scenario(), timeout=60)


@NEEDS_REDIS
def test_instance_killed_mid_traffic_loses_nothing_accepted(
        tmp_path: Path, pg_schema: str, redis_prefix: str) -> None:
    bus = with_query(REDIS_URL, "prefix", redis_prefix)
    total = 1000
    with cluster(tmp_path, pg_schema, bus, 2) as c:
        async def scenario() -> None:
            bob, bob_id = await _register(c, 1, "bob")
            alice, alice_id = await _register(c, 0, "alice")
            accepted: set[bytes] = set()

            async def one(i: int) -> None:
                with contextlib.suppress(Exception):  # the connection dies with instance A
                    reply = await alice.request(Send(rid=alice.rid(), to="bob", id=i.to_bytes(16, "big"),
                                                     kind="msg", body=b"m%d" % i), timeout=10)
                    if isinstance(reply, Accepted):
                        accepted.add(reply.id)

            tasks = []

            async def sender() -> None:
                for i in range(total):
                    tasks.append(asyncio.create_task(one(i)))
                    if i % 10 == 9:
                        await asyncio.sleep(0.005)

            pumping = asyncio.create_task(sender())
            while len(accepted) < 50:
                await asyncio.sleep(0.002)
            c.servers[0].proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]  # sends in flight
            await pumping
            await asyncio.gather(*tasks)
            assert c.servers[0].proc.wait(timeout=10) == -signal.SIGKILL  # type: ignore[union-attr]
            assert 50 <= len(accepted) < total
            # bob, connected to B all along, then reconnecting: every accepted message is there
            seen = [m.id for m in await _drain(bob)]
            await bob.close()
            bob = await _login(c, 1, "bob", bob_id)
            seen += [m.id for m in await _drain(bob)]
            assert not accepted - set(seen), "accepted messages were lost"
            # alice retries everything on B: each message exactly once in the end
            alice = await _login(c, 1, "alice", alice_id)
            retries = await asyncio.gather(*[
                alice.request(Send(rid=alice.rid(), to="bob", id=i.to_bytes(16, "big"), kind="msg",
                                   body=b"m%d" % i), timeout=20) for i in range(total)])
            assert all(isinstance(r, Accepted) for r in retries)
            await bob.close()
            # bob never acked: a fresh login pages the whole queue, which holds each message once
            bob = await _login(c, 1, "bob", bob_id)
            assert sorted(m.id for m in await _drain(bob)) == [i.to_bytes(16, "big") for i in range(total)]
            await alice.close()
            await bob.close()
        run(scenario(), timeout=120)


@NEEDS_REDIS
def test_concurrent_bundle_fetches_across_instances_never_hand_out_one_key_twice(
        tmp_path: Path, pg_schema: str, redis_prefix: str) -> None:
    bus = with_query(REDIS_URL, "prefix", redis_prefix)
    with cluster(tmp_path, pg_schema, bus, 2) as c:
        async def scenario() -> None:
            bob, bob_id = await _register(c, 0, "bob")
            reply = await bob.request(prekey_upload(bob_id, bob.rid(), one_time=40, kem=40))
            assert reply.t == "ok"
            fetchers = [(await _register(c, i % 2, f"fetcher{i}"))[0] for i in range(8)]
            replies = await asyncio.gather(*[f.request(FetchBundle(rid=f.rid(), username="bob"), timeout=20)
                                             for f in fetchers for _ in range(5)])
            bundles = [r for r in replies if isinstance(r, Bundle)]
            assert len(bundles) == 40
            one_time = [b.one_time_prekey for b in bundles]
            kem = [b.kem_prekey for b in bundles]
            assert None not in one_time and len(set(one_time)) == 40
            assert len(set(kem)) == 40  # 40 one-time KEM keys for 40 fetches: no last-resort key
            for client in (bob, *fetchers):
                await client.close()
        run(scenario(), timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own, on another port (never stop the shared one)."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.dir = tmp / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is needed for this test"
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.02)
        raise AssertionError("private redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _wait_for_log(server: ServerProcess, text: str, count: int = 1, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while server.stderr_path.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged"
        time.sleep(0.05)


@NEEDS_REDIS
def test_redis_lost_and_back_mail_still_arrives_and_wakeups_resume(
        tmp_path: Path, pg_schema: str) -> None:
    redis = PrivateRedis(tmp_path)
    redis.start()
    bus = f"redis://127.0.0.1:{redis.port}/0?prefix=cpt"
    try:
        with cluster(tmp_path, pg_schema, bus, 2) as c:
            async def scenario() -> None:
                bob, _ = await _register(c, 1, "bob")
                alice, _ = await _register(c, 0, "alice")
                assert isinstance(await alice.send("bob", b"before"), Accepted)
                assert [m.body for m in await bob.receive_messages(1)] == [b"before"]
                redis.kill()
                await asyncio.to_thread(_wait_for_log, c.servers[1], "event=bus_down")
                # sends go on (PostgreSQL holds the mail); B's poll delivers it to bob, still connected
                assert isinstance(await alice.send("bob", b"during"), Accepted)
                assert [m.body for m in await bob.receive_messages(1, timeout=15)] == [b"during"]
                redis.start()
                for s in c.servers:
                    await asyncio.to_thread(_wait_for_log, s, "event=bus_up", 2)
                assert isinstance(await alice.send("bob", b"after"), Accepted)
                assert [m.body for m in await bob.receive_messages(1, timeout=15)] == [b"after"]
                assert await _drain(bob, 0.5) == []
                await alice.close()
                await bob.close()
            run(scenario(), timeout=90)
    finally:
        redis.kill()
    log = c.servers[1].stderr_path.read_text()
    assert "event=bus_down" in log and "poll_interval_s=2" in log


@NEEDS_REDIS
def test_store_and_bus_from_environment_variables(tmp_path: Path, pg_schema: str, redis_prefix: str) -> None:
    cert, key = ensure_self_signed(tmp_path / "tls", "127.0.0.1")
    env = {"CIPHERPOST_STORE": with_query(PG_URL, "schema", pg_schema),
           "CIPHERPOST_BUS": with_query(REDIS_URL, "prefix", redis_prefix)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        server = ServerProcess(tmp_path / "relay", ["--tls-cert", str(cert), "--tls-key", str(key)]).start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        async def scenario() -> None:
            client = await RelayClient.connect(server.url, cert)
            assert (await client.register(IdentityKeyPair.generate(), "alice")).t == "ok"
            await client.close()
        run(scenario())
    finally:
        code, log = server.terminate()
    assert code == 0 and "store=postgresql://127.0.0.1:5432/test" in log and "bus=redis://" in log
    assert not (tmp_path / "relay" / "relay.db").exists()  # nothing went to SQLite


def _server_command(data: Path) -> list[str]:
    return [sys.executable, "-c", SERVER_MAIN, "server", "--port", "0", "--data", str(data)]


def test_bus_without_a_shared_store_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([*_server_command(tmp_path), "--bus", "redis://127.0.0.1:6379/0"], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "needs a shared --store postgresql://" in proc.stderr


def test_unreachable_store_fails_at_start_with_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([*_server_command(tmp_path), "--store", "postgresql://postgres@127.0.0.1:1/test"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "cannot reach PostgreSQL" in proc.stderr
    assert "Traceback" not in proc.stderr



@NEEDS_REDIS
def test_connection_cap_per_account_counts_every_instance(
        tmp_path: Path, pg_schema: str, redis_prefix: str) -> None:
    bus = with_query(REDIS_URL, "prefix", redis_prefix)
    with cluster(tmp_path, pg_schema, bus, 2, ["--max-connections-per-account", "2"]) as c:
        async def scenario() -> None:
            first, alice = await _register(c, 0, "alice")
            second = await _login(c, 0, "alice", alice)  # registering does not count; logins do
            third = await _login(c, 1, "alice", alice)
            fourth = await RelayClient.connect(c.url(1), c.cert)  # the third login, on the other instance
            reply = await fourth.auth(alice, "alice")
            assert reply.t == "error" and reply.code == "rate_limited"  # type: ignore[attr-defined]
            await second.close()  # one fewer on instance A: a login on B is admitted again
            for _ in range(100):
                retry = await RelayClient.connect(c.url(1), c.cert)
                if (await retry.auth(alice, "alice")).t == "ok":
                    break
                await retry.close()
                await asyncio.sleep(0.05)  # the release reaches Redis after the close
            else:
                raise AssertionError("the closed connection still counts")
            for client in (first, third, fourth, retry):
                await client.close()
        run(scenario(), timeout=60)


@NEEDS_REDIS
def test_changed_identity_is_forgotten_on_every_instance(
        tmp_path: Path, pg_schema: str, redis_prefix: str) -> None:
    """In-process relays on one store and bus: the instance that changes an identity tells the others,
    whose caches would otherwise accept the old key until restart."""
    from relay_harness import relay

    bus = with_query(REDIS_URL, "prefix", redis_prefix)
    store = with_query(PG_URL, "schema", pg_schema)
    cert, key = ensure_self_signed(tmp_path / "tls", "127.0.0.1")

    async def scenario() -> None:
        async with relay(tmp_path / "a", store_url=store, bus_url=bus, tls_cert=cert, tls_key=key) as a, \
                relay(tmp_path / "b", store_url=store, bus_url=bus, tls_cert=cert, tls_key=key) as b:
            old = IdentityKeyPair.generate()
            client = await RelayClient.connect(a.url, cert)
            assert (await client.register(old, "alice")).t == "ok"
            await client.close()
            on_b = await RelayClient.connect(b.url, cert)
            assert (await on_b.auth(old, "alice")).t == "ok"  # b now caches alice's identity
            await on_b.close()
            new = IdentityKeyPair.generate()
            await a.store.rebind_identity("alice", new.public.encode(), None)  # account recovery
            a.identity_changed("alice")
            for _ in range(100):  # the control message reaches b
                if "alice" not in b._identities:
                    break
                await asyncio.sleep(0.02)
            stale = await RelayClient.connect(b.url, cert)
            assert (await stale.auth(old, "alice")).t == "error"
            fresh = await RelayClient.connect(b.url, cert)
            assert (await fresh.auth(new, "alice")).t == "ok"
            for cl in (stale, fresh):
                await cl.close()
    run(scenario(), timeout=60)


@NEEDS_REDIS
def test_a_killed_instances_connections_stop_counting_without_leaving_state(
        tmp_path: Path, pg_schema: str, redis_prefix: str) -> None:
    """One member per connection with an expiry, refreshed by its live instance: SIGKILL leaves no
    counter behind, so the account can log in again once the claim has expired."""
    bus = with_query(with_query(REDIS_URL, "prefix", redis_prefix), "presence_ttl_ms", "1500")
    with cluster(tmp_path, pg_schema, bus, 2, ["--max-connections-per-account", "1"]) as c:
        async def scenario() -> None:
            registering, alice = await _register(c, 1, "alice")
            await registering.close()
            on_a = await _login(c, 0, "alice", alice)  # the one allowed connection, on instance A
            refused = await RelayClient.connect(c.url(1), c.cert)
            assert (await refused.auth(alice, "alice")).t == "error"  # counted across instances
            c.servers[0].proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            c.servers[0].proc.wait(timeout=10)  # type: ignore[union-attr]
            for _ in range(200):  # until A's claim expires (1.5 s after its last refresh)
                retry = await RelayClient.connect(c.url(1), c.cert)
                if (await retry.auth(alice, "alice")).t == "ok":
                    break
                await retry.close()
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("a killed instance's connection still counts")
            for client in (on_a, refused, retry):
                with contextlib.suppress(Exception):
                    await client.close()
        run(scenario(), timeout=60)
