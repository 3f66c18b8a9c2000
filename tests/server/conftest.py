"""Fixtures shared by the relay tests: the store backend a relay-level suite runs against.

A module that sets ``pytestmark = pytest.mark.usefixtures("relay_backend")`` runs every test twice:
on SQLite (a file in the test's data dir) and on PostgreSQL (a fresh schema, dropped afterwards;
skipped with its reason when CIPHERPOST_TEST_POSTGRES is unset). ``relay_harness.relay`` reads the
choice from ``relay_harness.BACKEND_OVERRIDES``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
import relay_harness
from pg_support import NEEDS_POSTGRES, PG_URL, drop_schema, fresh_name, with_query

from cipherpost.server.backends import STORE_ENV


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=NEEDS_POSTGRES)])
def relay_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        yield "sqlite"
        return
    schema = fresh_name("cpt")
    url = with_query(PG_URL, "schema", schema)
    relay_harness.BACKEND_OVERRIDES["store_url"] = url
    old = os.environ.get(STORE_ENV)
    os.environ[STORE_ENV] = url  # for the CLI commands a test runs (cipherpost invite)
    try:
        yield "postgres"
    finally:
        relay_harness.BACKEND_OVERRIDES.clear()
        if old is None:
            os.environ.pop(STORE_ENV, None)
        else:
            os.environ[STORE_ENV] = old
        asyncio.run(drop_schema(schema))
