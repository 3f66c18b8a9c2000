"""Attachments: encrypt+upload and download+decrypt through a real relay, against a plain TLS copy.

    PYTHONPATH=src python bench/files.py [--mib 100] [--seconds 120]

In one run, on 127.0.0.1, with the same file:
- **cipherpost**: a real ``cipherpost server`` subprocess (TLS, SQLite, blob files with an fsync every
  4 MiB); the sender encrypts with age STREAM while reading the file and uploads 64 KiB chunks with
  a window of 8 (``client/attachments.py:upload_file``); the receiver downloads, decrypts, checks
  the SHA-256 and renames into place (``download_file``). The relay runs with ``--rate 100000``
  (its per-connection frame bucket is a policy, 500 frames/s by default = 32 MiB/s per connection).
- **plain TLS copy**: a subprocess TLS server (same certificate); the client sends the same number
  of bytes in 65,552-byte chunks, the server writes them to a file and fsyncs once at the end; then
  it sends the file back in the same chunks and the client writes it and fsyncs once.

Reported: MB/s of each direction, the ratio (goal >= 0.7), and the peak RSS above idle of the client
process and of the relay process (sampled every 20 ms from /proc; goal: flat, not growing with the
file). Bounded by ``--seconds`` per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHUNK = 65_552
PASSPHRASE = "bench passphrase for files"

PLAIN_SERVER = r"""
import asyncio, os, ssl, sys
CHUNK = int(sys.argv[4])
async def main(port, cert, key, folder):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key)
    async def handle(reader, writer):
        op = await reader.readexactly(1); size = int.from_bytes(await reader.readexactly(8), "big")
        path = os.path.join(folder, "copy.bin")
        if op == b"U":
            with open(path, "wb") as f:
                left = size
                while left:
                    data = await reader.readexactly(min(CHUNK, left)); f.write(data); left -= len(data)
                f.flush(); os.fsync(f.fileno())
            writer.write(b"k")
        else:
            with open(path, "rb") as f:
                while data := f.read(CHUNK):
                    writer.write(data); await writer.drain()
        await writer.drain(); writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx)
    print("port", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main(0, sys.argv[1], sys.argv[2], sys.argv[3]))
"""


class RssSampler:
    """Peak resident set size of a process (from /proc/PID/status) while sampling runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.idle = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self.current())
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


def start_relay(data: Path) -> tuple[subprocess.Popen[str], str, str]:
    cmd = [sys.executable, "-m", "cipherpost", "server", "--host", "127.0.0.1", "--port", "0", "--data",
           str(data), "--rate", "100000", "--rate-burst", "100000", "--max-blob-bytes", str(1 << 40),
           "--max-stored-bytes", str(1 << 40)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = fingerprint = ""
    assert proc.stdout is not None
    while not (url and fingerprint):
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("relay exited early")
        if m := re.search(r"listening on (wss://[\d.]+:\d+)", line):
            url = m.group(1)
        if m := re.search(r"TLS certificate fingerprint: (SHA256:[0-9a-f]{64})", line):
            fingerprint = m.group(1)
    threading.Thread(target=lambda: [None for _ in proc.stdout or []], daemon=True).start()
    return proc, url, fingerprint


async def plain_copy(port: int, cert: Path, source: Path, target: Path, size: int) -> tuple[float, float]:
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    writer.write(b"U" + size.to_bytes(8, "big"))
    with source.open("rb") as f:
        while data := f.read(CHUNK):
            writer.write(data)
            await writer.drain()
    assert await reader.readexactly(1) == b"k"
    writer.close()
    up = time.perf_counter() - t0
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    writer.write(b"D" + size.to_bytes(8, "big"))
    await writer.drain()
    with target.open("wb") as f:
        left = size
        while left:
            data = await reader.read(min(CHUNK, left))
            if not data:
                raise SystemExit("plain copy cut short")
            f.write(data)
            left -= len(data)
        f.flush()
        os.fsync(f.fileno())
    writer.close()
    return up, time.perf_counter() - t0


CHAT: dict[str, list[float]] = {}


async def chat_latencies(client: object, count: int,
                         until: asyncio.Future[object] | None = None) -> list[float]:
    """Seconds from ``send`` to ``accepted`` of short chat messages on the uploader's own connection,
    one every 50 ms (while ``until`` runs)."""
    out = []
    for i in range(count):
        if until is not None and until.done():
            break
        t0 = time.perf_counter()
        await client.send("bob", f"chat {i}")  # type: ignore[attr-defined]
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.05)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def cipherpost_copy(url: str, fingerprint: str, home: Path, source: Path,
                          downloads: Path, seconds: float,
                          client_rss: RssSampler) -> tuple[float, float, Path]:
    from cipherpost.client.attachments import download_file, send_file
    from cipherpost.client.client import Client
    from cipherpost.client.connection import parse_fingerprint
    pin = parse_fingerprint(fingerprint)
    alice = await Client.create(home / "alice", "alice", url, PASSPHRASE, server_fingerprint=pin)
    bob = await Client.create(home / "bob", "bob", url, PASSPHRASE, server_fingerprint=pin)
    await alice.connect()
    await bob.connect()
    idle_chat = await chat_latencies(alice, 20)
    client_rss.idle = client_rss.peak = client_rss.current()   # idle: profiles open and connected
    t0 = time.perf_counter()
    upload = asyncio.ensure_future(asyncio.wait_for(send_file(alice, "bob", source), seconds))
    busy_chat = await chat_latencies(alice, 10_000, until=upload)
    await upload
    up = time.perf_counter() - t0
    CHAT.update(idle=idle_chat, busy=busy_chat)
    offer = None
    while offer is None:
        got = await bob.receive(wait=10)
        offer = next((m.file for m in got if m.file is not None), None)
    t0 = time.perf_counter()
    saved = await asyncio.wait_for(download_file(bob, offer, downloads), seconds)
    down = time.perf_counter() - t0
    await alice.close()
    await bob.close()
    return up, down, saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=120.0)
    args = ap.parse_args()
    size = args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="cipherpost-bench-files-") as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "source.bin"
        with source.open("wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        digest = file_sha256(source)
        relay, url, fingerprint = start_relay(tmp / "relay")
        cert = tmp / "relay" / "tls-cert.pem"
        (tmp / "plain").mkdir()
        key = tmp / "relay" / "tls-key.pem"
        plain = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, str(cert), str(key), str(tmp / "plain"),
                                  str(CHUNK)], stdout=subprocess.PIPE, text=True)
        try:
            assert plain.stdout is not None
            port = int(plain.stdout.readline().split()[1])
            plain_up, plain_down = asyncio.run(plain_copy(port, cert, source, tmp / "plain-back.bin", size))
            relay_rss = RssSampler(relay.pid)
            client_rss = RssSampler(os.getpid())
            with relay_rss, client_rss:
                relay_rss.idle = relay_rss.current()
                up, down, saved = asyncio.run(cipherpost_copy(url, fingerprint, tmp / "homes", source,
                                                              tmp / "downloads", args.seconds, client_rss))
            assert file_sha256(saved) == digest, "the round trip changed the file"
        finally:
            plain.terminate()
            relay.terminate()
            relay.wait(30)
    mb = size / 1e6
    print(f"file: {args.mib} MiB, chunks of {CHUNK} bytes, 127.0.0.1, one run")
    print(f"{'':26}{'plain TLS':>12}{'cipherpost':>12}{'ratio':>8}")
    print(f"{'upload (encrypt+upload)':26}{mb / plain_up:>9.1f} MB/s{mb / up:>7.1f} MB/s"
          f"{plain_up / up:>8.2f}")
    print(f"{'download (+decrypt)':26}{mb / plain_down:>9.1f} MB/s{mb / down:>7.1f} MB/s"
          f"{plain_down / down:>8.2f}")
    idle, busy = CHAT["idle"], CHAT["busy"]
    print(f"chat send->accepted on the uploading connection: idle p50 {pct(idle, 0.5):.1f} ms p99 "
          f"{pct(idle, 0.99):.1f} ms; during the upload ({len(busy)} messages) p50 {pct(busy, 0.5):.1f} ms "
          f"p99 {pct(busy, 0.99):.1f} ms")
    mib = 2 ** 20
    print(f"peak RSS above idle: client {(client_rss.peak - client_rss.idle) / mib:.1f} MiB "
          f"(idle {client_rss.idle / mib:.0f} MiB), relay {(relay_rss.peak - relay_rss.idle) / mib:.1f} MiB "
          f"(idle {relay_rss.idle / mib:.0f} MiB)")


if __name__ == "__main__":
    main()
