"""Relay throughput across instances: SQLite single instance, PostgreSQL + Redis with 1, 2, 4 instances.

    python bench/scale.py --postgres postgresql://postgres@127.0.0.1/test --redis redis://127.0.0.1:6379/0
        [--instances 1,2,4] [--pairs 40] [--seconds 8] [--window 8] [--generators 2]

For each configuration, ``--pairs`` sender/receiver pairs push 256-byte envelopes; the load generator
is split over ``--generators`` processes (a pair's two ends live in one, so latency uses one clock).
With N > 1 instances a sender uses instance i % N and its receiver instance (i + 1) % N: every
message crosses instances (accepted on one, woken and paged on another). First a closed-loop run
(``--window`` messages in flight per pair) gives the maximum; then open-loop runs at 50% and 80% of
it give p99 under load, and one at 1,000 msgs/s for the cross-instance p99. CPU per message is
reported per process kind: relay instances (summed), the PostgreSQL backends serving them
(``application_name``), Redis (``INFO cpu``, a shared server: others' use counts too) and the
generators. Each configuration gets its own schema and key prefix, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import secrets
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect

from cipherpost.crypto.encoding import pack
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Hello, decode_frame
from cipherpost.server.tls import ensure_self_signed

BODY_SIZE = 256
REPO = Path(__file__).resolve().parents[1]
SERVER_MAIN = "import sys; from cipherpost.cli.server_cmd import main; sys.exit(main(sys.argv[1:]))"
TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


# --- a load generator process ---------------------------------------------------------------------

async def _user(url: str, ctx: ssl.SSLContext, channel: bytes, name: str) -> ClientConnection:
    ws = await connect(url, ssl=ctx, compression=None, max_size=2**22)
    hello = decode_frame(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(hello, Hello)
    identity = IdentityKeyPair.generate()
    sig = identity.sign("register", pack([hello.nonce, channel, name]))
    await ws.send(msgpack.packb({"v": 1, "t": "register", "rid": 1, "username": name,
                                 "identity": identity.public.encode(), "sig": sig, "invite": None}))
    reply = msgpack.unpackb(await ws.recv())
    assert reply["t"] == "ok", reply
    return ws


async def _generate(pairs: list[tuple[str, str, str, str]], cert: str, channel: bytes, start_at: float,
                    seconds: float, window: int, rate_per_pair: float) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=cert)
    ctx.check_hostname = False
    conns = [(await _user(su, ctx, channel, sn), await _user(ru, ctx, channel, rn))
             for su, sn, ru, rn in pairs]
    latencies: list[float] = []
    counted = [0]
    end_at = start_at + seconds

    async def receive(i: int, ws: ClientConnection, slots: asyncio.Semaphore) -> None:
        async for data in ws:
            frame = msgpack.unpackb(data)
            if frame["t"] != "deliver":
                continue
            now = time.perf_counter()
            for m in frame["messages"]:
                sent = int.from_bytes(m["body"][:8], "big") / 1e9
                if start_at <= time.time() <= end_at:
                    latencies.append(now - sent)
                    counted[0] += 1
                slots.release()
            await ws.send(msgpack.packb({"v": 1, "t": "ack", "seqs": [m["seq"] for m in frame["messages"]]}))

    async def drain(ws: ClientConnection) -> None:
        async for _ in ws:  # accepted replies
            pass

    async def send(i: int, ws: ClientConnection, to: str, slots: asyncio.Semaphore) -> None:
        k = 0
        interval = 1.0 / rate_per_pair if rate_per_pair else 0.0
        next_at = start_at + (i % 100) * interval / 100
        while time.time() < end_at:
            if interval:
                delay = next_at - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
            else:
                await slots.acquire()
            k += 1
            payload = time.perf_counter_ns().to_bytes(8, "big") + bytes(BODY_SIZE - 8)
            await ws.send(msgpack.packb({"v": 1, "t": "send", "rid": k, "to": to, "id": os.urandom(16),
                                         "kind": "msg", "body": payload}))

    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    tasks = []
    for i, ((s, r), (_, _, _, rn)) in enumerate(zip(conns, pairs, strict=True)):
        slots = asyncio.Semaphore(window if not rate_per_pair else 10**9)
        tasks += [asyncio.create_task(receive(i, r, slots)), asyncio.create_task(drain(s))]
        tasks.append(asyncio.create_task(send(i, s, rn, slots)))
    await asyncio.sleep(max(0.0, end_at - time.time()) + 1.0)  # a second for the last deliveries
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for t in tasks:
        t.cancel()
    for s, r in conns:
        await s.close()
        await r.close()
    return {"count": counted[0], "latencies": latencies,
            "cpu": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime}


def _generator_main(args: tuple[Any, ...]) -> dict[str, Any]:
    return asyncio.run(_generate(*args))


# --- orchestration ----------------------------------------------------------------------------------

class Relays:
    def __init__(self, tmp: Path, n: int, store: str | None, bus: str | None) -> None:
        self.cert, key = ensure_self_signed(tmp / "tls", "127.0.0.1")
        self.procs: list[subprocess.Popen[str]] = []
        self.urls: list[str] = []
        self.channel = b""
        for i in range(n):
            cmd = [sys.executable, "-c", SERVER_MAIN, "server", "--port", "0", "--data", str(tmp / f"r{i}"),
                   "--tls-cert", str(self.cert), "--tls-key", str(key), "--rate", "1e9",
                   "--rate-burst", "1000000000", "--max-queue", "10000000", "--max-connections-per-ip",
                   "100000", "--max-connections", "100000", "--log-level", "warning",
                   # every bench account registers from 127.0.0.1 at once; no metrics port per instance
                   "--registrations-per-prefix-per-hour", "1000000000", "--metrics-listen", "off"]
            if store:
                cmd += ["--store", store]
            if bus:
                cmd += ["--bus", bus]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
            assert proc.stdout is not None
            url = ""
            self.channel = b""
            while not (url and self.channel):
                line = proc.stdout.readline()
                if not line:
                    raise SystemExit("relay failed to start")
                if line.startswith("cipherpost server listening on "):
                    url = line.split(" on ", 1)[1].strip()
                elif line.startswith("TLS certificate fingerprint: SHA256:"):
                    self.channel = bytes.fromhex(line.split("SHA256:", 1)[1].strip())
            self.procs.append(proc)
            self.urls.append(url)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=20)


async def _pg_backends(pg: str | None, schema: str) -> list[int]:
    if not pg:
        return []
    import asyncpg

    conn = await asyncpg.connect(pg)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                                f"cipherpost-relay:{schema}")
        return [r[0] for r in rows]
    finally:
        await conn.close()


async def _redis_cpu(url: str | None) -> float:
    if not url:
        return 0.0
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    try:
        info = await client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    finally:
        await client.aclose()


def run_config(label: str, tmp: Path, n: int, store: str | None, bus: str | None, pg: str | None,
               schema: str, args: argparse.Namespace, rate: float | None) -> dict[str, Any]:
    relays = Relays(tmp, n, store, bus)
    try:
        pairs_by_gen: list[list[tuple[str, str, str, str]]] = [[] for _ in range(args.generators)]
        tag = secrets.token_hex(3)
        for i in range(args.pairs):
            sender, receiver = relays.urls[i % n], relays.urls[(i + 1) % n]
            pairs_by_gen[i % args.generators].append((sender, f"s{tag}-{i}", receiver, f"r{tag}-{i}"))
        start_at = time.time() + 3 + args.pairs * 0.03
        per_pair = (rate / args.pairs) if rate else 0.0
        jobs = [(p, str(relays.cert), relays.channel, start_at, args.seconds, args.window, per_pair)
                for p in pairs_by_gen]
        with mp.get_context("spawn").Pool(args.generators) as pool:
            pending = pool.map_async(_generator_main, jobs)
            time.sleep(max(0.0, start_at - time.time()))
            backends = asyncio.run(_pg_backends(pg, schema))
            relay0 = sum(proc_cpu(p.pid) for p in relays.procs)
            pg0 = sum(proc_cpu(p) for p in backends)
            redis0 = asyncio.run(_redis_cpu(bus.split("?")[0] if bus else None))
            time.sleep(args.seconds)
            relay1 = sum(proc_cpu(p.pid) for p in relays.procs)
            pg1 = sum(proc_cpu(p) for p in backends)
            redis1 = asyncio.run(_redis_cpu(bus.split("?")[0] if bus else None))
            results = pending.get(timeout=args.seconds + 120)
    finally:
        relays.stop()
    count = sum(r["count"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    per = 1e6 / max(1, count)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")
    row = {"label": label, "rate": count / args.seconds, "p50": pct(0.5), "p99": pct(0.99),
           "relay": (relay1 - relay0) * per, "pg": (pg1 - pg0) * per, "redis": (redis1 - redis0) * per,
           "gen": sum(r["cpu"] for r in results) * per, "offered": rate}
    offered = f"{rate:.0f}/s" if rate else "max"
    print(f"{label:<22} {offered:>8} {row['rate']:>9.0f} {row['p50']:>8.1f} {row['p99']:>8.1f} "
          f"{row['relay']:>9.0f} {row['pg']:>7.0f} {row['redis']:>7.0f} {row['gen']:>7.0f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("CIPHERPOST_TEST_POSTGRES"))
    parser.add_argument("--redis", default=os.environ.get("CIPHERPOST_TEST_REDIS"))
    parser.add_argument("--instances", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--window", type=int, default=8, help="closed loop: messages in flight per pair")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument("--no-fixed-rate", action="store_true", help="only the closed-loop maximum")
    args = parser.parse_args()
    print(f"{args.pairs} pairs, {BODY_SIZE}-byte envelopes, {args.seconds:g} s per run, {args.generators} "
          f"generator processes, {os.cpu_count()} CPUs; CPU columns are us per delivered message")
    print(f"{'configuration':<22} {'offered':>8} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'relays':>9} "
          f"{'pg':>7} {'redis':>7} {'gen':>7}")
    configs: list[tuple[str, int, bool]] = [("sqlite x1", 1, False)]
    if args.postgres and args.redis:
        configs += [(f"postgres+redis x{n}", n, True) for n in args.instances]
    for label, n, scaled in configs:
        with tempfile.TemporaryDirectory() as tmp:
            schema = f"bench_{secrets.token_hex(4)}"
            joiner = "&" if "?" in (args.postgres or "") else "?"
            store = f"{args.postgres}{joiner}schema={schema}" if scaled else None
            bus = f"{args.redis}?prefix={schema}" if scaled else None
            try:
                best = run_config(label, Path(tmp) / "a", n, store, bus, args.postgres, schema, args, None)
                if not args.no_fixed_rate:
                    for share in (0.5, 0.8):
                        run_config(label, Path(tmp) / f"b{share}", n, store, bus, args.postgres, schema, args,
                                   best["rate"] * share)
                    if n > 1:
                        run_config(label + " cross", Path(tmp) / "c", n, store, bus, args.postgres, schema,
                                   args, 1000.0)
            finally:
                if scaled:
                    asyncio.run(_drop(args.postgres, schema))


async def _drop(pg: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(pg)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
