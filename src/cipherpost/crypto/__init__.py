"""Pure, sans-I/O cryptography for cipherpost, built only on pyca/cryptography.

Nothing here opens a file or a socket or knows about asyncio: functions take keys, state and bytes
and return bytes and new state. Every private key object hides its secret from ``repr``.
"""
