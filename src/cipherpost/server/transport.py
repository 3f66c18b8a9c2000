"""A websockets server connection that writes several frames with one TLS record and one syscall.

``websockets`` writes every frame with its own ``transport.write``; under TLS each becomes a
record and usually a ``send`` syscall. The relay's writer task has many small frames ready at once
(``accepted`` replies, ``deliver`` pushes), so it queues them all in the sans-I/O protocol and
flushes them in one write; when the transport needs no flow control it does so synchronously
(``send_frames_now``), which spares a task switch per connection per write. Uses the documented
extension point ``serve(create_connection=...)``; the awaiting path uses the same ``send_context``
that ``ServerConnection.send`` uses (state checks, drain, errors).

Receiving, it bounds what an unfinished fragmented message may hold: websockets keeps every
fragment until the last one arrives, so a peer could park up to ``max_size`` (twice the relay's
frame limit, so that a single oversized frame still gets a typed ``too_large``) per connection
for as long as it likes, as one object per fragment. Here fragments go into one buffer per
connection, and ``fragments_limit`` (the relay's ``max_frame``) caps it: beyond it the connection
is closed with 1009 and the buffer dropped.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
from collections.abc import Sequence
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Event, State

READER_SLACK_BYTES = 16 * 1024
_DATA_OPCODES = frozenset({Opcode.CONT, Opcode.TEXT, Opcode.BINARY})
_OPENED = Request("/", Headers())  # shared stand-in for the upgrade request of an open connection


class BatchingServerConnection(ServerConnection):
    fragments_limit: int | None = None  # most data bytes the fragments of one message may hold

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fragments: mmap.mmap | None = None  # the unfinished fragmented message so far
        self._fragments_len = 0
        self._fragments_opcode = Opcode.BINARY

    @classmethod
    def with_fragments_limit(cls, limit: int) -> type[BatchingServerConnection]:
        """A subclass for ``serve(create_connection=...)`` whose connections apply ``limit``."""
        return type(cls.__name__, (cls,), {"fragments_limit": limit})

    def forget_handshake(self) -> None:
        """Drop the upgrade request and response (headers: ~3 KiB per connection) once the
        connection is open; nothing reads them afterwards (``remote_address`` comes from the socket)."""
        self.request = _OPENED  # not None: websockets reads None as "handshake not received yet"
        self.response = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # websockets' reader keeps the capacity of the largest burst it ever buffered (deleting
        # consumed bytes from the front keeps the allocation): give it back once mostly consumed.
        reader = self.protocol.reader
        if sys.getsizeof(reader.buffer) > 4 * len(reader.buffer) + READER_SLACK_BYTES:
            reader.buffer = bytearray(reader.buffer)

    def process_event(self, event: Event) -> None:
        """Fragments are written into one buffer per connection as they arrive, then handed on as
        a single frame: the unfinished message costs its bytes, not a frame object and a heap
        block per fragment (an attacker's 1-byte fragments would cost ~100 bytes each). The
        buffer is an anonymous mapping of ``fragments_limit`` bytes: the kernel backs only the
        pages written, and unmaps them all when the message ends or the connection closes."""
        if self.fragments_limit is None or not isinstance(event, Frame) or (
                event.fin and self._fragments is None) or event.opcode not in _DATA_OPCODES:
            super().process_event(event)  # control frames and whole messages: as websockets does
            return
        if self._fragments is None:
            self._fragments, self._fragments_len = mmap.mmap(-1, self.fragments_limit), 0
            self._fragments_opcode = event.opcode
        end = self._fragments_len + len(event.data)
        if end > self.fragments_limit:
            self._drop_fragments()
            if self.protocol.state is State.OPEN:
                self.protocol.fail(CloseCode.MESSAGE_TOO_BIG,
                                   f"fragmented message over {self.fragments_limit} bytes")
                self.send_data()
            return
        self._fragments[self._fragments_len:end] = event.data
        self._fragments_len = end
        if event.fin:
            data = self._fragments[:end]
            self._drop_fragments()
            super().process_event(Frame(self._fragments_opcode, data))

    def _drop_fragments(self) -> None:
        if self._fragments is not None:
            self._fragments.close()
            self._fragments = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._drop_fragments()
        super().connection_lost(exc)

    async def send_frames(self, frames: Sequence[bytes]) -> None:
        """Send each of ``frames`` as one binary message, written together."""
        async with self.send_context():
            for frame in frames:
                self.protocol.send_binary(frame)

    def can_send_now(self) -> bool:
        """True when ``send_frames_now`` may write: open, and no flow control in force (the
        transport is not paused, so ``send_frames`` would not wait either)."""
        return self.protocol.state is State.OPEN and not self.paused and not self.transport.is_closing()

    def send_frames_now(self, frames: Sequence[bytes]) -> None:
        """``send_frames`` without awaiting, for when ``can_send_now()``: no task switch, no drain."""
        for frame in frames:
            self.protocol.send_binary(frame)
        self.send_data()

    def send_data(self) -> None:
        chunks = self.protocol.data_to_send()
        if chunks and all(chunks):  # an empty chunk means "half-close": keep the default handling
            self.transport.write(b"".join(chunks))
            return
        for data in chunks:
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                with contextlib.suppress(Exception):  # as websockets does: write_eof may raise anything
                    self.transport.write_eof()
            else:
                self.transport.close()
