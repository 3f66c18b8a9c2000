"""A minimal test client speaking docs/wire.md over real TLS (not the product client, which is separate)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import ssl
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect

from cipherpost.crypto.encoding import pack
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import (
    Ack,
    Auth,
    Deliver,
    DeliveredMessage,
    Drained,
    Frame,
    Hello,
    Register,
    Send,
    decode_frame,
    encode_frame,
)


def client_ssl_context(cert_path: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert_path))
    return ctx


class RelayClient:
    def __init__(self, ws: ClientConnection, hello: Hello, channel: bytes) -> None:
        self.ws = ws
        self.hello = hello
        self.channel = channel
        self._rids = itertools.count(1)
        self.pushes: asyncio.Queue[Frame] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[Frame]] = {}
        # `drained` (cap "drained") is kept out of `pushes`, which tests read for errors and
        # deliveries; what had been delivered when it came is kept for the tests of its order.
        self.drained = asyncio.Event()
        self.delivered_before_drained: int | None = None
        self._delivered = 0
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, cert_path: Path | None, *,
                      local_addr: tuple[str, int] | None = None) -> RelayClient:
        """``local_addr``: the source address, e.g. ("127.0.3.7", 0) to come from another loopback /24."""
        ctx = client_ssl_context(cert_path) if cert_path is not None else None
        extra: dict[str, Any] = {} if local_addr is None else {"local_addr": local_addr}
        ws = await connect(url, ssl=ctx, max_size=2**22, compression=None, **extra)
        channel = bytes(32)
        if ctx is not None:
            der = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            channel = hashlib.sha256(der).digest()
        hello = decode_frame(await ws.recv(), max_size=2**22)
        assert isinstance(hello, Hello)
        return cls(ws, hello, channel)

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                frame = decode_frame(data, max_size=2**22)  # type: ignore[arg-type]
                rid = getattr(frame, "rid", None)
                if isinstance(frame, Drained):
                    self.delivered_before_drained = self._delivered
                    self.drained.set()
                    continue
                if isinstance(frame, Deliver):
                    self._delivered += len(frame.messages)
                if rid is not None and rid in self._waiting:
                    self._waiting.pop(rid).set_result(frame)
                else:
                    await self.pushes.put(frame)
        except websockets.exceptions.ConnectionClosed:
            pass   # an abrupt close is what several tests provoke; requests still fail below
        finally:  # the connection is gone: nobody will answer the open requests
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))
            self._waiting.clear()

    def rid(self) -> int:
        return next(self._rids)

    async def send_raw(self, data: bytes | str, rid: int | None = None, timeout: float = 5) -> Frame | None:
        fut: asyncio.Future[Frame] | None = None
        if self._reader.done():
            raise ConnectionError("connection closed")
        if rid is not None:
            fut = asyncio.get_running_loop().create_future()
            self._waiting[rid] = fut
        await self.ws.send(data)
        if fut is None:
            return None
        return await asyncio.wait_for(fut, timeout)

    async def request(self, frame: Any, timeout: float = 5) -> Frame:
        result = await self.send_raw(encode_frame(frame), rid=frame.rid, timeout=timeout)
        assert result is not None
        return result

    def proof(self, identity: IdentityKeyPair, label: str, username: str) -> bytes:
        return identity.sign(label, pack([self.hello.nonce, self.channel, username]))

    async def register(self, identity: IdentityKeyPair, username: str, invite: str | None = None) -> Frame:
        return await self.request(Register(rid=self.rid(), username=username,
                                           identity=identity.public.encode(),
                                           sig=self.proof(identity, "register", username), invite=invite))

    async def auth(self, identity: IdentityKeyPair, username: str) -> Frame:
        return await self.request(Auth(rid=self.rid(), username=username,
                                       sig=self.proof(identity, "auth", username)))

    async def send(self, to: str, body: bytes, msg_id: bytes | None = None, kind: str = "msg") -> Frame:
        return await self.request(Send(rid=self.rid(), to=to, id=msg_id or os.urandom(16), kind=kind,
                                       body=body))

    async def next_push(self, timeout: float = 5) -> Frame:
        return await asyncio.wait_for(self.pushes.get(), timeout)

    async def receive_messages(self, count: int, timeout: float = 5) -> list[DeliveredMessage]:
        out: list[DeliveredMessage] = []
        while len(out) < count:
            frame = await self.next_push(timeout)
            if isinstance(frame, Deliver):
                out.extend(frame.messages)
        return out

    async def ack(self, seqs: list[int]) -> None:
        await self.ws.send(encode_frame(Ack(seqs=seqs)))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
