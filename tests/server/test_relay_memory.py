"""Memory per connection (server/tlsbuffer.py, server/transport.py): one TLS read buffer per event
loop, no TLS state before a client's first byte, and an unfinished fragmented message capped at
the frame limit. RSS figures at 1k and 10k connections come from bench/connections.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from asyncio import sslproto
from collections.abc import AsyncIterator
from pathlib import Path

from conn_support import Relay, client_from
from relay_harness import harness, run
from websockets.asyncio.client import connect

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import DEFAULT_MAX_FRAME, Ok, Ping, Pong
from cipherpost.server import tlsbuffer

KIB = 1024


def _server_tls_protocols(server: object) -> list[sslproto.SSLProtocol]:
    conns = server._server.connections  # type: ignore[attr-defined]
    return [c.transport._ssl_protocol for c in conns]  # asyncio's _SSLProtocolTransport


def test_tls_connections_share_one_read_buffer(tmp_path: Path) -> None:
    """Fails if asyncio stops creating the override, or if its buffer names change meaning."""
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            assert tlsbuffer.installed()
            await h.user("alice")
            await h.user("bob")
            protocols = _server_tls_protocols(h.server)
            assert len(protocols) == 2
            a, b = protocols
            assert type(a) is tlsbuffer.SharedReadBufferSSLProtocol
            assert a._ssl_buffer is b._ssl_buffer  # one per event loop ...
            assert len(a._ssl_buffer) == tlsbuffer.RECV_BYTES  # ... of RECV_BYTES
            assert a.get_buffer(-1) is a._ssl_buffer_view  # what the transport reads into
            assert a.get_buffer(-1).obj is b.get_buffer(-1).obj
            assert isinstance(a._sslobj, ssl.SSLObject)  # made once the client spoke
            # the connections still work through the shared buffer
            c = h.clients[0]
            assert isinstance(await c.request(Ping(rid=5)), Pong)
    run(scenario())


def test_idle_tls_connections_cost_less_than_a_read_buffer_each(tmp_path: Path) -> None:
    """400 idle authenticated TLS connections, then 400 TCP connections that never send a byte,
    against a relay process. The standard library alone costs 256 KiB (read buffer) + ~40 KiB
    (OpenSSL) per connection in both cases; the budgets are 48 KiB and 16 KiB at 10,000
    connections (bench/connections.py), bounded here with room for the noise of a small count."""
    n = 400
    relay = Relay(tmp_path / "relay", ["--max-connections-per-ip", "1000", "--max-connections-per-account",
                                       "1000", "--max-pending-per-prefix", "1000",
                                       "--tls-handshake-timeout", "60"]).start()  # raw sockets stay

    async def scenario() -> None:
        ident = IdentityKeyPair.generate()
        first = await client_from(relay, "127.0.0.1")
        assert isinstance(await first.register(ident, "alice"), Ok)
        await first.close()
        await asyncio.sleep(1)
        base = relay.rss_kib()
        clients = []
        for _ in range(n):
            c = await client_from(relay, "127.0.0.1")
            assert isinstance(await c.auth(ident, "alice"), Ok)
            clients.append(c)
        await asyncio.sleep(1)
        idle_kib = (relay.rss_kib() - base) / n
        raw = []
        mid = relay.rss_kib()
        for _ in range(n):
            s = socket.socket()
            s.connect(("127.0.0.1", relay.port))
            raw.append(s)
        await asyncio.sleep(1)
        pre_kib = (relay.rss_kib() - mid) / n
        print(f"relay RSS per connection: idle authenticated {idle_kib:.1f} KiB, "
              f"before TLS {pre_kib:.1f} KiB")
        assert idle_kib < 80
        assert pre_kib < 32
        for s in raw:
            s.close()
        for c in clients:
            await c.close()

    try:
        run(scenario(), timeout=120)
    finally:
        relay.stop()


async def _fragments(total: int, size: int, hold: asyncio.Event) -> AsyncIterator[bytes]:
    for _ in range(total // size):
        yield b"\x00" * size
    await hold.wait()  # never finish the message
    yield b""


def test_unfinished_fragmented_message_holds_no_more_than_the_frame_limit(tmp_path: Path) -> None:
    """Before, one unfinished 500 KiB message held ~835 KiB. Now fragments beyond max_frame close
    the connection (1009); below it, 64 peers each parking an almost-full message add little more
    than the message and the connection's own cost."""
    relay = Relay(tmp_path / "relay", ["--max-connections-per-ip", "1000", "--max-pending-per-prefix", "1000",
                                       "--auth-timeout", "300"]).start()  # the peers never log in
    ctx = ssl.create_default_context(cafile=str(relay.cert))

    async def scenario() -> None:
        hold = asyncio.Event()
        ws = await connect(relay.url, ssl=ctx, compression=None)
        await ws.recv()  # hello
        sending = asyncio.create_task(ws.send(_fragments(500 * KIB, 16 * KIB, hold)))
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1009 and "fragmented message over" in (ws.close_reason or "")
        sending.cancel()
        with contextlib.suppress(BaseException):
            await sending

        base = relay.rss_kib()
        n, size = 64, DEFAULT_MAX_FRAME - 16 * KIB
        peers, tasks = [], []
        for _ in range(n):
            p = await connect(relay.url, ssl=ctx, compression=None)
            await p.recv()
            peers.append(p)
            tasks.append(asyncio.create_task(p.send(_fragments(size, 16 * KIB, hold))))
        await asyncio.sleep(2)
        per_peer = (relay.rss_kib() - base) * KIB / n
        print(f"relay RSS per peer parking {size // KIB} KiB of fragments: {per_peer / KIB:.0f} KiB")
        assert all(p.close_code is None for p in peers)  # under the limit: they stay connected
        # the message's bytes (at most max_frame), the connection itself (~40 KiB) and what its
        # transport keeps after traffic (TLS input BIO <= 32 KiB, OpenSSL record buffer ~17 KiB,
        # frame reader <= ~48 KiB) plus allocator slack; before, 500 KiB parked held ~835 KiB
        assert per_peer < DEFAULT_MAX_FRAME + 160 * KIB
        for t in tasks:
            t.cancel()
        for p in peers:
            p.transport.abort()

    try:
        run(scenario(), timeout=60)
    finally:
        assert "Traceback" not in relay.stop()
