"""Fixtures for the end-to-end tests (see e2e_support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import RelayProcess, User


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    server = RelayProcess(tmp_path / "server-data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_user(tmp_path: Path, relay: RelayProcess):  # type: ignore[no-untyped-def]
    def make(name: str, *, init: bool = True) -> User:
        user = User(name, tmp_path / f"home-{name}")
        if init:
            user.ok("init", name, "--server", relay.url, "--server-fingerprint", relay.fingerprint)
        return user
    return make
