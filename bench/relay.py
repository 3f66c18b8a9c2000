"""Relay throughput and latency against two forwarders, measured in the same run.

    python bench/relay.py [--pairs 1,10,100] [--messages 20000] [--window 16] [--seconds 60]
                          [--per-frame 1,16] [--fixed-load 0.5] [--no-bare]

For each N, N sender/receiver pairs on 127.0.0.1 push 256-byte envelopes:
- through the real relay (``cipherpost server`` subprocess: TLS, signed auth, SQLite WAL with
  synchronous=FULL group commits, accepted-after-commit, deliver + batched ack), and
- through a durable forwarder (bench/durable_forwarder.py: TLS WebSocket, the relay's frames, SQLite
  WAL synchronous=FULL group commit with a dedup insert and the message insert, accepted after the
  commit; no auth, checks or limits): what durability alone costs, the floor for the relay, and
- through a bare forwarder (subprocess: TLS WebSocket, no auth, no storage, sender i -> receiver i;
  one envelope per frame only).
``--per-frame K`` puts K envelopes in each ``send`` frame (cap ``batch``; 1 is the plain ``send``).
``--fixed-load F`` adds, per N and K, paced runs of relay and durable forwarder at F times the
relay's closed-loop rate (open loop: sends on a clock, not on credit), for p99 at that load.
Each sender keeps at most ``--window`` messages in flight (sent, not yet received by its receiver).
Latency is send -> receipt by the receiver. Bounded by ``--messages`` per run and ``--seconds``;
each configuration runs ``--rounds`` times, interleaved, and the median run is reported.
The relay is started with its per-connection rate limit raised (the default 500 frames/s would
throttle the load generator; the limit is a policy, not a cost).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from cipherpost.crypto.encoding import pack
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Hello, decode_frame

BODY_SIZE = 256
REPO = Path(__file__).resolve().parents[1]
SERVER_MAIN = "import sys; from cipherpost.cli.server_cmd import main; sys.exit(main(sys.argv[1:]))"


# --- the bare forwarder (runs in its own process) -----------------------------------------------

async def forwarder(port: int, cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    receivers: dict[bytes, ServerConnection] = {}

    async def handler(ws: ServerConnection) -> None:
        first = await ws.recv()
        assert isinstance(first, bytes)
        role, name = first[:1], first[1:]
        if role == b"R":
            receivers[name] = ws
            await ws.wait_closed()
            return
        target = receivers[name]
        async for data in ws:
            await target.send(data)

    async with serve(handler, "127.0.0.1", port, ssl=ctx, compression=None) as server:
        print(next(iter(server.sockets)).getsockname()[1], flush=True)
        await asyncio.Future()


# --- load generation --------------------------------------------------------------------------

class Result:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.start = 0.0
        self.end = 0.0
        self.server_cpu = 0.0
        self.client_cpu = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / (self.end - self.start) if self.end > self.start else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def body(now: float) -> bytes:
    return int(now * 1e9).to_bytes(8, "big") + b"\x00" * (BODY_SIZE - 8)


class Pair:
    def __init__(self, window: int) -> None:
        self.window = window
        self.in_flight = 0
        self.credit = asyncio.Event()
        self.credit.set()
        self.received = 0

    def got(self, n: int) -> None:
        self.received += n
        self.in_flight -= n
        if self.in_flight < self.window:
            self.credit.set()


async def run_load(n: int, total: int, window: int, seconds: float,
                   open_pair: Callable[[int], Awaitable[tuple[ClientConnection, ClientConnection]]],
                   make_send: Callable[[int, int, list[bytes]], bytes],
                   on_receiver_frame: Callable[[ClientConnection, bytes, list[float]], Awaitable[int]],
                   sender_reads: bool, server_pid: int, per_frame: int = 1, rate: float = 0.0) -> Result:
    """Closed loop (``rate`` 0: at most ``window`` messages in flight per pair) or open loop (frames
    sent on a clock at ``rate`` messages/s over all pairs)."""
    per_pair = max(1, total // n)
    pairs = [Pair(window) for _ in range(n)]
    conns = [await open_pair(i) for i in range(n)]
    result = Result()
    deadline = time.monotonic() + seconds

    async def receive(i: int) -> None:
        ws = conns[i][1]
        pair = pairs[i]
        while pair.received < per_pair:
            data = await ws.recv()
            assert isinstance(data, bytes)
            pair.got(await on_receiver_frame(ws, data, result.latencies))

    async def drain_sender(i: int) -> None:
        with contextlib.suppress(Exception):
            async for _ in conns[i][0]:
                pass

    async def send(i: int) -> None:
        ws = conns[i][0]
        pair = pairs[i]
        interval = per_frame * n / rate if rate else 0.0
        t0 = time.monotonic() + interval * i / n  # pairs spread over one interval
        for k in range(0, per_pair, per_frame):
            count = min(per_frame, per_pair - k)
            if rate:
                delay = t0 + interval * (k // per_frame) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            while pair.in_flight + count > window:
                pair.credit.clear()
                await pair.credit.wait()
            if time.monotonic() > deadline:
                return
            pair.in_flight += count
            now = time.perf_counter()
            await ws.send(make_send(i, k, [body(now)] * count))

    result.start = time.perf_counter()
    cpu0, own0 = cpu_seconds(server_pid), time.process_time()
    drains = [asyncio.create_task(drain_sender(i)) for i in range(n)] if sender_reads else []
    receivers = [asyncio.create_task(receive(i)) for i in range(n)]
    await asyncio.gather(*[send(i) for i in range(n)])
    remaining = max(1.0, deadline - time.monotonic())
    await asyncio.wait(receivers, timeout=remaining)
    result.end = time.perf_counter()
    result.server_cpu = cpu_seconds(server_pid) - cpu0
    result.client_cpu = time.process_time() - own0
    for task in receivers + drains:
        task.cancel()
    for s, r in conns:
        await s.close()
        await r.close()
    return result


def latency_of(b: bytes, now: float) -> float:
    return now - int.from_bytes(b[:8], "big") / 1e9


# --- relay side -------------------------------------------------------------------------------

class RelayLoad:
    def __init__(self, url: str, ctx: ssl.SSLContext, channel: bytes) -> None:
        self.url = url
        self.ctx = ctx
        self.channel = channel
        self.round = 0

    async def user(self, name: str) -> ClientConnection:
        ws = await connect(self.url, ssl=self.ctx, compression=None, max_size=2**22)
        hello = decode_frame(await ws.recv())  # type: ignore[arg-type]
        assert isinstance(hello, Hello)
        identity = IdentityKeyPair.generate()
        sig = identity.sign("register", pack([hello.nonce, self.channel, name]))
        await ws.send(msgpack.packb({"v": 1, "t": "register", "rid": 1, "username": name,
                                     "identity": identity.public.encode(), "sig": sig, "invite": None}))
        reply = msgpack.unpackb(await ws.recv())
        assert reply["t"] == "ok", reply
        return ws

    async def open_pair(self, i: int) -> tuple[ClientConnection, ClientConnection]:
        return (await self.user(f"s{self.round}-{i}"), await self.user(f"r{self.round}-{i}"))

    def make_send(self, i: int, k: int, payloads: list[bytes]) -> bytes:
        to = f"r{self.round}-{i}"
        if len(payloads) == 1:
            return msgpack.packb({"v": 1, "t": "send", "rid": k, "to": to,  # type: ignore[no-any-return]
                                  "id": os.urandom(16), "kind": "msg", "body": payloads[0]})
        return msgpack.packb({"v": 1, "t": "send", "rid": k, "envelopes": [  # type: ignore[no-any-return]
            {"to": to, "id": os.urandom(16), "kind": "msg", "body": p} for p in payloads]})

    async def on_receiver_frame(self, ws: ClientConnection, data: bytes, lat: list[float]) -> int:
        frame = msgpack.unpackb(data)
        if frame["t"] != "deliver":
            return 0
        now = time.perf_counter()
        messages = frame["messages"]
        lat.extend(latency_of(m["body"], now) for m in messages)
        await ws.send(msgpack.packb({"v": 1, "t": "ack", "seqs": [m["seq"] for m in messages]}))
        return len(messages)


# --- bare forwarder side ----------------------------------------------------------------------

class ForwarderLoad:
    def __init__(self, url: str, ctx: ssl.SSLContext) -> None:
        self.url = url
        self.ctx = ctx
        self.round = 0

    async def open_pair(self, i: int) -> tuple[ClientConnection, ClientConnection]:
        name = f"{self.round}-{i}".encode()
        r = await connect(self.url, ssl=self.ctx, compression=None)
        await r.send(b"R" + name)
        await asyncio.sleep(0)
        s = await connect(self.url, ssl=self.ctx, compression=None)
        await asyncio.sleep(0.01)  # let the forwarder register the receiver first
        await s.send(b"S" + name)
        return s, r

    def make_send(self, i: int, k: int, payloads: list[bytes]) -> bytes:
        return payloads[0]

    async def on_receiver_frame(self, ws: ClientConnection, data: bytes, lat: list[float]) -> int:
        lat.append(latency_of(data, time.perf_counter()))
        return 1


# --- orchestration ----------------------------------------------------------------------------

def start_relay(data: Path) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER_MAIN, "server", "--port", "0", "--data", str(data),
                             "--rate", "1e9", "--rate-burst", "1000000000", "--max-queue", "10000000",
                             # all bench connections come from 127.0.0.1 (2 per pair)
                             "--max-connections-per-ip", "100000", "--log-level", "warning",
                             # 2 accounts per pair, all registered from 127.0.0.0/24 at once
                             "--registrations-per-prefix-per-hour", "1000000", "--metrics-listen", "off"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    url = fingerprint = ""
    while not (url and fingerprint):
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("relay failed to start")
        if line.startswith("cipherpost server listening on "):
            url = line.split(" on ", 1)[1].strip()
        elif line.startswith("TLS certificate fingerprint: SHA256:"):
            fingerprint = line.split("SHA256:", 1)[1].strip()
    return proc, url, fingerprint


def start_durable_forwarder(data: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "durable_forwarder.py"),
                             str(data / "fwd.db"), str(data / "tls-cert.pem"), str(data / "tls-key.pem")],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"wss://127.0.0.1:{port}"


def start_forwarder(data: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, __file__, "--forwarder", str(data / "tls-cert.pem"),
                             str(data / "tls-key.pem")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"wss://127.0.0.1:{port}"


def _row(n: int, k: int, name: str, results: list[Result]) -> Result:
    res = sorted(results, key=lambda r: r.rate)[len(results) // 2]  # the median run
    count = max(1, len(res.latencies))
    print(f"{n:>4} {k:>3} {name:<16} {res.rate:>9.0f} {res.pct(0.5):>8.2f} {res.pct(0.99):>8.2f} "
          f"{len(res.latencies):>9} {res.server_cpu / count * 1e6:>13.1f} "
          f"{res.client_cpu / count * 1e6:>14.1f}"
          f"   (all runs: {', '.join(f'{r.rate:.0f}' for r in results)})", flush=True)
    return res


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "relay"
        relay_proc, relay_url, fingerprint = start_relay(data)
        durable_proc, durable_url = start_durable_forwarder(data)
        fwd_proc, fwd_url = start_forwarder(data)
        try:
            ctx = ssl.create_default_context(cafile=str(data / "tls-cert.pem"))
            loads = {"relay": (RelayLoad(relay_url, ctx, bytes.fromhex(fingerprint)), relay_proc, True),
                     "durable-forwarder": (RelayLoad(durable_url, ctx, b""), durable_proc, True),
                     "bare-forwarder": (ForwarderLoad(fwd_url, ctx), fwd_proc, False)}
            print(f"{BODY_SIZE}-byte envelopes, window {args.window}/pair (at least 2 frames), up to "
                  f"{args.messages} messages or {args.seconds:.0f} s per run, median of {args.rounds} "
                  "interleaved runs; server: 1 process each, SQLite synchronous=FULL")
            print(f"{'N':>4} {'K':>3} {'system':<16} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
                  f"{'delivered':>9} {'server us/msg':>13} {'clients us/msg':>14}")
            for n in args.pairs:
                for k in args.per_frame:
                    window = max(args.window, 2 * k)
                    names = [x for x in loads if (k == 1 and not args.no_bare) or x != "bare-forwarder"]
                    runs: dict[str, list[Result]] = {x: [] for x in names}
                    for _ in range(args.rounds):  # interleaved, so that background load hits all alike
                        for name in names:
                            load, proc, reads = loads[name]
                            load.round += 1
                            runs[name].append(await run_load(
                                n, args.messages, window, args.seconds, load.open_pair, load.make_send,
                                load.on_receiver_frame, sender_reads=reads, server_pid=proc.pid, per_frame=k))
                    med = {name: _row(n, k, name, results) for name, results in runs.items()}
                    cpu = {name: r.server_cpu / max(1, len(r.latencies)) for name, r in med.items()}
                    floor = cpu["durable-forwarder"]
                    ratio = cpu["relay"] / floor if floor else float("nan")
                    print(f"{n:>4} {k:>3} relay server CPU per message / durable forwarder's = {ratio:.2f} "
                          f"(goal <= 1.25)", flush=True)
                    if args.fixed_load:
                        rate = args.fixed_load * med["relay"].rate
                        for name in ("relay", "durable-forwarder"):
                            load, proc, reads = loads[name]
                            paced = []
                            for _ in range(args.rounds):
                                load.round += 1
                                paced.append(await run_load(
                                    n, args.messages, 1 << 30, args.seconds, load.open_pair, load.make_send,
                                    load.on_receiver_frame, sender_reads=reads, server_pid=proc.pid,
                                    per_frame=k, rate=rate))
                            _row(n, k, f"{name}@{rate:.0f}/s", paced)
        finally:
            for proc in (fwd_proc, durable_proc, relay_proc):
                proc.terminate()
            for proc in (fwd_proc, durable_proc, relay_proc):
                proc.wait(timeout=15)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--forwarder":
        asyncio.run(forwarder(0, sys.argv[2], sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run (all pairs)")
    parser.add_argument("--window", type=int, default=16, help="messages in flight per pair")
    parser.add_argument("--seconds", type=float, default=60.0, help="time bound per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per system and N; the median is shown")
    parser.add_argument("--per-frame", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16],
                        help="envelopes per send frame (cap batch), each value a run")
    parser.add_argument("--fixed-load", type=float, default=0.5,
                        help="paced runs at this fraction of the relay's closed-loop rate (0: none)")
    parser.add_argument("--no-bare", action="store_true", help="leave out the bare forwarder")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
