"""Helpers for relay tests: a real RelayServer on 127.0.0.1 with real TLS and a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from relay_client import RelayClient

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.prekeys import KemPrekey, OneTimePrekey, SignedPrekey
from cipherpost.protocol.frames import UploadPrekeys
from cipherpost.server.app import RelayServer
from cipherpost.server.config import ServerConfig

REPO = Path(__file__).resolve().parents[2]


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
    """Run one test scenario on a fresh event loop (no pytest plugin needed)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# Set by the relay_backend fixture (conftest.py): the store a parametrised suite runs against.
BACKEND_OVERRIDES: dict[str, Any] = {}


@contextlib.asynccontextmanager
async def relay(data: Path, **overrides: Any) -> AsyncIterator[RelayServer]:
    config = ServerConfig(data_dir=data, port=0, **{**BACKEND_OVERRIDES, **overrides})
    server = RelayServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class Harness:
    """A running server plus helpers to make registered users."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.cert = None if server.cert_fingerprint is None else server.config.data_dir / "tls-cert.pem"
        self.clients: list[RelayClient] = []

    async def connect(self) -> RelayClient:
        client = await RelayClient.connect(self.server.url, self.cert)
        self.clients.append(client)
        return client

    async def user(self, name: str) -> tuple[RelayClient, IdentityKeyPair]:
        identity = IdentityKeyPair.generate()
        client = await self.connect()
        reply = await client.register(identity, name)
        assert reply.t == "ok", reply
        return client, identity

    async def close(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                await c.close()


@contextlib.asynccontextmanager
async def harness(data: Path, **overrides: Any) -> AsyncIterator[Harness]:
    async with relay(data, **overrides) as server:
        h = Harness(server)
        try:
            yield h
        finally:
            await h.close()


def x25519_public() -> bytes:
    return x25519.X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def mlkem_public() -> bytes:
    return mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw()


def prekey_upload(identity: IdentityKeyPair, rid: int, *, one_time: int = 0, kem: int = 0,
                  first_id: int = 1, signed: bool = True, last_resort: bool = True) -> UploadPrekeys:
    spk = SignedPrekey.create(identity, 1, x25519_public(), 1_700_000_000).encode()
    lrk = KemPrekey.create(identity, 100_000, mlkem_public(), True).encode()
    return UploadPrekeys(
        rid=rid,
        signed_prekey=spk if signed else None,
        one_time=[OneTimePrekey(first_id + i, x25519_public()).encode() for i in range(one_time)],
        kem_one_time=[KemPrekey.create(identity, first_id + i, mlkem_public(), False).encode()
                      for i in range(kem)],
        kem_last_resort=lrk if last_resort else None,
    )


SERVER_MAIN = "import sys; from cipherpost.cli.server_cmd import main; sys.exit(main(sys.argv[1:]))"


@dataclasses.dataclass
class ServerProcess:
    """``cipherpost server`` as a real subprocess; parses the lines it promises on stdout."""

    data: Path
    extra: list[str] = dataclasses.field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    fingerprint: str = ""
    data_line: str = ""
    stderr_path: Path = Path()

    def start(self) -> ServerProcess:
        self.url = self.fingerprint = self.data_line = ""
        self.stderr_path = self.data.parent / f"{self.data.name}-stderr.log"
        err = self.stderr_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_MAIN, "server", "--port", "0", "--data", str(self.data),
             *self.extra],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        err.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (self.url and self.fingerprint and self.data_line):
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("server exited early: " + self.stderr_path.read_text())
            if line.startswith("cipherpost server listening on "):
                self.url = line.split(" on ", 1)[1].strip()
            elif line.startswith("TLS certificate fingerprint: "):
                self.fingerprint = line.split(": ", 1)[1].strip()
            elif line.startswith("data directory: "):
                self.data_line = line.split(": ", 1)[1].strip()
        return self

    def terminate(self, timeout: float = 15) -> tuple[int, str]:
        """SIGTERM, wait, and return (exit code, everything it logged on stderr)."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.communicate(timeout=timeout)
        return self.proc.returncode, self.stderr_path.read_text()
