"""Resource exhaustion: per-connection byte budget, pre-auth timeout, per-IP and per-account
connection caps, fetch_bundle quotas. Each against a real relay over real TLS."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
from relay_client import RelayClient
from relay_harness import harness, prekey_upload, run
from websockets.exceptions import InvalidStatus

from cipherpost.cli.server_cmd import config_from_args, register
from cipherpost.protocol.frames import Bundle, Deliver, Error, FetchBundle, Ok, Ping, Pong
from cipherpost.server.connection import Connection

BODY = 60 * 1024
BUDGET = 1024 * 1024  # the smallest allowed: twice the default max_frame (256 KiB)


def _held_bytes(conn: Connection) -> int:
    """What the relay holds in memory for one connection: queued frames and messages, the sync
    buffer, and what sits in the transport's write buffer."""
    return (sum(len(f) for f in conn._frames) + sum(len(m.body) for m in conn._messages)
            + sum(len(m.body) for m in conn._sync_buffer) + conn.ws.transport.get_write_buffer_size())


def test_stalled_reader_is_bounded_by_bytes_and_loses_nothing(tmp_path: Path) -> None:
    count = 400  # 24 MiB of bodies for a peer that does not read

    async def scenario() -> None:
        async with harness(tmp_path, max_outbound_bytes=BUDGET, sqlite_synchronous="NORMAL") as h:
            alice, _ = await h.user("alice")
            bob, _ = await h.user("bob")
            (bob_conn,) = h.server.connections_of("bob")
            bob.ws.transport.pause_reading()
            peak = 0
            sending = True

            async def watch() -> None:
                nonlocal peak
                while sending:
                    peak = max(peak, _held_bytes(bob_conn))
                    await asyncio.sleep(0.002)

            watcher = asyncio.create_task(watch())
            for start in range(0, count, 50):
                await asyncio.gather(*[alice.send("bob", i.to_bytes(2, "big") + bytes(BODY))
                                       for i in range(start, start + 50)])
            await asyncio.sleep(0.2)
            sending = False
            await watcher
            # slack above the budget: one message and the transport's high-water mark (32 KiB)
            assert peak <= BUDGET + 128 * 1024, peak
            assert h.server.metrics.deliveries_deferred >= 1

            bob.ws.transport.resume_reading()  # every accepted message arrives, in order, once
            seqs: list[int] = []
            indices: list[int] = []
            while len(seqs) < count:
                frame = await bob.next_push(10)
                if isinstance(frame, Deliver):
                    seqs.extend(m.seq for m in frame.messages)
                    indices.extend(int.from_bytes(m.body[:2], "big") for m in frame.messages)
            assert seqs == sorted(set(seqs)) and len(seqs) == count
            assert sorted(indices) == list(range(count))
            # and live delivery resumes once the peer has caught up
            await asyncio.sleep(0.2)
            assert not bob_conn._syncing
            await alice.send("bob", b"after")
            frame = await bob.next_push(5)
            assert isinstance(frame, Deliver) and [m.body for m in frame.messages] == [b"after"]
    run(scenario(), timeout=60)


def test_unauthenticated_connection_is_closed_after_the_auth_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, auth_timeout_s=0.5) as h:
            alice, _ = await h.user("alice")
            idle = await h.connect()
            frame = await idle.next_push(5)
            assert isinstance(frame, Error) and frame.code == "not_authenticated"
            assert "0.5 s" in frame.message
            await asyncio.wait_for(idle.ws.wait_closed(), 5)
            assert idle.ws.close_code == 1008
            assert idle.ws.close_reason == "authentication timeout (0.5 s)"
            assert isinstance(await alice.request(Ping(rid=99)), Pong)  # authenticated: stays open
    run(scenario())


def test_connections_per_ip_are_capped_and_idle_ones_expire(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_connections_per_ip=2, auth_timeout_s=0.5) as h:
            await h.connect()
            await h.connect()
            with pytest.raises(InvalidStatus) as info:
                await RelayClient.connect(h.server.url, h.cert)
            assert info.value.response.status_code == 429
            assert b"too many connections from this address" in info.value.response.body
            await asyncio.sleep(1.0)  # the two idle sockets hit the auth timeout: slots are free
            client, _ = await h.user("alice")
            assert isinstance(await client.request(Ping(rid=7)), Pong)
    run(scenario())


def test_connections_per_account_are_capped(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_connections_per_account=2) as h:
            _, alice_id = await h.user("alice")
            second = await h.connect()
            assert isinstance(await second.auth(alice_id, "alice"), Ok)
            third = await h.connect()
            refused = await third.auth(alice_id, "alice")
            assert isinstance(refused, Error) and refused.code == "rate_limited"
            assert "2 open connections" in refused.message
            await asyncio.wait_for(third.ws.wait_closed(), 5)
            assert third.ws.close_code == 1008 and "too many connections" in third.ws.close_reason
            assert len(h.server.connections_of("alice")) == 2
            bob, _ = await h.user("bob")  # other accounts are unaffected
            await second.close()
            await asyncio.sleep(0.1)
            fourth = await h.connect()
            assert isinstance(await fourth.auth(alice_id, "alice"), Ok)
            assert isinstance(await bob.request(Ping(rid=5)), Pong)
    run(scenario())


def test_fetch_bundle_is_limited_per_requester_and_per_target(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, bundle_fetches_per_hour=5, bundle_fetches_per_target_per_hour=3) as h:
            targets = {}
            for name in ("bob", "dave"):
                client, identity = await h.user(name)
                assert isinstance(await client.request(prekey_upload(identity, client.rid(), one_time=10,
                                                                     kem=10)), Ok)
                targets[name] = client
            carol, _ = await h.user("carol")

            async def fetch(client: RelayClient, name: str) -> Bundle | Error:
                reply = await client.request(FetchBundle(rid=client.rid(), username=name))
                assert isinstance(reply, Bundle | Error)
                return reply

            for _ in range(3):
                assert isinstance(await fetch(carol, "bob"), Bundle)
            before = await h.server.store.prekey_counts("bob")
            limited = await fetch(carol, "bob")
            assert isinstance(limited, Error) and limited.code == "rate_limited"
            assert "'bob'" in limited.message and "3 per hour" in limited.message
            assert await h.server.store.prekey_counts("bob") == before  # a refused fetch spends nothing
            for _ in range(2):
                assert isinstance(await fetch(carol, "dave"), Bundle)
            over = await fetch(carol, "dave")  # 6th fetch of carol: the per-requester limit
            assert isinstance(over, Error) and over.code == "rate_limited"
            assert "from this account" in over.message and "5 per hour" in over.message
            eve, _ = await h.user("eve")  # another requester is not affected
            assert isinstance(await fetch(eve, "bob"), Bundle)
    run(scenario())


def test_cli_flags_set_the_limits(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args([
        "server", "--data", str(tmp_path), "--auth-timeout", "3.5", "--max-connections-per-ip", "300",
        "--max-connections-per-account", "4", "--max-outbound-bytes", "8388608",
        "--bundle-fetches-per-hour", "50", "--bundle-fetches-per-target-per-hour", "7"])
    config = config_from_args(args)
    assert (config.auth_timeout_s, config.max_connections_per_ip, config.max_connections_per_account,
            config.max_outbound_bytes, config.bundle_fetches_per_hour,
            config.bundle_fetches_per_target_per_hour) == (3.5, 300, 4, 8388608, 50, 7)
    defaults = config_from_args(parser.parse_args(["server", "--data", str(tmp_path)]))
    assert (defaults.auth_timeout_s, defaults.max_connections_per_ip,
            defaults.max_connections_per_account, defaults.max_outbound_bytes) == (10.0, 64, 16, 4 << 20)
    with pytest.raises(ValueError, match="max_outbound_bytes"):
        config_from_args(parser.parse_args(["server", "--data", str(tmp_path),
                                            "--max-outbound-bytes", "1000"])).validate()
