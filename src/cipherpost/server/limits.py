"""Rate limits: one ``Limiter`` interface (docs/contracts.md section 3), two backends, and the
per-connection frame bucket.

Every limit is "at most ``limit`` units per ``window_s`` seconds per key", sliding, implemented as
GCRA (the generic cell rate algorithm of ATM, as in Brandur Leach's ``throttled`` and Redis'
``redis-cell``): one number per key, the *theoretical arrival time* ``tat``. Each unit moves
``tat`` forward by ``window_s / limit``; a hit is refused when that would put ``tat`` more than
one window ahead of now. So a fresh key may spend ``limit`` units at once and then one unit every
``window_s / limit`` seconds, and a key whose ``tat`` has passed holds no information: it is the
same as a key never seen, which is what lets both backends forget it (memory: eviction; Redis: a
TTL).

- :class:`MemoryLimiter`: in process, a hard cap ``max_keys``. When full, a new key evicts the key
  whose window ends first (the smallest ``tat``: an expired key if there is one, otherwise the key
  that would have forgotten its history soonest). A limiter marked ``fail_closed`` (PAKE attempts,
  recovery) never forgets a live key to make room: it refuses the new key instead.
- :class:`RedisLimiter`: shared by every relay instance (issue 11): one Redis key per limited key
  holding ``tat`` with a TTL of at most one window, checked and spent by one Lua script (atomic
  across instances, clocked by Redis' own ``TIME`` so that instances' clocks do not matter). When
  Redis is unreachable a limiter allows (the relay keeps working, issue 11 point 4) unless it is
  ``fail_closed``; either way it logs.

Keys are built by the caller from account names or address prefixes that already exist (never
from a made-up recipient: that would let anyone grow the table), and costs count deliveries or
bytes, not frames.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .config import ServerConfig

log = logging.getLogger("cipherpost.server")

DEFAULT_MAX_KEYS = 100_000  # per in-memory limiter: ~200 bytes a key, ~20 MiB at the cap


@dataclass(frozen=True, slots=True)
class Decision:
    """``allowed``; if not, how long until the same hit would be allowed (``math.inf``: never,
    the cost is above the limit)."""

    allowed: bool
    retry_after_s: float = 0.0


ALLOWED = Decision(True)


def retry_text(decision: Decision) -> str:
    """The end of a ``rate_limited`` message: when to try again."""
    if decision.retry_after_s == math.inf:
        return "never with this many at once"
    return f"try again in {max(1, math.ceil(decision.retry_after_s))} s"


class Limiter(Protocol):
    """At most ``limit`` units per ``window_s`` seconds per key (GCRA, sliding)."""

    limit: int
    window_s: float

    async def hit(self, key: str, cost: int = 1) -> Decision:
        """Spend ``cost`` units of ``key`` if all of them fit; otherwise spend nothing."""

    async def peek(self, key: str, cost: int = 1) -> Decision:
        """What ``hit`` would decide now, spending nothing (to check several limits first)."""


class MemoryLimiter:
    """:class:`Limiter` in this process, with at most ``max_keys`` keys (see the module docstring)."""

    def __init__(self, limit: int, window_s: float, *, max_keys: int = DEFAULT_MAX_KEYS,
                 fail_closed: bool = False, name: str = "limit",
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window_s <= 0 or max_keys < 1:
            raise ValueError("limit, window_s and max_keys must be positive")
        self.limit = limit
        self.window_s = float(window_s)
        self.max_keys = max_keys
        self.fail_closed = fail_closed
        self.name = name
        self.clock = clock
        self._interval = self.window_s / limit  # seconds of tat per unit
        self._tat: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # (tat, key), stale entries skipped when popped
        self.evictions = 0
        self.refused_full = 0

    def __len__(self) -> int:
        return len(self._tat)

    def __contains__(self, key: object) -> bool:
        return key in self._tat

    def try_hit(self, key: str, cost: int = 1, *, spend: bool = True) -> Decision:
        """The synchronous core of :meth:`hit` (and, with ``spend=False``, of :meth:`peek`)."""
        now = self.clock()
        stored = self._tat.get(key)
        tat = now if stored is None or stored < now else stored
        new_tat = tat + cost * self._interval
        ahead = new_tat - now
        if ahead > self.window_s * (1 + 1e-9):
            if cost * self._interval > self.window_s * (1 + 1e-9):
                return Decision(False, math.inf)
            return Decision(False, ahead - self.window_s)
        if not spend:
            return ALLOWED
        if stored is None and len(self._tat) >= self.max_keys and not self._make_room(now):
            self.refused_full += 1
            return Decision(False, self._earliest_end(now))
        self._tat[key] = new_tat
        heapq.heappush(self._heap, (new_tat, key))
        if len(self._heap) > 2 * len(self._tat) + 64:  # drop stale heap entries now and then
            self._heap = [(t, k) for k, t in self._tat.items()]
            heapq.heapify(self._heap)
        return ALLOWED

    async def hit(self, key: str, cost: int = 1) -> Decision:
        return self.try_hit(key, cost)

    async def peek(self, key: str, cost: int = 1) -> Decision:
        return self.try_hit(key, cost, spend=False)

    def _pop_earliest(self) -> tuple[float, str] | None:
        while self._heap:
            tat, key = self._heap[0]
            if self._tat.get(key) == tat:
                return tat, key
            heapq.heappop(self._heap)  # stale: the key was hit again or removed since
        return None

    def _make_room(self, now: float) -> bool:
        """Free one slot: drop the key whose window ends first, unless it is still live and this
        limiter is fail-closed. Whether a slot is free now."""
        earliest = self._pop_earliest()
        if earliest is None:
            return False
        tat, key = earliest
        if tat > now:
            if self.fail_closed:
                return False
            self.evictions += 1
        heapq.heappop(self._heap)
        del self._tat[key]
        return True

    def _earliest_end(self, now: float) -> float:
        earliest = self._pop_earliest()
        return max(0.0, earliest[0] - now) if earliest is not None else 0.0

    def prune(self) -> int:
        """Forget every key whose window has ended (they hold no information); how many."""
        now = self.clock()
        dropped = 0
        while (earliest := self._pop_earliest()) is not None and earliest[0] <= now:
            heapq.heappop(self._heap)
            del self._tat[earliest[1]]
            dropped += 1
        return dropped


# GCRA in one round trip, atomic across relay instances. KEYS[1]: the limited key. ARGV: the
# interval per unit and the window, in microseconds; the cost; 1 to spend, 0 to only check.
# Returns {allowed (0/1), retry_after_us}. Time is Redis' own clock (TIME), in microseconds.
_GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + cost * interval
if new_tat - now > window then
  if cost * interval > window then return {0, -1} end
  return {0, math.floor(new_tat - now - window)}
end
if ARGV[4] == '1' then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
end
return {1, 0}
"""


class RedisLimiter:
    """:class:`Limiter` shared by relay instances through Redis (see the module docstring).

    ``client`` is a ``redis.asyncio.Redis``; keys are ``{prefix}{name}:{key}``. Redis memory is
    bounded by the TTLs (one window at most) and by the callers' rule that keys name existing
    accounts or address prefixes."""

    def __init__(self, client: Any, limit: int, window_s: float, *, name: str, prefix: str = "cipherpost:",
                 fail_closed: bool = False) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("limit and window_s must be positive")
        self.client = client
        self.limit = limit
        self.window_s = float(window_s)
        self.name = name
        self.fail_closed = fail_closed
        self._prefix = f"{prefix}{name}:"
        window_us = round(self.window_s * 1_000_000)
        self._args = (window_us // limit, window_us)
        self._script = client.register_script(_GCRA_LUA)
        self._failing = False

    def key_of(self, key: str) -> str:
        return self._prefix + key

    async def _run(self, key: str, cost: int, spend: bool) -> Decision:
        import redis.exceptions  # only a relay configured with Redis imports it

        try:
            allowed, retry_us = await self._script(keys=[self._prefix + key],
                                                   args=[*self._args, cost, 1 if spend else 0])
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            if not self._failing:
                log.warning("event=limiter_unavailable limiter=%s error=%s fail_closed=%s", self.name,
                            type(exc).__name__, self.fail_closed)
                self._failing = True
            return Decision(False, 1.0) if self.fail_closed else ALLOWED
        if self._failing:
            log.info("event=limiter_available limiter=%s", self.name)
            self._failing = False
        if int(allowed):
            return ALLOWED
        retry_us = int(retry_us)
        return Decision(False, math.inf if retry_us < 0 else retry_us / 1_000_000)

    async def hit(self, key: str, cost: int = 1) -> Decision:
        return await self._run(key, cost, True)

    async def peek(self, key: str, cost: int = 1) -> Decision:
        return await self._run(key, cost, False)


def pair_key(first: str, second: str) -> str:
    """The limiter key of an ordered pair of account names (``|`` never occurs in a username)."""
    return f"{first}|{second}"


def address_prefix(address: str) -> str:
    """The block one party is assumed to control: the /24 of an IPv4 address, the /64 of an IPv6
    one (an IPv4-mapped IPv6 address counts as IPv4). Anything unparsable is its own key."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ipaddress.IPv4Network((int(ip) & 0xFFFFFF00, 24)))
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


HOUR_S = 3600.0


@dataclass(slots=True)
class RelayLimiters:
    """Every keyed limiter of the relay, built from the config (docs/server.md, "Limits")."""

    pake: Limiter             # kind:"pake" sends per (sender, existing recipient); fail-closed
    fetch: Limiter            # fetch_bundle per requester
    fetch_pair: Limiter       # fetch_bundle per (requester, target)
    group_fetch: Limiter      # fetch_bundle with group:true per requester (group setup, rotation)
    one_time_target: Limiter  # one-time prekeys served per target, all requesters together
    registrations: Limiter    # register per source address prefix
    auth_failures: Limiter    # failed auth/register proofs per source address prefix
    prekey_uploads: Limiter   # prekeys uploaded per account (signature checks and bytes written)
    fanout_deliveries: Limiter  # send_many deliveries (one per recipient) per sender
    recipient_pairs: Limiter  # limit 1: "has this sender sent to this recipient in the last hour?"
    new_recipients: Limiter   # send_many recipients not written to in the last hour, per sender
    blob_bytes: Limiter       # blob bytes uploaded and downloaded per account (issue 13)
    recovery_account: Limiter  # recover attempts per account (that has a recovery key); fail-closed
    recovery_prefix: Limiter   # recover attempts per source address prefix; fail-closed
    _memory: tuple[MemoryLimiter, ...] = ()
    _redis: Any = None

    def prune(self) -> None:
        for limiter in self._memory:
            limiter.prune()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def build_limiters(config: ServerConfig) -> RelayLimiters:
    """In-memory limiters, or Redis-backed ones when ``config.limits_redis`` is set."""
    specs: dict[str, tuple[int, bool]] = {  # name -> (units per hour, fail_closed)
        "pake": (config.pake_per_hour, True),
        "fetch": (config.bundle_fetches_per_hour, False),
        "fetch_pair": (config.bundle_fetches_per_target_per_hour, False),
        "group_fetch": (config.group_bundle_fetches_per_hour, False),
        "one_time_target": (config.one_time_prekeys_per_target_per_hour, False),
        "registrations": (config.registrations_per_prefix_per_hour, False),
        "auth_failures": (config.auth_failures_per_prefix_per_hour, False),
        "prekey_uploads": (config.prekey_uploads_per_account_per_hour, False),
        "fanout_deliveries": (config.fanout_deliveries_per_hour, False),
        "recipient_pairs": (1, False),
        "new_recipients": (config.new_recipients_per_hour, False),
        "blob_bytes": (config.blob_bytes_per_hour, False),
        "recovery_account": (config.recovery_attempts_per_account_per_hour, True),
        "recovery_prefix": (config.recovery_attempts_per_prefix_per_hour, True),
    }
    memory: list[MemoryLimiter] = []
    client: Any = None
    if config.limits_redis:
        import redis.asyncio  # only a relay configured with Redis imports it
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client = redis.asyncio.Redis.from_url(config.limits_redis, socket_timeout=2, socket_connect_timeout=2,
                                              retry=Retry(NoBackoff(), 1))

    def make(name: str) -> Limiter:
        limit, closed = specs[name]
        if client is not None:
            return RedisLimiter(client, limit, HOUR_S, name=name, prefix=config.limits_redis_prefix,
                                fail_closed=closed)
        limiter = MemoryLimiter(limit, HOUR_S, max_keys=config.limiter_max_keys, fail_closed=closed,
                                name=name)
        memory.append(limiter)
        return limiter

    built = RelayLimiters(
        pake=make("pake"), fetch=make("fetch"), fetch_pair=make("fetch_pair"),
        group_fetch=make("group_fetch"),
        one_time_target=make("one_time_target"), registrations=make("registrations"),
        auth_failures=make("auth_failures"), prekey_uploads=make("prekey_uploads"),
        fanout_deliveries=make("fanout_deliveries"), recipient_pairs=make("recipient_pairs"),
        new_recipients=make("new_recipients"), blob_bytes=make("blob_bytes"),
        recovery_account=make("recovery_account"), recovery_prefix=make("recovery_prefix"))
    built._memory = tuple(memory)
    built._redis = client
    return built


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take(now)`` spends one if available."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < cost:
            self.tokens = tokens
            return False
        self.tokens = tokens - cost
        return True
