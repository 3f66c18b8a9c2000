"""Debouncing the relay's ``prekeys_low`` push.

The counts in the push come from the relay, which may lie or repeat itself: 30 pushes saying "0
left" once made the client generate and upload 4,800 keys. A top-up runs only if none is running and
none started within :data:`PREKEYS_LOW_MIN_INTERVAL_S`; every other push is ignored (the next
connect tops up from the counts in its auth reply anyway). So a relay can make the client upload at
most one pool's worth (``client.ONE_TIME_POOL_TARGET`` of each kind) per interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

PREKEYS_LOW_MIN_INTERVAL_S: Final = 60.0


class PrekeysLowGate:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 interval_s: float = PREKEYS_LOW_MIN_INTERVAL_S) -> None:
        self._clock = clock
        self._interval_s = interval_s
        self._running = False
        self._last_start: float | None = None
        self.ignored = 0

    def start(self) -> bool:
        """Whether this push may start a top-up (and then it counts as started)."""
        now = self._clock()
        if self._running or (self._last_start is not None and now - self._last_start < self._interval_s):
            self.ignored += 1
            return False
        self._running = True
        self._last_start = now
        return True

    async def run(self, top_up: Coroutine[Any, Any, None]) -> None:
        try:
            await top_up
        finally:
            self._running = False
