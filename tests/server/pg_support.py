"""PostgreSQL and Redis for backend tests: a uniquely named schema / key prefix per test, removed after.

``CIPHERPOST_TEST_POSTGRES`` (e.g. ``postgresql://postgres@127.0.0.1:5432/test``) and
``CIPHERPOST_TEST_REDIS`` (e.g. ``redis://127.0.0.1:6379/0``) name the services; ``.ci/run`` sets
both. Unset: the tests that need them are skipped, with the reason in pytest's summary (``-ra``).
Set but unreachable: they fail (CI must not pass without the services).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

PG_URL = os.environ.get("CIPHERPOST_TEST_POSTGRES", "")
REDIS_URL = os.environ.get("CIPHERPOST_TEST_REDIS", "")

NEEDS_POSTGRES = pytest.mark.skipif(
    not PG_URL, reason="CIPHERPOST_TEST_POSTGRES is not set: PostgreSQL backend tests need a server "
                       "(see tests/server/pg_support.py)")
NEEDS_REDIS = pytest.mark.skipif(
    not (PG_URL and REDIS_URL), reason="CIPHERPOST_TEST_POSTGRES and CIPHERPOST_TEST_REDIS must both be "
                                       "set for multi-instance tests (see tests/server/pg_support.py)")


def fresh_name(prefix: str = "cpt") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def with_query(url: str, key: str, value: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{key}={value}"


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def pg_execute(schema: str, sql: str, *args: object) -> object:
    """One statement in ``schema`` on a connection of its own (test set-up, inspection)."""
    import asyncpg

    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        if args:
            return await conn.fetch(sql, *args)
        return await (conn.fetch(sql) if ";" not in sql.strip().rstrip(";") else conn.execute(sql))
    finally:
        await conn.close()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A schema name nobody else uses; dropped (with everything in it) after the test."""
    schema = fresh_name("cpt")
    yield schema
    asyncio.run(drop_schema(schema))


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = fresh_name("cpt")
    yield prefix  # channels only (pub/sub leaves no keys); nothing to delete


# A constraint trigger deferred to COMMIT: a send whose body starts with SLOW_MARKER waits there, holding
# its locks, for an advisory lock that the test holds (no sleeps, no timing). Meanwhile the test can
# terminate that backend or race another send; releasing the gate lets the COMMIT finish.
SLOW_MARKER = b"SLOW-COMMIT:"
GATE_CLASS = 7777


def install_slow_commit(gate: int) -> str:
    return f"""
CREATE TABLE slow_commit_gate (k INTEGER NOT NULL);
INSERT INTO slow_commit_gate VALUES ({gate});
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_xact_lock({GATE_CLASS}, (SELECT k FROM slow_commit_gate)); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON messages DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (substring(NEW.body FROM 1 FOR {len(SLOW_MARKER)}) = '\\x{SLOW_MARKER.hex()}'::bytea)
EXECUTE FUNCTION slow_commit();
"""


class CommitGate:
    """Holds the advisory lock that slow commits wait for (see ``install_slow_commit``)."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.key = secrets.randbelow(2**31 - 1) + 1
        self._conn: Any = None

    async def close_gate(self) -> None:
        import asyncpg

        self._conn = await asyncpg.connect(PG_URL)
        await self._conn.execute("SELECT pg_advisory_lock($1, $2)", GATE_CLASS, self.key)
        await pg_execute(self.schema, install_slow_commit(self.key))

    async def waiting_backend(self, timeout_s: float = 20) -> int:
        """The pid of the backend whose COMMIT waits at the gate (polls until there is one)."""
        assert self._conn is not None
        for _ in range(int(timeout_s / 0.02)):
            pid = await self._conn.fetchval(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND classid = $1 AND objid = $2 LIMIT 1", GATE_CLASS, self.key)
            if pid is not None:
                return int(pid)
            await asyncio.sleep(0.02)
        raise AssertionError("no COMMIT is waiting at the gate")

    async def waiters_on_heads(self, pid: int) -> int:
        """How many backends wait for a lock held by ``pid`` (e.g. a recipient's mailbox head)."""
        assert self._conn is not None
        return int(await self._conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid))

    async def open_gate(self) -> None:
        assert self._conn is not None
        await self._conn.execute("SELECT pg_advisory_unlock($1, $2)", GATE_CLASS, self.key)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


async def terminate(pid: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()
