"""Client send speed (issue 8, "Client speed"): N messages from one ``Client`` to an offline contact
through a real relay process (TLS, SQLite synchronous=FULL), one at a time (``Client.send``, each
waiting for its ``accepted``) against a burst (``Client.send_many``: one profile commit, 16
envelopes a frame with cap ``batch``). The session is set up (and profiles unlocked) before the
clock starts; the clock stops when the outbox is empty, i.e. every message is on the relay.

    python bench/client.py [--messages 2000] [--modes one,many] [--relay-arg=--rate ...]

A relay's default limits refuse a burst to an offline contact past ``--max-queue-per-sender``
(1000) and charge one token of the connection's bucket (500/s, burst 1000) per message; by default
this raises both so that the client is measured (pass ``--default-limits`` to keep them).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cipherpost.client.client import Client
from cipherpost.crypto.keystore import Argon2Params

REPO = Path(__file__).resolve().parents[1]
FAST_KDF = Argon2Params(memory_kib=8 * 1024, iterations=1, lanes=1)  # unlocking is not timed
PASSPHRASE = "bench passphrase"


def start_relay(data: Path, extra: list[str]) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen([sys.executable, "-m", "cipherpost", "server", "--host", "127.0.0.1",
                             "--port", "0", "--data", str(data), "--log-level", "warning",
                             "--metrics-listen", "off", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    assert proc.stdout is not None
    url = fingerprint = ""
    while not (url and fingerprint):
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("relay failed to start")
        if m := re.search(r"listening on (wss?://\S+)", line):
            url = m.group(1)
        if m := re.search(r"TLS certificate fingerprint: SHA256:([0-9a-f]{64})", line):
            fingerprint = m.group(1)
    return proc, url, fingerprint


async def one_run(tmp: Path, url: str, fingerprint: str, mode: str, n: int, run: int) -> float:
    fp = bytes.fromhex(fingerprint)
    bob_name, alice_name = f"bob{run}", f"alice{run}"
    bob = await Client.create(tmp / f"home-{bob_name}", bob_name, url, PASSPHRASE, server_fingerprint=fp,
                              kdf=FAST_KDF)
    await bob.close()   # offline from here on
    alice = await Client.create(tmp / f"home-{alice_name}", alice_name, url, PASSPHRASE,
                                server_fingerprint=fp, kdf=FAST_KDF)
    try:
        if not alice.connected:
            await alice.connect()
        await alice.send(bob_name, "hello")  # the session exists before the clock starts
        texts = [f"message {i:05d} " + "x" * 200 for i in range(n)]
        start = time.perf_counter()
        if mode == "one":
            for text in texts:
                await alice.send(bob_name, text)
        else:
            await alice.send_many([(bob_name, text) for text in texts])
        elapsed = time.perf_counter() - start
        assert alice.pending_outbox() == 0, "messages left in the outbox"
        return elapsed
    finally:
        await alice.close()


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        extra = [] if args.default_limits else ["--max-queue-per-sender", "1000000", "--max-queue", "1000000",
                                                "--rate", "1000000", "--rate-burst", "1000000"]
        proc, url, fingerprint = start_relay(tmp / "relay", extra + args.relay_arg)
        try:
            print(f"{args.messages} messages of ~230 characters from one Client to an offline contact; "
                  f"relay limits {'default' if args.default_limits else 'raised (queue caps, bucket)'}")
            run = 0
            for mode in args.modes:
                rates = []
                for _ in range(args.rounds):
                    run += 1
                    elapsed = await one_run(tmp, url, fingerprint, mode, args.messages, run)
                    rates.append(args.messages / elapsed)
                rates.sort()
                label = "send, one at a time" if mode == "one" else "send_many (cap batch)"
                print(f"{label:<24} {rates[len(rates) // 2]:>8.0f} msgs/s  (runs: "
                      f"{', '.join(f'{r:.0f}' for r in rates)})", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["one", "many"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--default-limits", action="store_true", help="keep the relay's default limits")
    parser.add_argument("--relay-arg", action="append", default=[], help="extra relay argument (repeat)")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
