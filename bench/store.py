"""The relay store alone: CPU per message on its 1:1 hot path, and fan-out deliveries per second.

    PYTHONPATH=src python bench/store.py [--pairs 1,10] [--messages 20000] [--fanout 0,10,100] [--rounds 3]

1:1: ``--pairs`` senders each keep 16 sends in flight to their own recipient through
``enqueue_then`` (the server's path), and every committed message is acked with ``ack_later``,
as a connected recipient does. Reported per message: process CPU, and the CPU of the store's writer
thread alone (its share of a relay's server CPU). Fan-out: ``enqueue_many`` to groups of G
recipients, 16 in flight; reported in recipient-deliveries per second and writer CPU per delivery.
SQLite with synchronous=FULL in a temporary directory; each configuration runs ``--rounds`` times and
the run with the least writer CPU is shown (the least disturbed by other load on the machine).
Comparing two versions: run the same command with each one's ``src`` on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cipherpost.store.base import EnqueueResult, NewMessage, StoreError
from cipherpost.store.sqlite import SqliteRelayStore

WINDOW = 16
BODY = os.urandom(256)


def _measure_writer(store: SqliteRelayStore) -> Callable[[], float]:
    """Patch the store's writer thread to record its CPU time; returns a reader of it."""
    spent = [0.0]
    run = store._run

    def timed(ready: Any) -> None:
        start = time.thread_time()
        try:
            run(ready)
        finally:
            spent[0] = time.thread_time() - start

    store._run = timed  # type: ignore[method-assign]
    return lambda: spent[0]


async def one_to_one(pairs: int, total: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteRelayStore(Path(tmp) / "relay.db")
        writer_cpu = _measure_writer(store)
        await store.open()
        for i in range(pairs):
            await store.create_account(f"sender{i:04d}", b"i" * 64, 0)
            await store.create_account(f"recipient{i:04d}", b"i" * 64, 0)
        done = asyncio.Event()
        counts = {"sent": 0, "left": total}

        def submit(p: int) -> None:
            counts["sent"] += 1
            message = NewMessage(sender=f"sender{p:04d}", recipient=f"recipient{p:04d}",
                                 msg_id=os.urandom(16), kind="msg", body=BODY, ts=int(time.time() * 1000))
            store.enqueue_then(message, 10_000_000, lambda r, e: committed(p, r, e))

        def committed(p: int, result: EnqueueResult | None, error: StoreError | None) -> None:
            assert result is not None, error
            store.ack_later(f"recipient{p:04d}", [result.seq])
            counts["left"] -= 1
            if counts["left"] == 0:
                done.set()
            elif counts["sent"] < total:
                submit(p)

        cpu0, wall0 = time.process_time(), time.perf_counter()
        for p in range(pairs):
            for _ in range(WINDOW):
                if counts["sent"] < total:
                    submit(p)
        await done.wait()
        await store.close()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        return total / wall, cpu / total * 1e6, writer_cpu() / total * 1e6


async def fan_out(group: int, total: int) -> tuple[float, float]:
    from cipherpost.store.base import Delivery, MailboxPolicy

    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteRelayStore(Path(tmp) / "relay.db")
        writer_cpu = _measure_writer(store)
        await store.open()
        members = [f"member{i:04d}" for i in range(group)]
        await asyncio.gather(*[store.create_account(name, b"i" * 64, 0) for name in ["sender", *members]])
        policy = MailboxPolicy(max_queue=10_000_000, max_queue_per_sender=10_000_000, max_stored_bytes=2**40)
        sends = max(1, total // group)
        left = [sends]
        done = asyncio.Event()
        in_flight = asyncio.Semaphore(WINDOW)

        async def send() -> None:
            async with in_flight:
                delivery = Delivery(sender="sender", msg_id=os.urandom(16), kind="msg", body=BODY,
                                    ts=int(time.time() * 1000), recipients=members)
                results = await store.enqueue_many(delivery, policy)
            for r in results:
                assert r.seq is not None
                store.ack_later(r.recipient, [r.seq])
            left[0] -= 1
            if left[0] == 0:
                done.set()

        wall0 = time.perf_counter()
        tasks = [asyncio.create_task(send()) for _ in range(sends)]
        await done.wait()
        await asyncio.gather(*tasks)
        await store.close()
        deliveries = sends * group
        return deliveries / (time.perf_counter() - wall0), writer_cpu() / deliveries * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--fanout", type=lambda s: [int(x) for x in s.split(",") if x != "0"],
                        default=[10, 100], help="group sizes; 0 for none (a store without enqueue_many)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    assert threading.current_thread() is threading.main_thread()
    print(f"256-byte bodies, {WINDOW} in flight per sender, {args.messages} messages per run, SQLite FULL; "
          f"best of {args.rounds} runs by writer CPU")
    print(f"{'1:1 pairs':>10} {'msgs/s':>8} {'process us/msg':>15} {'writer us/msg':>14}")
    for pairs in args.pairs:
        runs = [asyncio.run(one_to_one(pairs, args.messages)) for _ in range(args.rounds)]
        rate, cpu, writer = min(runs, key=lambda r: r[2])
        print(f"{pairs:>10} {rate:>8.0f} {cpu:>15.1f} {writer:>14.1f}")
    if args.fanout:
        print(f"{'fan-out G':>10} {'deliveries/s':>13} {'writer us/delivery':>19}")
    for group in args.fanout:
        fans = [asyncio.run(fan_out(group, args.messages)) for _ in range(args.rounds)]
        rate, writer = min(fans, key=lambda r: r[1])
        print(f"{group:>10} {rate:>13.0f} {writer:>19.2f}")


if __name__ == "__main__":
    main()
