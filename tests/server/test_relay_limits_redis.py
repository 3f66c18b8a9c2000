"""Relay instances sharing their rate limits through the real Redis (``limits_redis``): a limit spent
on one instance is spent on the other (issue 11 point 3). Needs CIPHERPOST_TEST_REDIS (.ci/run sets
it; in CI a missing Redis fails)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import pytest
from relay_client import RelayClient
from relay_harness import Harness, harness, prekey_upload, run

from cipherpost.protocol.frames import Accepted, Bundle, Error, FetchBundle, Ok

REDIS_URL = os.environ.get("CIPHERPOST_TEST_REDIS")
pytestmark = pytest.mark.skipif(
    REDIS_URL is None, reason="CIPHERPOST_TEST_REDIS is not set (CI sets it; e.g. redis://127.0.0.1:6379/0)")


async def _drop(prefix: str) -> None:
    import redis.asyncio

    assert REDIS_URL is not None
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _users(h: Harness) -> dict[str, RelayClient]:
    users = {}
    for name in ("alice", "bob"):
        client, identity = await h.user(name)
        reply = await client.request(prekey_upload(identity, client.rid(), one_time=10, kem=10))
        assert isinstance(reply, Ok)
        users[name] = client
    return users


def test_two_instances_share_the_pake_and_bundle_limits(tmp_path: Path) -> None:
    prefix = f"cipherpost-test-{secrets.token_hex(6)}:"
    shared = dict(limits_redis=REDIS_URL, limits_redis_prefix=prefix, pake_per_hour=2,
                  one_time_prekeys_per_target_per_hour=3)

    async def scenario() -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                a = await stack.enter_async_context(harness(tmp_path / "a", **shared))
                b = await stack.enter_async_context(harness(tmp_path / "b", **shared))
                on_a, on_b = await _users(a), await _users(b)
                alice_a, alice_b = on_a["alice"], on_b["alice"]
                assert isinstance(await alice_a.send("bob", b"p1", kind="pake"), Accepted)
                assert isinstance(await alice_b.send("bob", b"p2", kind="pake"), Accepted)
                third = await alice_a.send("bob", b"p3", kind="pake")
                assert isinstance(third, Error) and third.code == "rate_limited"
                # bob's one-time keys: 3 per hour across both instances, then last-resort bundles
                bundles = []
                for client in (alice_a, alice_b, alice_a, alice_b):
                    reply = await client.request(FetchBundle(rid=client.rid(), username="bob"))
                    assert isinstance(reply, Bundle)
                    bundles.append(reply.one_time_prekey is not None)
                assert bundles == [True, True, True, False]
        finally:
            await _drop(prefix)

    run(scenario())
