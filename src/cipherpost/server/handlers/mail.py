"""Mail rules beyond the plain ``send`` hot path: PAKE sends, blocks, multi-recipient sends, and the
wire error for each way a store refuses a message.

PAKE sends are rate-limited per (sender, recipient), and only for recipients that exist: a send to
a made-up name is refused before the limiter sees it, so no one can grow the limiter's table with
invented names (issue 9; the limiter also has a hard key cap and is fail-closed).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ...protocol import errors as E
from ...protocol.errors import ProtocolError
from ...protocol.frames import Send

if TYPE_CHECKING:
    from ..connection import Connection


async def send_pake(conn: Connection, frame: Send, to: str) -> None:
    assert conn.username is not None
    server = conn.server
    if await server.identity_of(to) is None:
        raise ProtocolError(E.UNKNOWN_USER, f"no account named {to!r}")
    decision = await server.limiters.pake.hit(f"{conn.username}\x00{to}")
    if not decision.allowed:
        wait = "" if decision.retry_after_s == math.inf else \
            f" (at most {conn.config.pake_per_hour} per hour); try again in " \
            f"{max(1, math.ceil(decision.retry_after_s))} s"
        raise ProtocolError(E.RATE_LIMITED, f"too many password-verification messages to {to!r}{wait}")
    conn.enqueue(frame, to)
