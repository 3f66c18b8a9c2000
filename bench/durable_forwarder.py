"""A durable TLS forwarder: the floor under the relay's cost per message (run by bench/relay.py).

It speaks the relay's frames to the same load generator (``hello``; ``register`` accepted without
any check; ``send`` with one envelope or with ``envelopes``; ``accepted`` / ``accepted_many`` after
the commit; ``deliver`` to a connected recipient; ``ack`` deletes) and does only what durability
needs: TLS WebSocket, SQLite WAL with synchronous=FULL, one writer thread committing every pending
request in one transaction (group commit), a dedup insert per message and the message insert. No
signatures, no name or size checks, no limits, no sync of stored mail on connect (the benchmark's
receivers connect first), no metrics.

    python bench/durable_forwarder.py DB CERT KEY     # prints its port, then serves until killed
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import ssl
import sys
import threading
import time
from collections import defaultdict
from typing import Any

import msgpack
from websockets.asyncio.server import ServerConnection, serve

Job = tuple[ServerConnection, int, list[tuple[str, str, bytes, bytes, int]], bool]  # ws, rid, envs, batch


class Writer:
    """One thread, one SQLite connection; each loop commits everything that queued meanwhile."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS messages(recipient TEXT, seq INTEGER, sender TEXT, "
                        "id BLOB, body BLOB, ts INTEGER, PRIMARY KEY(recipient, seq))")
        self.db.execute("CREATE TABLE IF NOT EXISTS sent(sender TEXT, id BLOB, seq INTEGER, "
                        "PRIMARY KEY(sender, id))")
        self.loop = loop
        self.cond = threading.Condition()
        self.jobs: list[Job] = []
        self.acks: list[tuple[str, list[int]]] = []
        self.seq: dict[str, int] = defaultdict(int)
        threading.Thread(target=self.run, daemon=True).start()

    def submit(self, job: Job) -> None:
        with self.cond:
            self.jobs.append(job)
            self.cond.notify()

    def ack(self, who: str, seqs: list[int]) -> None:
        with self.cond:
            self.acks.append((who, seqs))
            self.cond.notify()

    def run(self) -> None:
        db = self.db
        while True:
            with self.cond:
                while not self.jobs and not self.acks:
                    self.cond.wait()
                jobs, self.jobs = self.jobs, []
                acks, self.acks = self.acks, []
            done = []
            db.execute("BEGIN")
            for ws, rid, envs, batch in jobs:
                status = []
                for sender, to, msg_id, body, ts in envs:
                    seq = self.seq[to] + 1
                    dedup = db.execute("INSERT OR IGNORE INTO sent VALUES (?, ?, ?)", (sender, msg_id, seq))
                    if dedup.rowcount:
                        self.seq[to] = seq
                        db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                                   (to, seq, sender, msg_id, body, ts))
                        status.append(seq)
                    else:
                        status.append(0)
                done.append((ws, rid, envs, batch, status))
            for who, seqs in acks:
                db.executemany("DELETE FROM messages WHERE recipient = ? AND seq = ?",
                               [(who, s) for s in seqs])
            db.execute("COMMIT")
            self.loop.call_soon_threadsafe(committed, done)


RECEIVERS: dict[str, ServerConnection] = {}
WRITES: set[asyncio.Future[None]] = set()


def committed(done: list[Any]) -> None:
    """After the commit: reply to each sender, and one deliver frame per recipient."""
    out: dict[ServerConnection, list[bytes]] = defaultdict(list)
    deliver: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ws, rid, envs, batch, status in done:
        if batch:
            out[ws].append(msgpack.packb({"v": 1, "t": "accepted_many", "rid": rid,
                                          "ids": [e[2] for e in envs],
                                          "status": ["accepted" if s else "duplicate" for s in status]}))
        else:
            out[ws].append(msgpack.packb({"v": 1, "t": "accepted", "rid": rid, "id": envs[0][2]}))
        for (sender, to, msg_id, body, ts), seq in zip(envs, status, strict=True):
            if seq:
                deliver[to].append({"seq": seq, "from": sender, "id": msg_id, "kind": "msg", "body": body,
                                    "ts": ts})
    for to, messages in deliver.items():
        target = RECEIVERS.get(to)
        if target is not None:
            out[target].append(msgpack.packb({"v": 1, "t": "deliver", "messages": messages}))
    for ws, frames in out.items():
        task = asyncio.ensure_future(_write(ws, frames))
        WRITES.add(task)
        task.add_done_callback(WRITES.discard)


async def _write(ws: ServerConnection, frames: list[bytes]) -> None:
    for f in frames:
        await ws.send(f)


async def main(path: str, cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    writer = Writer(path, asyncio.get_running_loop())

    async def handler(ws: ServerConnection) -> None:
        await ws.send(msgpack.packb({"v": 1, "t": "hello", "nonce": os.urandom(32), "server": "forwarder",
                                     "limits": {"max_frame": 262144, "max_body": 65536}, "caps": ["batch"]}))
        name = ""
        async for data in ws:
            m = msgpack.unpackb(data)
            t = m["t"]
            if t == "send":
                ts = time.time_ns() // 1_000_000
                if "envelopes" in m:
                    envs = [(name, e["to"], e["id"], e["body"], ts) for e in m["envelopes"]]
                    writer.submit((ws, m["rid"], envs, True))
                else:
                    writer.submit((ws, m["rid"], [(name, m["to"], m["id"], m["body"], ts)], False))
            elif t == "ack":
                writer.ack(name, m["seqs"])
            elif t == "register":
                name = m["username"]
                RECEIVERS[name] = ws
                await ws.send(msgpack.packb({"v": 1, "t": "ok", "rid": m["rid"], "username": name}))

    async with serve(handler, "127.0.0.1", 0, ssl=ctx, compression=None, max_size=2**22) as server:
        print(next(iter(server.sockets)).getsockname()[1], flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
