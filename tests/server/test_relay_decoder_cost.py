"""A hostile frame costs the relay memory in proportion to its size, not to what it declares.

msgpack's unpackb allocates each array at its declared length before reading the items, so a frame
of nested, never-filled array headers (256 KiB, sent before authenticating) made the relay process
allocate ~68 MiB per frame. The frame decoder now checks the bytes form one complete value first
(``crypto/encoding.py:is_one_msgpack_value``). Measured on a real relay process: its peak resident
memory (``VmHWM``) before and after a burst of such frames."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay_client import RelayClient
from relay_harness import ServerProcess, run

from cipherpost.protocol.frames import Error, Ping, Pong

MIB = 1024 * 1024
HOSTILE_FRAMES = [
    b"\xdd\x00\x01\x86\x9f" * (250_000 // 5),    # nested array32 of 99,999 items each
    b"\xdc\xff\xff" * (250_000 // 3),            # nested array16 of 65,535 items each
]


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_nested_array_frames_do_not_inflate_relay_memory(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "relay").start()
    assert server.proc is not None
    try:
        async def scenario() -> None:
            cert = tmp_path / "relay" / "tls-cert.pem"
            bystander = await RelayClient.connect(server.url, cert)
            attacker = await RelayClient.connect(server.url, cert)
            assert isinstance(await bystander.request(Ping(rid=1)), Pong)
            before = peak_rss(server.proc.pid)  # type: ignore[union-attr]
            for _ in range(4):
                for frame in HOSTILE_FRAMES:
                    await attacker.send_raw(frame)
                    error = await attacker.next_push(timeout=20)
                    assert isinstance(error, Error) and error.code == "bad_frame"
            assert isinstance(await bystander.request(Ping(rid=2)), Pong)
            grown = peak_rss(server.proc.pid) - before  # type: ignore[union-attr]
            assert grown < 16 * MIB, f"relay peak memory grew by {grown / MIB:.0f} MiB"
            await asyncio.gather(attacker.close(), bystander.close())
        run(scenario(), timeout=60)
    finally:
        _, stderr = server.terminate()
        assert "Traceback" not in stderr
