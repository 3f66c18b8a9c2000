"""``cipherpost server`` as a real subprocess: output contract, TLS files, restart and SIGTERM safety."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from relay_client import RelayClient
from relay_harness import REPO, SERVER_MAIN, ServerProcess, run

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Accepted, Send
from cipherpost.server.tls import certificate_der

SECRET_BODY = b"BODY-MARKER-must-never-be-logged"


def test_output_contract_and_tls_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data).start()
    try:
        assert server.url.startswith("wss://127.0.0.1:") and not server.url.endswith(":0")
        assert server.data_line == str(data)
        der = certificate_der(data / "tls-cert.pem")
        assert server.fingerprint == "SHA256:" + hashlib.sha256(der).hexdigest()
        assert stat.S_IMODE((data / "tls-key.pem").stat().st_mode) == 0o600
    finally:
        code, log = server.terminate()
    assert code == 0
    assert "event=listening" in log and "Traceback" not in log
    # the same certificate is reused on the next start
    again = ServerProcess(data).start()
    try:
        assert again.fingerprint == server.fingerprint
    finally:
        again.terminate()


def test_cli_refuses_plaintext_on_public_address(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SERVER_MAIN, "server", "--insecure-plaintext-dev", "--host",
                          "0.0.0.0", "--data", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "loopback" in out.stderr and out.stdout == ""


def test_data_dir_from_environment(tmp_path: Path) -> None:
    env_dir = tmp_path / "from-env"
    proc = subprocess.Popen([sys.executable, "-c", SERVER_MAIN, "server", "--port", "0"], cwd=REPO,
                            env={**os.environ, "CIPHERPOST_DATA": str(env_dir)}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert f"data directory: {env_dir}\n" in lines
        assert (env_dir / "relay.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=15)


async def _register(url: str, cert: Path, name: str) -> tuple[RelayClient, IdentityKeyPair]:
    identity = IdentityKeyPair.generate()
    client = await RelayClient.connect(url, cert)
    assert (await client.register(identity, name)).t == "ok"
    return client, identity


def test_restart_between_send_and_receive_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cert = data / "tls-cert.pem"
    server = ServerProcess(data).start()

    async def before() -> tuple[IdentityKeyPair, list[bytes]]:
        alice, _ = await _register(server.url, cert, "alice")
        bob, bob_id = await _register(server.url, cert, "bob")
        await bob.close()
        ids = []
        for i in range(20):
            reply = await alice.send("bob", SECRET_BODY + bytes([i]))
            assert isinstance(reply, Accepted)
            ids.append(reply.id)
        await alice.close()
        return bob_id, ids

    bob_id, ids = run(before())
    code, log = server.terminate()
    assert code == 0
    assert SECRET_BODY.decode() not in log  # no message bodies in logs
    server2 = ServerProcess(data).start()

    async def after() -> None:
        bob = await RelayClient.connect(server2.url, cert)
        assert (await bob.auth(bob_id, "bob")).t == "ok"
        got = await bob.receive_messages(20)
        assert [m.id for m in got] == ids
        assert [m.body for m in got] == [SECRET_BODY + bytes([i]) for i in range(20)]
        await bob.close()

    try:
        run(after())
    finally:
        server2.terminate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stop_under_load_loses_no_accepted_message(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM: graceful stop, exit 0. SIGKILL: a crash; still every ``accepted`` was committed."""
    data = tmp_path / "data"
    cert = data / "tls-cert.pem"
    server = ServerProcess(data).start()
    accepted: list[bytes] = []

    async def pump() -> IdentityKeyPair:
        alice, _ = await _register(server.url, cert, "alice")
        bob, bob_id = await _register(server.url, cert, "bob")
        await bob.close()

        async def one(i: int) -> None:
            msg_id = i.to_bytes(16, "big")
            try:
                reply = await alice.request(Send(rid=alice.rid(), to="bob", id=msg_id, kind="msg",
                                                 body=b"m"), timeout=10)
            except Exception:
                return  # connection closed by the shutdown before the reply: not accepted
            if isinstance(reply, Accepted):
                accepted.append(reply.id)

        async def sender() -> None:
            tasks = []
            for i in range(100_000):
                tasks.append(asyncio.create_task(one(i)))
                if i % 50 == 49:
                    await asyncio.sleep(0.005)
                if alice.ws.close_code is not None:
                    break
            await asyncio.gather(*tasks)

        task = asyncio.create_task(sender())
        while len(accepted) < 200:
            await asyncio.sleep(0.01)
        assert server.proc is not None
        server.proc.send_signal(sig)  # while sends are in flight
        await asyncio.wait_for(task, 20)
        await alice.close()
        return bob_id

    bob_id = run(pump(), timeout=60)
    assert server.proc is not None
    assert server.proc.wait(timeout=15) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert len(accepted) >= 200
    server2 = ServerProcess(data).start()

    async def check() -> None:
        bob = await RelayClient.connect(server2.url, cert)
        assert (await bob.auth(bob_id, "bob")).t == "ok"
        stored: set[bytes] = set()
        while True:
            try:
                batch = await bob.receive_messages(1, timeout=1.0)
            except TimeoutError:
                break
            stored.update(m.id for m in batch)
            while not bob.pushes.empty():
                frame = bob.pushes.get_nowait()
                stored.update(m.id for m in getattr(frame, "messages", []))
        missing = set(accepted) - stored
        assert not missing, f"{len(missing)} accepted messages were lost"
        await bob.close()

    try:
        run(check())
    finally:
        server2.terminate()
