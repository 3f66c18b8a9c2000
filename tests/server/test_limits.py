"""The Limiter interface: GCRA semantics, the in-memory key cap (evict or fail closed), and the Redis
backend against the real Redis (CIPHERPOST_TEST_REDIS; set by .ci/run, where a missing Redis fails)."""

from __future__ import annotations

import asyncio
import math
import os
import secrets
from collections.abc import Callable
from typing import Any

import pytest

from cipherpost.server.limits import Decision, Limiter, MemoryLimiter, RedisLimiter, address_prefix

REDIS_URL = os.environ.get("CIPHERPOST_TEST_REDIS")
NEEDS_REDIS = pytest.mark.skipif(
    REDIS_URL is None, reason="CIPHERPOST_TEST_REDIS is not set (CI sets it; e.g. redis://127.0.0.1:6379/0)")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_gcra_allows_a_burst_of_limit_then_one_per_interval() -> None:
    clock = Clock()
    lim = MemoryLimiter(10, 3600, clock=clock)
    assert all(lim.try_hit("k").allowed for _ in range(10))
    refused = lim.try_hit("k")
    assert not refused.allowed and refused.retry_after_s == pytest.approx(360)
    clock.now += 359
    assert not lim.try_hit("k").allowed
    clock.now += 1
    assert lim.try_hit("k").allowed
    assert not lim.try_hit("k").allowed


def test_cost_counts_units_and_a_refused_hit_spends_nothing() -> None:
    clock = Clock()
    lim = MemoryLimiter(100, 100, clock=clock)
    assert lim.try_hit("k", 60).allowed
    assert not lim.try_hit("k", 41).allowed  # would need 101 units
    assert lim.try_hit("k", 40).allowed      # the refused 41 were not spent
    assert lim.try_hit("other", 100).allowed
    never = lim.try_hit("fresh", 101)
    assert not never.allowed and never.retry_after_s == math.inf


def test_peek_spends_nothing() -> None:
    clock = Clock()
    lim = MemoryLimiter(2, 60, clock=clock)
    for _ in range(5):
        assert asyncio.run(lim.peek("k")).allowed
    assert len(lim) == 0
    assert asyncio.run(lim.hit("k")).allowed and asyncio.run(lim.hit("k")).allowed
    assert not asyncio.run(lim.peek("k")).allowed


def test_key_cap_evicts_the_key_whose_window_ends_first() -> None:
    clock = Clock()
    lim = MemoryLimiter(10, 100, max_keys=3, clock=clock)
    lim.try_hit("a", 5)   # window ends at +50
    lim.try_hit("b", 1)   # +10: ends first
    lim.try_hit("c", 9)   # +90
    assert lim.try_hit("d").allowed
    assert len(lim) == 3 and "b" not in lim and {"a", "c", "d"} <= set(lim._tat)
    assert lim.evictions == 1
    for i in range(10_000):  # however many new keys arrive, the table stays at the cap
        lim.try_hit(f"flood{i}")
    assert len(lim) == 3 and len(lim._heap) <= 2 * 3 + 64


def test_key_cap_drops_expired_keys_before_live_ones() -> None:
    clock = Clock()
    lim = MemoryLimiter(10, 100, max_keys=2, clock=clock)
    lim.try_hit("old", 1)
    lim.try_hit("live", 10)
    clock.now += 20  # "old" has expired, "live" has not
    assert lim.try_hit("new").allowed
    assert "live" in lim and "old" not in lim and lim.evictions == 0
    assert not lim.try_hit("live", 3).allowed  # its history survived (a fresh key could spend 10)


def test_fail_closed_limiter_refuses_new_keys_when_full_and_keeps_live_ones() -> None:
    clock = Clock()
    lim = MemoryLimiter(3, 100, max_keys=2, fail_closed=True, clock=clock)
    for _ in range(3):
        assert lim.try_hit("victim-pair").allowed
    assert lim.try_hit("other").allowed
    full = lim.try_hit("attacker-new-key")
    assert not full.allowed and 0 < full.retry_after_s <= 100
    assert not lim.try_hit("victim-pair").allowed  # its spent attempts were not forgotten
    assert lim.refused_full == 1
    clock.now += 101  # every window over: new keys fit again
    assert lim.try_hit("attacker-new-key").allowed


def test_prune_forgets_only_expired_keys() -> None:
    clock = Clock()
    lim = MemoryLimiter(10, 100, clock=clock)
    lim.try_hit("short", 1)
    lim.try_hit("long", 10)
    clock.now += 50
    assert lim.prune() == 1
    assert "long" in lim and "short" not in lim


@pytest.mark.parametrize(("address", "prefix"), [
    ("203.0.113.77", "203.0.113.0/24"),
    ("127.1.2.3", "127.1.2.0/24"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("::ffff:198.51.100.9", "198.51.100.0/24"),
    ("fe80::1%eth0", "fe80::/64"),
    ("?", "?"),
])
def test_address_prefix(address: str, prefix: str) -> None:
    assert address_prefix(address) == prefix


# --- Redis ------------------------------------------------------------------------------------

async def _with_redis(body: Callable[[Any, str], Any]) -> None:
    import redis.asyncio

    assert REDIS_URL is not None
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    prefix = f"cipherpost-test-{secrets.token_hex(6)}:"
    try:
        await body(client, prefix)
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@NEEDS_REDIS
def test_redis_limiter_has_the_memory_limiters_semantics() -> None:
    async def body(client: Any, prefix: str) -> None:
        lim: Limiter = RedisLimiter(client, 5, 3600, name="t", prefix=prefix)
        assert (await lim.peek("k")).allowed
        assert await client.exists(prefix + "t:k") == 0  # peek spends nothing
        assert all([(await lim.hit("k")).allowed for _ in range(5)])
        refused = await lim.hit("k")
        assert not refused.allowed and 700 < refused.retry_after_s <= 720
        assert (await lim.hit("other", 5)).allowed
        assert not (await lim.hit("other", 1)).allowed
        assert (await lim.hit("fresh", 6)) == Decision(False, math.inf)
        ttl_ms = await client.pttl(prefix + "t:k")
        assert 0 < ttl_ms <= 3600 * 1000 + 1  # one key per limited key, gone after one window
    asyncio.run(_with_redis(body))


@NEEDS_REDIS
def test_redis_limiter_is_atomic_across_instances() -> None:
    """Two relay instances (two clients, two limiter objects) racing on one key never overspend."""
    import redis.asyncio

    async def body(client: Any, prefix: str) -> None:
        assert REDIS_URL is not None
        other = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            a = RedisLimiter(client, 50, 60, name="race", prefix=prefix)
            b = RedisLimiter(other, 50, 60, name="race", prefix=prefix)
            results = await asyncio.gather(*[(a if i % 2 else b).hit("shared") for i in range(200)])
            assert sum(d.allowed for d in results) == 50
        finally:
            await other.aclose()
    asyncio.run(_with_redis(body))


@NEEDS_REDIS
def test_redis_keys_expire_after_their_window() -> None:
    async def body(client: Any, prefix: str) -> None:
        lim = RedisLimiter(client, 2, 0.3, name="short", prefix=prefix)
        assert (await lim.hit("k")).allowed and (await lim.hit("k")).allowed
        assert not (await lim.hit("k")).allowed
        await asyncio.sleep(0.5)
        assert await client.exists(prefix + "short:k") == 0
        assert (await lim.hit("k")).allowed
    asyncio.run(_with_redis(body))


def test_unreachable_redis_fails_open_or_closed_as_marked() -> None:
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    async def body() -> None:
        client = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5,  # nothing there
                                     retry=Retry(NoBackoff(), 0))
        try:
            assert (await RedisLimiter(client, 1, 60, name="open").hit("k")).allowed
            assert not (await RedisLimiter(client, 1, 60, name="closed", fail_closed=True).hit("k")).allowed
        finally:
            await client.aclose()
    asyncio.run(body())
