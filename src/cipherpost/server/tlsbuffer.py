"""The one standard-library override in cipherpost: one TLS read buffer per event loop.

Why. ``asyncio.sslproto.SSLProtocol`` (CPython 3.11+) gives every TLS connection its own
``bytearray(SSLProtocol.max_size)``: 256 KiB, allocated and zero-filled at accept, before the
handshake. For a relay holding 10,000 mostly idle connections that is 2.5 GiB of memory that holds
no data: the buffer is only a landing area for ``recv_into``. On a selector event loop the
transport calls ``get_buffer()``, then ``sock.recv_into(buf)``, then ``buffer_updated(n)``, all in
one synchronous callback, and ``buffer_updated`` copies the bytes into the connection's
``ssl.MemoryBIO`` before it returns (``self._incoming.write(view[:n])``). Nothing reads the
buffer afterwards, so every connection of one event loop can share one buffer of the same size.

How. ``SharedReadBufferSSLProtocol`` subclasses ``SSLProtocol``: its ``__init__`` shadows
``max_size`` with 0 while the base ``__init__`` runs (so the base allocates an empty bytearray),
then points ``_ssl_buffer``/``_ssl_buffer_view`` at the event loop's shared buffer. On the server
side it also defers the ``ssl.SSLObject`` until the client's first bytes arrive (``_do_handshake``):
a connection that never sends a byte then costs no OpenSSL state at all (about 41 KiB otherwise).
Nothing else changes: reads, handshake, timeouts, shutdown and flow control are the standard
library's. The private names this relies on (``_ssl_buffer``, ``_ssl_buffer_view``, ``_sslobj``,
``_incoming``, ``_outgoing``, ``_sslcontext``, ``_server_side``, ``_do_handshake``) are those of
CPython 3.11-3.13's ``asyncio/sslproto.py``; the tests below fail if they stop meaning that. ``install()``
makes asyncio use the subclass by rebinding ``asyncio.sslproto.SSLProtocol``, the name that
``BaseSelectorEventLoop._make_ssl_transport`` and ``loop.start_tls`` look up at each connection.
No installed file is edited; ``install()`` is idempotent and called by ``RelayServer.start``.

Where it does not apply. A proactor event loop (Windows) hands the buffer to an overlapped
``recv_into`` that completes later, so sharing would be unsafe there: connections of a loop that is
not a ``BaseSelectorEventLoop`` keep their own buffer, exactly as without the override. uvloop has
its own TLS implementation and never uses this class.

Guarded by ``tests/server/test_relay_memory.py::test_tls_connections_share_one_read_buffer``
(fails if asyncio stops using the subclass or the attribute names change) and
``test_idle_tls_connections_cost_less_than_a_read_buffer_each`` (relay RSS per connection).
"""

from __future__ import annotations

import asyncio
import weakref
from asyncio import sslproto
from typing import Any

RECV_BYTES = 32 * 1024  # most bytes read from a socket at once (see get_buffer)
_STDLIB_SSL_PROTOCOL: type[sslproto.SSLProtocol] = sslproto.SSLProtocol
_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[bytearray, memoryview]] = (
    weakref.WeakKeyDictionary())


def _shared_buffer(loop: asyncio.AbstractEventLoop, size: int) -> tuple[bytearray, memoryview] | None:
    """The loop's shared read buffer, or None when the loop reads asynchronously into buffers."""
    if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        return None
    pair = _shared.get(loop)
    if pair is None:
        buf = bytearray(size)
        pair = (buf, memoryview(buf))
        _shared[loop] = pair
    return pair


class SharedReadBufferSSLProtocol(_STDLIB_SSL_PROTOCOL):  # type: ignore[misc, valid-type]
    """``SSLProtocol`` whose read buffer is shared by every connection of its event loop, and
    whose server-side TLS state is made when the first byte arrives."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *args: Any, **kwargs: Any) -> None:
        self.max_size = 0  # the base __init__ allocates bytearray(self.max_size)
        super().__init__(loop, *args, **kwargs)
        del self.max_size  # back to the class value (256 KiB) for SSLObject.read()
        pair = _shared_buffer(loop, RECV_BYTES)
        if pair is None:  # not a selector loop: a private buffer, as the standard library does
            buf = bytearray(RECV_BYTES)
            pair = (buf, memoryview(buf))
        self._ssl_buffer, self._ssl_buffer_view = pair
        if self._server_side:
            self._sslobj = None  # made when the first byte arrives: see _do_handshake

    def get_buffer(self, n: int) -> memoryview:
        """At most ``RECV_BYTES`` per read: what one read brings in passes through the connection's
        incoming ``ssl.MemoryBIO``, whose OpenSSL buffer keeps the size of the largest write it
        ever took. With 256 KiB reads, every connection that once received a burst would keep
        256 KiB for good; with 32 KiB reads it keeps at most that, and bulk transfers still move
        32 KiB per system call."""
        view: memoryview = self._ssl_buffer_view  # the shared buffer is RECV_BYTES long
        return view

    def _do_handshake(self) -> None:
        """Server side: create the ``SSLObject`` and start the handshake only once the client's
        first bytes are in. Until then OpenSSL has nothing to do, yet its first ``do_handshake``
        would allocate its record buffers (about 32 KiB) and ``SSL_new`` about 9 KiB more, for a
        connection that may never send a byte. ``connection_made`` (``_start_handshake``) has
        already armed the handshake timeout; ``buffer_updated`` calls this again with data."""
        if self._sslobj is None:
            if not self._incoming.pending:
                return
            self._sslobj = self._sslcontext.wrap_bio(self._incoming, self._outgoing, server_side=True,
                                                     server_hostname=None)
        super()._do_handshake()


def install() -> None:
    """Make asyncio create ``SharedReadBufferSSLProtocol`` for every TLS connection from now on."""
    sslproto.SSLProtocol = SharedReadBufferSSLProtocol  # type: ignore[misc]


def installed() -> bool:
    return sslproto.SSLProtocol is SharedReadBufferSSLProtocol


__all__ = ["SharedReadBufferSSLProtocol", "install", "installed"]
