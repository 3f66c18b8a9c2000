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
