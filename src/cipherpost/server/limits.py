"""Rate limits: a token bucket per connection, sliding windows per key (PAKE sends, bundle fetches)."""

from __future__ import annotations

from collections import deque


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take(now)`` spends one if available."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class WindowLimiter:
    """At most ``limit`` events per ``window`` seconds per key (e.g. PAKE attempts per pair)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._events: dict[tuple[str, str], deque[float]] = {}

    def allow(self, key: tuple[str, str], now: float) -> bool:
        if not self.would_allow(key, now):
            return False
        self._events.setdefault(key, deque()).append(now)
        return True

    def would_allow(self, key: tuple[str, str], now: float) -> bool:
        """Whether ``allow`` would succeed now, without counting an event (to check several limits
        before spending any)."""
        events = self._events.get(key)
        if events is None:
            return True
        while events and events[0] <= now - self.window:
            events.popleft()
        return len(events) < self.limit

    def prune(self, now: float) -> None:
        for key in [k for k, ev in self._events.items() if not ev or ev[-1] <= now - self.window]:
            del self._events[key]
