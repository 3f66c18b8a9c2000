"""What the account checks cost a login: ``auth`` with and without the login counter.

    python bench/logins.py [--accounts 200] [--rounds 3] [--concurrency 1,50]

A real relay subprocess (TLS, SQLite with synchronous=FULL) on 127.0.0.1. Each login opens a TLS
WebSocket, reads ``hello``, signs the nonce and waits for ``ok``, then closes. With ``counter`` the
relay also reads the account's state and stores the counter (one durable write per login, group-
committed with whatever else is in flight); without it (the account never used one), it reads the
state only. Reports logins/s, the median of ``--rounds`` runs of all accounts, per concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

from cipherpost.crypto.encoding import pack
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Auth, Hello, Ok, Register, decode_frame, encode_frame

SERVER_MAIN = "import sys; from cipherpost.cli.server_cmd import main; sys.exit(main(sys.argv[1:]))"
REPO = Path(__file__).resolve().parents[1]


async def _session(url: str, ctx: ssl.SSLContext, frame_for: object) -> None:
    async with connect(url, ssl=ctx, compression=None) as ws:
        der = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        channel = hashlib.sha256(der).digest()
        hello = decode_frame(await ws.recv())  # type: ignore[arg-type]
        assert isinstance(hello, Hello)
        await ws.send(encode_frame(frame_for(hello.nonce, channel)))  # type: ignore[operator]
        reply = decode_frame(await ws.recv())  # type: ignore[arg-type]
        assert isinstance(reply, Ok), reply


async def _register(url: str, ctx: ssl.SSLContext, name: str, identity: IdentityKeyPair) -> None:
    await _session(url, ctx, lambda nonce, ch: Register(
        rid=1, username=name, identity=identity.public.encode(),
        sig=identity.sign("register", pack([nonce, ch, name]))))


async def _login(url: str, ctx: ssl.SSLContext, sem: asyncio.Semaphore, name: str, identity: IdentityKeyPair,
                 counter: int | None) -> None:
    async with sem:
        await _session(url, ctx, lambda nonce, ch: Auth(
            rid=1, username=name, sig=identity.sign("auth", pack([nonce, ch, name])), counter=counter))


async def main_async(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="cipherpost-bench-logins-"))
    env = dict(os.environ)
    extra = ["--registrations-per-prefix-per-hour", "100000"]  # every account comes from 127.0.0.1
    if args.server_src is not None:
        env["PYTHONPATH"] = str(args.server_src)
        extra = []  # the first slice had no registration limit (nor the flag)
    proc = subprocess.Popen([sys.executable, "-c", SERVER_MAIN, "server", "--port", "0", "--data", str(data),
                             "--rate", "100000", "--max-connections-per-ip", "100000", *extra,
                             "--log-level", "warning"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    assert proc.stdout is not None
    url = ""
    while not url:
        line = proc.stdout.readline()
        if line.startswith("cipherpost server listening on "):
            url = line.split(" on ", 1)[1].strip()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        users = [(f"user{i:05d}", IdentityKeyPair.generate()) for i in range(args.accounts)]
        for name, identity in users:
            await _register(url, ctx, name, identity)
        counters = itertools.count(1)
        for concurrency in args.concurrency:
            for mode in ("no counter",) if args.server_src else ("no counter", "counter"):
                rates = []
                for _ in range(args.rounds):
                    counter = None if mode == "no counter" else next(counters)
                    sem = asyncio.Semaphore(concurrency)
                    start = time.perf_counter()
                    await asyncio.gather(*(_login(url, ctx, sem, n, i, counter) for n, i in users))
                    rates.append(len(users) / (time.perf_counter() - start))
                print(f"concurrency {concurrency:>3}  {mode:<10}  {statistics.median(rates):7.0f} logins/s "
                      f"(runs: {', '.join(f'{r:.0f}' for r in rates)})", flush=True)
            # once an account has used a counter it must keep doing so: fresh accounts for the next
            users = [(f"c{concurrency}-{n}", IdentityKeyPair.generate()) for n, _ in users]
            for name, identity in users:
                await _register(url, ctx, name, identity)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 50])
    parser.add_argument("--server-src", type=Path, default=None,
                        help="run the relay from this source tree (e.g. an older commit's src/, to compare; "
                             "only 'no counter' is measured then)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
