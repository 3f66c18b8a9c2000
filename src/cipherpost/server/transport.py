"""A websockets server connection that writes several frames with one TLS record and one syscall.

``websockets`` writes every frame with its own ``transport.write``; under TLS each becomes a
record and usually a ``send`` syscall. The relay's writer task has many small frames ready at once
(``accepted`` replies, ``deliver`` pushes), so it queues them all in the sans-I/O protocol and
flushes them in one write; when the transport needs no flow control it does so synchronously
(``send_frames_now``), which spares a task switch per connection per write. Uses the documented
extension point ``serve(create_connection=...)``; the awaiting path uses the same ``send_context``
that ``ServerConnection.send`` uses (state checks, drain, errors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State


class BatchingServerConnection(ServerConnection):
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
