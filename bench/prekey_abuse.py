"""A legitimate send's latency while abusive accounts re-upload the same 150 signed KEM prekeys.

    python bench/prekey_abuse.py [--abusers 4] [--seconds 10]

Issue 9 measured 4 such accounts taking a legitimate send from ~1 ms to ~180 ms on the first-slice
relay (150 signature checks and an fsynced ~200 KB write per upload frame). The relay now checks
ids and pool sizes before any signature and limits uploads per account in keys, so the abusive
uploads are refused cheaply. Prints send -> accepted latency (p50 / p99) without and with the
abusers, how many abusive uploads were accepted and refused, and the relay's CPU per second.
Runs ``cipherpost server`` as a subprocess (``bench/relay.py:start_relay``: TLS, SQLite FULL).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import mlkem
from websockets.asyncio.client import ClientConnection, connect

from cipherpost.crypto.encoding import pack
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.prekeys import KemPrekey
from cipherpost.protocol.frames import (
    Ack,
    Deliver,
    Hello,
    Register,
    Send,
    UploadPrekeys,
    decode_frame,
    encode_frame,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay import cpu_seconds, start_relay


async def open_user(url: str, ctx: ssl.SSLContext, name: str) -> tuple[ClientConnection, IdentityKeyPair]:
    ws = await connect(url, ssl=ctx, max_size=2**22, compression=None)
    der = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    hello = decode_frame(await ws.recv(), max_size=2**22)  # type: ignore[arg-type]
    assert isinstance(hello, Hello)
    identity = IdentityKeyPair.generate()
    sig = identity.sign("register", pack([hello.nonce, hashlib.sha256(der).digest(), name]))
    await ws.send(encode_frame(Register(rid=1, username=name, identity=identity.public.encode(), sig=sig)))
    reply = decode_frame(await ws.recv(), max_size=2**22)  # type: ignore[arg-type]
    assert reply.t == "ok", reply
    return ws, identity


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(q * len(data)))] * 1000 if data else float("nan")


async def measure(alice: ClientConnection, seconds: float, rid0: int) -> list[float]:
    """Sends one message at a time to bob for ``seconds``; send -> accepted latencies."""
    out = []
    deadline = time.monotonic() + seconds
    rid = rid0
    while time.monotonic() < deadline:
        rid += 1
        start = time.perf_counter()
        send = Send(rid=rid, to="bob", id=os.urandom(16), kind="msg", body=bytes(256))
        await alice.send(encode_frame(send))
        while True:
            frame = decode_frame(await alice.recv(), max_size=2**22)  # type: ignore[arg-type]
            if getattr(frame, "rid", None) == rid:
                assert frame.t == "accepted", frame
                break
        out.append(time.perf_counter() - start)
        await asyncio.sleep(0.005)
    return out


async def main(abusers: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "relay"
        proc, url, _ = start_relay(data)
        try:
            ctx = ssl.create_default_context(cafile=str(data / "tls-cert.pem"))
            alice, _ = await open_user(url, ctx, "alice")
            bob, _ = await open_user(url, ctx, "bob")

            async def bob_acks() -> None:
                async for raw in bob:
                    frame = decode_frame(raw, max_size=2**22)  # type: ignore[arg-type]
                    if isinstance(frame, Deliver):
                        await bob.send(encode_frame(Ack(seqs=[m.seq for m in frame.messages])))

            acker = asyncio.create_task(bob_acks())
            quiet = await measure(alice, seconds / 2, 0)
            bad = [await open_user(url, ctx, f"abuser{i}") for i in range(abusers)]
            frames = [UploadPrekeys(rid=0, kem_one_time=[
                KemPrekey.create(identity, 1 + k, mlkem.MLKEM768PrivateKey.generate().public_key()
                                 .public_bytes_raw(), False).encode() for k in range(150)])
                for _, identity in bad]
            counts = {"ok": 0, "refused": 0}
            stop = False

            async def abuse(ws: ClientConnection, frame: UploadPrekeys) -> None:
                rid = 1
                while not stop:
                    rid += 1
                    await ws.send(encode_frame(UploadPrekeys(rid=rid, kem_one_time=frame.kem_one_time)))
                    reply = decode_frame(await ws.recv(), max_size=2**22)  # type: ignore[arg-type]
                    counts["ok" if reply.t == "ok" else "refused"] += 1

            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            tasks = [asyncio.create_task(abuse(ws, f)) for (ws, _), f in zip(bad, frames, strict=True)]
            await asyncio.sleep(0.5)
            loaded = await measure(alice, seconds, 10**6)
            stop = True
            await asyncio.wait(tasks, timeout=5)
            cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
            acker.cancel()
            print(f"legitimate send -> accepted, quiet:        p50 {pct(quiet, .5):6.2f} ms  "
                  f"p99 {pct(quiet, .99):6.2f} ms  ({len(quiet)} sends)")
            print(f"legitimate send -> accepted, {abusers} abusers:    p50 {pct(loaded, .5):6.2f} ms  "
                  f"p99 {pct(loaded, .99):6.2f} ms  ({len(loaded)} sends)")
            print(f"abusive uploads of 150 KEM prekeys: {counts['ok']} accepted, "
                  f"{counts['refused']} refused; relay CPU {cpu * 100:.0f}% of a core while abused")
        finally:
            proc.terminate()
            proc.wait(timeout=15)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--abusers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main(args.abusers, args.seconds))
