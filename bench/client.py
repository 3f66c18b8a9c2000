"""Client speed through a real relay (issue 8, "Client speed").

    python bench/client.py catchup [--messages 10000] [--sessions 10] [--new 50] [--size 256]
    python bench/client.py send [--messages 2000] [--modes one,many] [--rounds 1] [--default-limits]

``send``: ``--messages`` messages from one ``Client`` to an offline contact, one at a time
(``Client.send``, each waiting for its ``accepted``) against a burst (``Client.send_many``: one
profile commit, 16 envelopes a frame with cap ``batch``). The session exists before the clock
starts; the clock stops when the outbox is empty (every message is on the relay). A relay's default
limits refuse a burst to one offline contact past ``--max-queue-per-sender`` (1000) and charge one
token of the connection's bucket (500/s, burst 1000) per message, so by default this run raises
both (the client is what is measured); ``--default-limits`` keeps them.

``catchup``: a recipient is offline while ``--sessions`` contacts with an existing session queue
messages of ``--size`` bytes of text and ``--new`` strangers send the first message of a new
session (PQXDH); ``--messages`` is the total queued. Then the recipient, already unlocked (Argon2id
is not timed), calls ``Client.receive()`` until the relay's queue is empty. Reported: messages per
second until the last message was committed and shown to a listener, the same until ``receive()``
returned (that includes its quiet-period wait when the relay does not announce ``drained``), and
the time from the call to the first message shown.

The relay is a ``cipherpost server`` subprocess (TLS, SQLite) on its default limits (except the
registrations per network, which only the setup uses). Its default
``max_queue`` is 10,000 messages per recipient, so with the defaults the contacts queue
``messages - new`` messages between them and the strangers the other ``new``. Profiles are created
with a cheap Argon2id (the key store's cost is not what is measured).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cipherpost.client.client import Client
from cipherpost.client.connection import parse_fingerprint
from cipherpost.crypto.keystore import Argon2Params

CHEAP_KDF = Argon2Params(memory_kib=64, iterations=1, lanes=1)
PASSPHRASE = "bench passphrase"


class Relay:
    def __init__(self, data: Path, extra: list[str] | None = None) -> None:
        self.data = data
        self.extra = extra or []
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.fingerprint = ""

    def __enter__(self) -> Relay:
        # Default limits, except registrations from one network: the setup registers 61 accounts
        # from 127.0.0.1 (the relay's default allows 20 per hour); nothing timed registers.
        cmd = [sys.executable, "-m", "cipherpost", "server", "--host", "127.0.0.1", "--port", "0",
               "--data", str(self.data), "--registrations-per-prefix-per-hour", "1000", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        while not (self.url and self.fingerprint):
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit("the relay exited early")
            if m := re.search(r"listening on (wss?://[\d.]+:\d+)", line):
                self.url = m.group(1)
            if m := re.search(r"TLS certificate fingerprint: (SHA256:[0-9a-f]{64})", line):
                self.fingerprint = m.group(1)
        import threading
        threading.Thread(target=lambda: [None for _ in self.proc.stdout or []], daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


async def _create(home: Path, name: str, relay: Relay) -> Client:
    client = await Client.create(home, name, relay.url, PASSPHRASE, kdf=CHEAP_KDF,
                                 server_fingerprint=parse_fingerprint(relay.fingerprint))
    await client.connect()
    return client


async def catchup(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp, Relay(Path(tmp) / "relay") as relay:
        home = Path(tmp)
        rcpt = await _create(home / "rcpt", "rcpt", relay)
        contacts = [await _create(home / f"c{i}", f"contact{i:02d}", relay) for i in range(args.sessions)]
        # Existing sessions: each contact has written once, and the recipient took it in.
        for c in contacts:
            await c.send("rcpt", "hello")
        await rcpt.receive(wait=5)
        for c in contacts:
            accept = getattr(rcpt, "accept_request", None)   # absent before message requests
            if accept is not None:
                accept(c.username)
            await rcpt.send(c.username, "hi")    # answered: the session is established both ways
        await rcpt.close()
        for c in contacts:
            await c.receive()
        text = "x" * args.size
        per_contact = (args.messages - args.new) // args.sessions
        t0 = time.perf_counter()

        async def queue(c: Client) -> None:
            for _ in range(per_contact):
                await c.send("rcpt", text)
        await asyncio.gather(*(queue(c) for c in contacts))
        for i in range(args.new):
            stranger = await _create(home / f"s{i}", f"stranger{i:02d}", relay)
            await stranger.send("rcpt", text)
            await stranger.close()
        total = per_contact * args.sessions + args.new
        print(f"queued {total} messages ({args.sessions} sessions x {per_contact}, {args.new} new "
              f"sessions) in {time.perf_counter() - t0:.1f}s (setup, not timed)", file=sys.stderr)
        for c in contacts:
            await c.close()

        rcpt = Client.open(home / "rcpt", "rcpt", PASSPHRASE)   # unlocking: not timed
        shown = 0
        first_at: float | None = None
        last_at = 0.0

        def listener(_m: Any) -> None:
            nonlocal shown, first_at, last_at
            shown += 1
            last_at = time.perf_counter()
            if first_at is None:
                first_at = last_at
        rcpt.add_listener(listener)
        profiler = None
        if args.profile:
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        start, cpu_start = time.perf_counter(), time.process_time()
        got = await rcpt.receive()
        end, cpu = time.perf_counter(), time.process_time() - cpu_start
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        await rcpt.close()
        texts = sum(1 for m in got if m.text == text)
        print(f"catch-up: {len(got)} shown ({texts} of {total} texts), listener saw {shown}")
        print(f"  until the last message was shown: {last_at - start:.2f}s = "
              f"{texts / (last_at - start):,.0f} msgs/s")
        print(f"  until receive() returned:          {end - start:.2f}s = "
              f"{texts / (end - start):,.0f} msgs/s")
        print(f"  first message shown after:         {((first_at or end) - start) * 1000:.0f} ms")
        print(f"  client CPU time in receive():      {cpu:.2f}s = {texts / cpu:,.0f} msgs per CPU-second "
              f"(the relay runs in its own process; os.getloadavg() = {os.getloadavg()[0]:.1f})")


async def send(args: argparse.Namespace) -> None:
    raised = [] if args.default_limits else ["--max-queue-per-sender", "1000000", "--max-queue", "1000000",
                                             "--rate", "1000000", "--rate-burst", "1000000"]
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp, Relay(Path(tmp) / "relay", raised) as relay:
        home = Path(tmp)
        print(f"{args.messages} messages of {args.size} characters from one Client to an offline contact; "
              f"relay limits: {'default' if args.default_limits else 'queue caps and bucket raised'}")
        run = 0
        for mode in args.modes:
            rates = []
            for _ in range(args.rounds):
                run += 1
                bob = await _create(home / f"bob{run}", f"bob{run}", relay)
                await bob.close()   # offline from here on
                alice = await _create(home / f"alice{run}", f"alice{run}", relay)
                await alice.send(bob.username, "hello")   # the session exists before the clock starts
                texts = [f"{i:05d}" + "x" * (args.size - 5) for i in range(args.messages)]
                start = time.perf_counter()
                if mode == "one":
                    for text in texts:
                        await alice.send(bob.username, text)
                else:
                    await alice.send_many([(bob.username, text) for text in texts])
                elapsed = time.perf_counter() - start
                assert alice.pending_outbox() == 0, "messages left in the outbox"
                await alice.close()
                rates.append(args.messages / elapsed)
            rates.sort()
            label = "send, one at a time" if mode == "one" else "send_many (cap batch)"
            print(f"{label:<24} {rates[len(rates) // 2]:>8.0f} msgs/s  (runs: "
                  f"{', '.join(f'{r:.0f}' for r in rates)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("catchup", help="an offline recipient catching up (Client.receive)")
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--new", type=int, default=50)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--profile", metavar="FILE", help="write cProfile stats of the timed part to FILE")
    p.set_defaults(func=catchup)
    p = sub.add_parser("send", help="a burst from one Client to an offline contact (send vs send_many)")
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--modes", type=lambda v: v.split(","), default=["one", "many"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--default-limits", action="store_true", help="keep the relay's default limits")
    p.set_defaults(func=send)
    args = parser.parse_args()
    asyncio.run(args.func(args))


if __name__ == "__main__":
    main()
