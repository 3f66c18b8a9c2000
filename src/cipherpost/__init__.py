"""cipherpost: a self-hostable end-to-end encrypted messenger.

Layers (imports point downwards only)::

    cli/            what people type and see
    client/         the Client API (asyncio)
    server/         the relay (asyncio)
    protocol/       wire frames, sans-I/O
    crypto/         keys, PQXDH, Double Ratchet, sealing, safety numbers, PAKE, sans-I/O
    store/          storage interfaces and backends
"""

__version__ = "0.1.0"

__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> object:
    # ``cipherpost.Client`` without making ``import cipherpost`` (e.g. by the relay) load the client.
    if name == "Client":
        from .client.client import Client

        return Client
    raise AttributeError(f"module 'cipherpost' has no attribute {name!r}")
