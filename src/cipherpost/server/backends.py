"""The store and bus a relay runs on, chosen by ``ServerConfig.store_url`` / ``bus_url``.

No URL: the zero-setup default (SQLite file in the data dir, in-process bus). ``postgresql://`` and
``redis://`` load the optional backends (``pip install 'cipherpost[scale]'``) only when asked for.
"""

from __future__ import annotations

from ..store.base import RelayStore
from ..store.sqlite import SqliteRelayStore
from .bus import Bus, LocalBus
from .config import ServerConfig

STORE_ENV = "CIPHERPOST_STORE"
BUS_ENV = "CIPHERPOST_BUS"


def make_store(config: ServerConfig) -> RelayStore:
    url = config.store_url
    if url is None:
        return SqliteRelayStore(config.db_path, synchronous=config.sqlite_synchronous)
    if url.startswith("sqlite:"):
        return SqliteRelayStore(url.removeprefix("sqlite:"), synchronous=config.sqlite_synchronous)
    from ..store.postgres import PostgresRelayStore  # needs asyncpg

    return PostgresRelayStore(url)


def make_bus(config: ServerConfig) -> Bus:
    if config.bus_url is None:
        return LocalBus()
    from .bus import RedisBus  # needs redis

    return RedisBus(config.bus_url)


def describe(url: str | None) -> str:
    """What to log about a store or bus URL: its kind and place, never a password."""
    if url is None:
        return "default"
    scheme, _, rest = url.partition(":")
    host = rest.lstrip("/").rpartition("@")[2].split("?", 1)[0]
    return f"{scheme}://{host}" if scheme != "sqlite" else url
