"""Reconnect backoff with full jitter (pure; used by ``Client.stay_connected``).

After a relay restart every client loses its connection at the same instant. With a plain
exponential backoff they all come back at the same instants too (0.5 s, 1 s, 2 s ...), and each
wave meets a relay that is busy with the previous one. Full jitter (AWS Architecture Blog,
"Exponential Backoff And Jitter", 2015) draws each wait uniformly from [0, ceiling), the ceiling
doubling per failed attempt up to a cap: the returns spread evenly over the window, and the
expected wait is half that of the plain schedule.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

RECONNECT_FIRST_CEILING_S: Final = 0.5
RECONNECT_MAX_CEILING_S: Final = 30.0


def reconnect_delay(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before reconnect attempt ``attempt + 1`` (``attempt`` 0 after a drop):
    uniform in [0, min(30, 0.5 * 2**attempt))."""
    ceiling = min(RECONNECT_MAX_CEILING_S, RECONNECT_FIRST_CEILING_S * 2 ** min(attempt, 16))
    return float(rng() * ceiling)
