"""Relay memory per connection, and reconnect storms.

    python bench/connections.py [--connections 1000,10000] [--accounts-per 50]
    python bench/connections.py --storm 2000

Memory (default). For each K, a fresh relay (``cipherpost server`` subprocess, TLS, SQLite) is
started with its connection caps raised; the bench then
1. opens K TLS WebSocket connections and authenticates each (K / ``--accounts-per`` accounts,
   signed ``auth`` on every connection), holds them idle for a few seconds and reports opened,
   failed, the time to open them and the RSS growth per connection ("idle authenticated");
2. closes them all and reports the relay's RSS after closing;
3. with another fresh relay, opens K TCP connections that send nothing (no TLS byte) and reports
   the RSS growth per connection ("pre-TLS").
RSS is VmRSS of the relay process (Linux /proc). Connections come from 127.0.0.1; the bench
process's own TLS connections share a read buffer too (``cipherpost.server.tlsbuffer``), so that
10,000 client connections fit in its memory as well.

Storm (``--storm N``). N authenticated lightweight clients (one account each, spread over
N / 64 source prefixes 127.x.y.0/24) are connected; the relay is stopped and started again on the
same port and data directory; each client reconnects with the product's backoff
(``cipherpost.client.backoff``: exponential, full jitter), authenticates and syncs; a sender queues
one message to every client right after the restart. Reports the time until every client is back
and has its message, connection attempts and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
from websockets.asyncio.client import ClientConnection, connect

from cipherpost.client.backoff import reconnect_delay
from cipherpost.crypto.encoding import pack
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Hello, decode_frame
from cipherpost.server import tlsbuffer

REPO = Path(__file__).resolve().parents[1]
SERVER_MAIN = "import sys; from cipherpost.cli.server_cmd import main; sys.exit(main(sys.argv[1:]))"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def raise_nofile(wanted: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted), hard))


class Relay:
    def __init__(self, data: Path, max_connections: int, port: int = 0) -> None:
        self.data = data
        self.max_connections = max_connections
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.channel = b""

    def start(self) -> Relay:
        n = str(self.max_connections)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_MAIN, "server", "--port", str(self.port), "--data", str(self.data),
             "--max-connections", n, "--max-connections-per-ip", n, "--max-connections-per-account", n,
             "--max-pending-connections", n, "--max-pending-per-prefix", n,
             "--tls-handshake-timeout", "120", "--auth-timeout", "600", "--log-level", "warning",
             "--rate", "1e9", "--rate-burst", "1000000000",  # the storm's sender sends N at once
             "--registrations-per-prefix-per-hour", "1000000", "--metrics-listen", "off"],
            stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        fingerprint = ""
        while not (self.url and fingerprint):
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit("relay failed to start")
            if line.startswith("cipherpost server listening on "):
                self.url = line.split(" on ", 1)[1].strip()
                self.port = int(self.url.rsplit(":", 1)[1])
            elif line.startswith("TLS certificate fingerprint: SHA256:"):
                fingerprint = line.split("SHA256:", 1)[1].strip()
        self.channel = bytes.fromhex(fingerprint)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


async def open_ws(relay: Relay, ctx: ssl.SSLContext,
                  local_ip: str | None = None) -> tuple[ClientConnection, bytes]:
    kwargs = {} if local_ip is None else {"local_addr": (local_ip, 0)}
    ws = await connect(relay.url, ssl=ctx, compression=None, max_size=2**22, open_timeout=60,
                       ping_interval=None, **kwargs)
    hello = decode_frame(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(hello, Hello)
    return ws, hello.nonce


async def login(relay: Relay, ctx: ssl.SSLContext, identity: IdentityKeyPair, name: str, register: bool,
                local_ip: str | None = None) -> ClientConnection:
    ws, nonce = await open_ws(relay, ctx, local_ip)
    kind = "register" if register else "auth"
    sig = identity.sign(kind, pack([nonce, relay.channel, name]))
    frame = {"v": 1, "t": kind, "rid": 1, "username": name, "sig": sig}
    if register:
        frame |= {"identity": identity.public.encode(), "invite": None}
    await ws.send(msgpack.packb(frame))
    while True:
        reply = msgpack.unpackb(await ws.recv())
        if reply.get("rid") == 1:
            break
    if reply["t"] != "ok":
        await ws.close()
        raise RuntimeError(f"{kind} refused: {reply}")
    return ws


async def gather_bounded(coros: list, limit: int) -> list:  # type: ignore[type-arg]
    sem = asyncio.Semaphore(limit)

    async def one(c):  # type: ignore[no-untyped-def]
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


async def settle(pid: int, seconds: float) -> int:
    await asyncio.sleep(seconds)
    return rss_kib(pid)


async def pre_handshake(k: int) -> float:
    """KiB of relay RSS per TCP connection that has not sent a byte (a relay of its own)."""
    with tempfile.TemporaryDirectory() as tmp:
        relay = Relay(Path(tmp) / "relay", k + 1000).start()
        try:
            base = await settle(relay.pid, 2)
            raw: list[socket.socket] = []
            for _ in range(k):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", relay.port))
                raw.append(s)
                if len(raw) % 500 == 0:
                    await asyncio.sleep(0.05)  # let the relay accept
            pre = await settle(relay.pid, 3)
            for s in raw:
                s.close()
            return (pre - base) / k
        finally:
            relay.stop()


async def memory(k: int, accounts_per: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        relay = Relay(Path(tmp) / "relay", k + 1000).start()
        try:
            ctx = ssl.create_default_context(cafile=str(relay.data / "tls-cert.pem"))
            n_accounts = max(1, -(-k // accounts_per))
            identities = [IdentityKeyPair.generate() for _ in range(n_accounts)]
            regs = await gather_bounded([login(relay, ctx, ident, f"user{i}", True)
                                         for i, ident in enumerate(identities)], 32)
            for ws in regs:
                if isinstance(ws, ClientConnection):
                    await ws.close()
            base = await settle(relay.pid, 2)
            t0 = time.monotonic()
            results = await gather_bounded(
                [login(relay, ctx, identities[i % n_accounts], f"user{i % n_accounts}", False)
                 for i in range(k)], 100)
            opened_s = time.monotonic() - t0
            conns = [r for r in results if isinstance(r, ClientConnection)]
            failed = [r for r in results if not isinstance(r, ClientConnection)]
            idle = await settle(relay.pid, 5)
            await gather_bounded([ws.close() for ws in conns], 200)
            closed = await settle(relay.pid, 5)
            out = {"k": k, "opened": len(conns), "failed": len(failed), "open_s": opened_s,
                   "base_mib": base / 1024, "idle_kib": (idle - base) / max(1, len(conns)),
                   "idle_mib": idle / 1024, "closed_mib": closed / 1024}
            if failed:
                out["first_failure"] = repr(failed[0])[:200]  # type: ignore[assignment]
            return out
        finally:
            relay.stop()


# --- reconnect storm ---------------------------------------------------------------------------

class StormClient:
    def __init__(self, i: int, relay: Relay, ctx: ssl.SSLContext) -> None:
        self.name = f"client{i}"
        self.identity = IdentityKeyPair.generate()
        self.local_ip = f"127.{1 + i // 64 // 256}.{i // 64 % 256}.{1 + i % 64}"
        self.relay = relay
        self.ctx = ctx
        self.ws: ClientConnection | None = None
        self.attempts = 0
        self.failures = 0
        self.got = asyncio.Event()
        self.last_error = ""

    async def run(self, register: bool) -> None:
        attempt = 0
        while True:
            self.attempts += 1
            try:
                self.ws = await login(self.relay, self.ctx, self.identity, self.name, register, self.local_ip)
                register = False
                attempt = 0
                async for data in self.ws:
                    frame = msgpack.unpackb(data)
                    if frame.get("t") == "deliver":
                        await self.ws.send(msgpack.packb({"v": 1, "t": "ack",
                                                          "seqs": [m["seq"] for m in frame["messages"]]}))
                        self.got.set()
            except Exception as exc:  # refused, reset, relay down: back off and retry, as the product does
                self.failures += 1
                self.last_error = repr(exc)[:160]
                if "username_taken" in str(exc):  # registered, but the reply was lost: log in instead
                    register = False
            await asyncio.sleep(reconnect_delay(attempt))
            attempt += 1


async def storm(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        relay = Relay(Path(tmp) / "relay", n + 1000).start()
        ctx = ssl.create_default_context(cafile=str(relay.data / "tls-cert.pem"))
        clients = [StormClient(i, relay, ctx) for i in range(n)]
        tasks = []
        try:
            for i in range(0, n, 100):
                batch = clients[i:i + 100]
                tasks += [asyncio.create_task(c.run(register=True)) for c in batch]
                await asyncio.sleep(0.5)
            while sum(1 for c in clients if c.ws is not None and c.ws.close_code is None) < n:
                await asyncio.sleep(0.5)
                up = sum(1 for c in clients if c.ws is not None and c.ws.close_code is None)
                stuck = [c.last_error for c in clients if c.ws is None or c.ws.close_code is not None]
                print(f"  {up}/{n} connected {stuck[:2]}", end="\r", flush=True)
            sender_id = IdentityKeyPair.generate()
            sender = await login(relay, ctx, sender_id, "sender", True)
            await sender.close()
            print(f"{n} clients connected; restarting the relay", flush=True)
            for c in clients:
                c.attempts = c.failures = 0
            t0 = time.monotonic()
            await asyncio.to_thread(relay.stop)  # the clients run meanwhile: they see the relay down
            await asyncio.to_thread(relay.start)
            print(f"relay back after {time.monotonic() - t0:.1f} s", flush=True)
            sender = await login(relay, ctx, sender_id, "sender", False)
            for i, c in enumerate(clients):
                await sender.send(msgpack.packb({"v": 1, "t": "send", "rid": 10 + i, "to": c.name,
                                                 "id": os.urandom(16), "kind": "msg", "body": b"x" * 64}))
            done = 0
            while done < n and time.monotonic() - t0 < 120:
                await asyncio.sleep(0.25)
                done = sum(1 for c in clients if c.got.is_set())
            took = time.monotonic() - t0
            print(f"storm N={n}: {done}/{n} back and synced {took:.1f} s after the restart; "
                  f"connection attempts {sum(c.attempts for c in clients)}, "
                  f"failed attempts {sum(c.failures for c in clients)}", flush=True)
        finally:
            for t in tasks:
                t.cancel()
            relay.stop()


async def main_async(args: argparse.Namespace) -> None:
    tlsbuffer.install()  # the bench's own TLS connections: one read buffer, not 256 KiB each
    if args.storm:
        raise_nofile(args.storm * 2 + 1000)
        await storm(args.storm)
        return
    print(f"{'K':>6} {'opened':>7} {'failed':>6} {'open s':>7} {'pre-TLS KiB/conn':>17} "
          f"{'idle auth KiB/conn':>19} {'RSS idle MiB':>12} {'RSS closed MiB':>14} {'RSS start MiB':>13}")
    for k in args.connections:
        raise_nofile(k * 2 + 1000)
        r = await memory(k, args.accounts_per)
        r["pre_kib"] = await pre_handshake(k)
        print(f"{r['k']:>6} {r['opened']:>7} {r['failed']:>6} {r['open_s']:>7.1f} {r['pre_kib']:>17.1f} "
              f"{r['idle_kib']:>19.1f} {r['idle_mib']:>12.1f} {r['closed_mib']:>14.1f} "
              f"{r['base_mib']:>13.1f}",
              flush=True)
        if "first_failure" in r:
            print("   first failure:", r["first_failure"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000])
    parser.add_argument("--accounts-per", type=int, default=50, help="connections per account")
    parser.add_argument("--storm", type=int, default=0, help="run the reconnect storm with N clients")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
