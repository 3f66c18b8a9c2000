"""Group chat costs (issue 12; docs/groups.md), three measurements:

    python bench/groups.py [--sizes 10,100,1000] [--messages 200] [--receivers 100] [--fanouts 20]

1. Sender CPU per group message at each group size: what ``client/groups.py:Groups.send`` computes
   per message (pad, Sender Keys encrypt + Ed25519 sign, the ``send_many`` frame with the size's
   recipient list), process CPU time averaged over ``--messages``. Goal: independent of the size
   beyond the fan-out list.
2. Relay fan-out throughput, recipient deliveries per second, against 1:1 ``send`` in the same run:
   a real relay subprocess (TLS, SQLite synchronous=FULL, ``bench/relay.py``'s settings), one
   sender, ``--receivers`` connected receivers that ack every delivery. Fan-out: ``--fanouts``
   ``send_many`` frames to all receivers; 1:1: the same number of deliveries as single ``send``s.
   Each sender keeps at most 8 frames unanswered.
3. The cost of a removal (lazy rotation, docs/groups.md section 4) at 100 and 1000 members: every
   remaining member makes a fresh chain and sends it to every other remaining member over an
   established pairwise Double Ratchet session. Measured: one member's CPU for its redistribution
   (rotate, then one ratchet-encrypted ``skd`` per other member), and the group-wide totals.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path

import msgpack
from websockets.asyncio.client import ClientConnection

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay import RelayLoad, start_relay

from cipherpost.client.group_receive import _ad
from cipherpost.client.group_state import distribution_id
from cipherpost.client.group_wire import encode_control, encode_text
from cipherpost.client.groups import _pad
from cipherpost.crypto.encoding import pack
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.prekey_store import PrekeyStore
from cipherpost.crypto.prekeys import PrekeyBundle
from cipherpost.crypto.sender_keys import (
    create_sender_key,
    distribution_message,
    group_encrypt,
    rotate_sender_key,
)
from cipherpost.crypto.session import accept_session, decrypt, encrypt, initiate_session

TEXT = "x" * 100


def sender_cpu(sizes: list[int], messages: int) -> None:
    print(f"1. sender CPU per group message ({len(TEXT)}-character text, {messages} messages per size)")
    print(f"{'members':>8} {'us/msg':>8} {'of which frame':>15} {'body bytes':>11} {'frame bytes':>12}")
    gid = os.urandom(32)
    for n in sizes:
        recipients = [f"member{i:04d}" for i in range(n - 1)]
        record = create_sender_key(distribution_id(gid))
        start = time.process_time()
        frame_cpu = 0.0
        size = frame_size = 0
        for _ in range(messages):
            plaintext = _pad(encode_text(TEXT, 1_800_000_000_000, "alice", gid, 3))
            body, record = group_encrypt(record, plaintext, _ad(gid, "alice"))
            t = time.process_time()
            frame = msgpack.packb({"v": 1, "t": "send_many", "rid": 1, "id": os.urandom(16), "kind": "grp",
                                   "body": body, "to": recipients})
            frame_cpu += time.process_time() - t
            size, frame_size = len(body), len(frame)
        per = (time.process_time() - start) / messages * 1e6
        print(f"{n:>8} {per:>8.1f} {frame_cpu / messages * 1e6:>15.1f} {size:>11} {frame_size:>12}")


async def one_mode(load: RelayLoad, mode: str, receivers: int, fanouts: int) -> None:
    deliveries = receivers * fanouts
    load.round += 1
    names = [f"g{load.round}-r{i}" for i in range(receivers)]
    sender = await load.user(f"g{load.round}-sender")
    conns = [await load.user(n) for n in names]
    got = [0]
    done = asyncio.Event()
    window = asyncio.Semaphore(8)

    async def drain(ws: ClientConnection) -> None:
        async for data in ws:
            frame = msgpack.unpackb(data)
            if frame["t"] == "deliver":
                got[0] += len(frame["messages"])
                seqs = [m["seq"] for m in frame["messages"]]
                await ws.send(msgpack.packb({"v": 1, "t": "ack", "seqs": seqs}))
                if got[0] >= deliveries:
                    done.set()

    async def replies() -> None:
        async for data in sender:
            frame = msgpack.unpackb(data)
            assert frame["t"] in ("results", "accepted"), frame
            if frame["t"] == "results":
                assert set(frame["status"]) == {"accepted"}, set(frame["status"])
            window.release()

    tasks = [asyncio.create_task(drain(ws)) for ws in conns]
    body = os.urandom(300)
    if mode == "fan-out":
        frames = [{"v": 1, "t": "send_many", "rid": k + 2, "id": os.urandom(16), "kind": "grp",
                   "body": body, "to": names} for k in range(fanouts)]
    else:
        frames = [{"v": 1, "t": "send", "rid": k + 2, "to": names[k % receivers],
                   "id": os.urandom(16), "kind": "msg", "body": body} for k in range(deliveries)]
    start = time.perf_counter()
    reader = asyncio.create_task(replies())
    for f in frames:
        await window.acquire()
        await sender.send(msgpack.packb(f))
    await asyncio.wait_for(done.wait(), timeout=300)
    elapsed = time.perf_counter() - start
    print(f"  {mode:<8} {deliveries / elapsed:>9.0f} deliveries/s  ({len(frames)} frames, "
          f"{elapsed:.2f} s until the last delivery)")
    for t in [*tasks, reader]:
        t.cancel()
    for ws in [sender, *conns]:
        await ws.close()


async def relay_fanout(receivers: int, fanouts: int) -> None:
    print(f"\n2. relay deliveries/s: 1 sender, {receivers} receivers, {receivers * fanouts} deliveries each "
          "way (real relay subprocess, TLS, SQLite synchronous=FULL)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "relay"
        proc, url, fingerprint = start_relay(data)
        try:
            ctx = ssl.create_default_context(cafile=str(data / "tls-cert.pem"))
            load = RelayLoad(url, ctx, bytes.fromhex(fingerprint))
            for mode in ("fan-out", "1:1"):
                await one_mode(load, mode, receivers, fanouts)
        finally:
            proc.terminate()
            proc.wait(timeout=15)


def removal_cost(sizes: list[int]) -> None:
    print("\n3. cost of a removal (each remaining member rotates and re-sends its sender key pairwise)")
    alice, bob = IdentityKeyPair.generate(), IdentityKeyPair.generate()
    _, store = PrekeyStore.empty().rotate_signed_prekey(bob, 0)
    _, store = store.new_last_resort_kem_prekey(bob)
    bundle_parts = store
    spk = bundle_parts.current_signed_prekey
    assert spk is not None
    kems, store = store.new_kem_prekeys(bob, 1)
    otpks, store = store.new_one_time_prekeys(1)
    bundle = PrekeyBundle.from_parts(bob.public.encode(), spk.encode(), kems[0].encode(), otpks[0].encode())
    session = initiate_session(alice, bundle)
    first, session = encrypt(session, b"hello")
    _, reply_session, _ = accept_session(bob, store, first)
    back, _ = encrypt(reply_session, b"hi")
    _, session = decrypt(session, back)    # the ratchet has turned: a steady-state sending chain
    gid = os.urandom(32)
    print(f"{'members':>8} {'one member ms':>14} {'pairwise msgs':>14} {'group-wide CPU s':>17} "
          f"{'group-wide MB':>14}")
    for n in sizes:
        own = create_sender_key(distribution_id(gid))
        start = time.process_time()
        own = rotate_sender_key(own)
        content = encode_control("skd", gid, distribution_message(own).encode())
        size = 0
        s = session
        for i in range(n - 2):   # every other remaining member
            payload = _pad(pack([1, "group", content, 1_800_000_000_000, "alice", f"member{i:04d}"]))
            envelope, s = encrypt(s, payload)
            _ = s.serialize()    # stored before it is sent
            size = len(envelope)
        one = time.process_time() - start
        messages = (n - 1) * (n - 2)
        print(f"{n:>8} {one * 1e3:>14.1f} {messages:>14} {one * (n - 1):>17.1f} "
              f"{messages * size / 1e6:>14.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--receivers", type=int, default=100)
    parser.add_argument("--fanouts", type=int, default=20)
    parser.add_argument("--removal-sizes", default="100,1000")
    args = parser.parse_args()
    sender_cpu([int(x) for x in args.sizes.split(",")], args.messages)
    asyncio.run(relay_fanout(args.receivers, args.fanouts))
    removal_cost([int(x) for x in args.removal_sizes.split(",")])


if __name__ == "__main__":
    main()
