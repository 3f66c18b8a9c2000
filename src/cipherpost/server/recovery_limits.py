"""Limits on account-recovery attempts: per account and per source-address prefix (docs/server.md).

A recovery key is a password-equivalent, so every attempt (right or wrong) spends one unit of both
windows, checked before the signature is looked at. Bounded memory: at most ``max_keys`` keys per
window; when full, windows that have ended are dropped, and if none has, a *new* key is refused
(fail closed: an attacker filling the table must not win fresh attempts; contracts.md section 3).
Per-account keys are created only for accounts that exist and have a recovery key.

Until the shared ``Limiter`` (``server/limits.py``, contracts.md section 3) is merged, this is the
in-process stand-in; a ``Limiter`` with ``fail_closed`` replaces ``FailClosedWindow`` one for one.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass

RECOVERY_WINDOW_S = 3600.0


class FailClosedWindow:
    """At most ``limit`` events per ``window_s`` per key, for at most ``max_keys`` keys."""

    def __init__(self, limit: int, window_s: float, max_keys: int) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}

    def _live(self, key: str, now: float) -> deque[float] | None:
        events = self._events.get(key)
        if events is not None:
            while events and events[0] <= now - self.window_s:
                events.popleft()
        return events

    def allows(self, key: str, now: float) -> bool:
        """Whether :meth:`spend` would succeed now (spends nothing)."""
        events = self._live(key, now)
        if events is None:
            return len(self._events) < self.max_keys or self._prune(now)
        return len(events) < self.limit

    def spend(self, key: str, now: float) -> None:
        events = self._live(key, now)
        if events is None:
            if len(self._events) >= self.max_keys and not self._prune(now):
                return  # refused by allows(): callers check first
            events = self._events[key] = deque()
        events.append(now)

    def _prune(self, now: float) -> bool:
        """Drop keys whose window has ended; whether there is room for a new key now."""
        for key in [k for k, ev in self._events.items() if not ev or ev[-1] <= now - self.window_s]:
            del self._events[key]
        return len(self._events) < self.max_keys


def address_prefix(peer_ip: str) -> str:
    """The network an address belongs to for limits: /24 for IPv4, /56 for IPv6 (what one user or
    one small site typically holds; a /56 is a common home allocation)."""
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return peer_ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = 24 if ip.version == 4 else 56
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


@dataclass(frozen=True, slots=True)
class RecoveryDecision:
    allowed: bool
    reason: str = ""


class RecoveryLimits:
    """The two windows of recovery attempts: per account and per address prefix."""

    def __init__(self, per_account: int, per_prefix: int, max_keys: int = 100_000) -> None:
        self.per_account = FailClosedWindow(per_account, RECOVERY_WINDOW_S, max_keys)
        self.per_prefix = FailClosedWindow(per_prefix, RECOVERY_WINDOW_S, max_keys)

    def attempt(self, username: str, prefix: str, now: float) -> RecoveryDecision:
        """Check both windows; spend one unit of each only if both allow it."""
        if not self.per_prefix.allows(prefix, now):
            return RecoveryDecision(False, f"too many recovery attempts from your network "
                                           f"({self.per_prefix.limit} per hour); try again later")
        if not self.per_account.allows(username, now):
            return RecoveryDecision(False, f"too many recovery attempts for this account "
                                           f"({self.per_account.limit} per hour); try again later")
        self.per_prefix.spend(prefix, now)
        self.per_account.spend(username, now)
        return RecoveryDecision(True)
