"""The prekeys_low debounce (client/prekeys_low.py): one top-up per interval, one at a time."""

from __future__ import annotations

import asyncio

import pytest

from cipherpost.client.prekeys_low import PrekeysLowGate


def test_pushes_within_the_interval_or_while_running_start_nothing() -> None:
    now = [100.0]
    gate = PrekeysLowGate(clock=lambda: now[0], interval_s=60)
    runs: list[int] = []

    async def top_up() -> None:
        runs.append(1)
        assert not gate.start()          # a push while the top-up runs
        await asyncio.sleep(0)

    async def scenario() -> None:
        assert gate.start()
        await gate.run(top_up())
        assert [gate.start() for _ in range(30)] == [False] * 30
        now[0] += 61
        assert gate.start()
        await gate.run(top_up())
    asyncio.run(scenario())
    assert len(runs) == 2 and gate.ignored == 32


def test_a_failed_top_up_does_not_block_later_ones() -> None:
    now = [0.0]
    gate = PrekeysLowGate(clock=lambda: now[0], interval_s=10)

    async def failing() -> None:
        raise OSError("link lost")

    async def scenario() -> None:
        assert gate.start()
        with pytest.raises(OSError):
            await gate.run(failing())
        now[0] += 11
        assert gate.start()
    asyncio.run(scenario())
