"""Helpers for the connection tests: a relay process with its own open-file limit, clients bound to
chosen loopback source addresses (127.x.y.z: each /24 is a prefix of its own), RSS of a process,
and a TCP proxy that delays every chunk (a slow mobile link)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from relay_client import RelayClient, client_ssl_context
from websockets.asyncio.client import connect

from cipherpost.protocol.frames import Hello, decode_frame

REPO = Path(__file__).resolve().parents[2]
SERVER_MAIN = "import sys; from cipherpost.cli.server_cmd import main; sys.exit(main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Relay:
    """``cipherpost server`` as a subprocess on a fixed port (so it can be restarted in place)."""

    data: Path
    flags: list[str] = dataclasses.field(default_factory=list)
    nofile: tuple[int, int] | None = None  # (soft, hard) RLIMIT_NOFILE for the relay process
    port: int = dataclasses.field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    log: Path = Path()

    def start(self) -> Relay:
        self.log = self.data.parent / f"{self.data.name}-stderr.log"
        nofile = self.nofile

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        with self.log.open("a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVER_MAIN, "server", "--port", str(self.port), "--data",
                 str(self.data), *self.flags], stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=limits)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("relay exited early: " + self.log.read_text())
            if line.startswith("cipherpost server listening on "):
                self.url = line.split(" on ", 1)[1].strip()
            if line.startswith("data directory: "):
                return self
        raise AssertionError("relay did not start")

    def stop(self) -> str:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.communicate(timeout=20)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
            self.proc = None
        return self.log.read_text()

    @property
    def cert(self) -> Path:
        return self.data / "tls-cert.pem"

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


async def client_from(relay: Relay, source_ip: str, url: str | None = None,
                      open_timeout: float = 10) -> RelayClient:
    """A ``RelayClient`` whose TCP connection comes from ``source_ip`` (any 127.x.y.z works)."""
    ctx = client_ssl_context(relay.cert)
    kwargs = {"local_addr": (source_ip, 0)} if url is None else {}
    ws = await connect(url or relay.url, ssl=ctx, max_size=2**22, compression=None, open_timeout=open_timeout,
                       **kwargs)
    der = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    hello = decode_frame(await ws.recv(), max_size=2**22)
    assert isinstance(hello, Hello)
    return RelayClient(ws, hello, hashlib.sha256(der).digest())


class DelayProxy:
    """Listens on 127.0.0.1; forwards to the relay from ``source_ip``, holding every chunk
    ``delay_s`` in each direction (round trip 2 x delay_s)."""

    def __init__(self, relay_port: int, source_ip: str, delay_s: float) -> None:
        self.relay_port = relay_port
        self.source_ip = source_ip
        self.delay_s = delay_s
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> DelayProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.relay_port,
                                                   local_addr=(self.source_ip, 0))
        for src, dst in ((reader, up_w), (up_r, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    dst.close()
                    return
                dst.write(data)

        out = asyncio.create_task(deliver())
        try:
            while True:
                data = await src.read(65536)
                await queue.put((time.monotonic() + self.delay_s, data))
                if not data:
                    break
            await out
        except (ConnectionError, OSError):
            pass
        finally:
            out.cancel()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
