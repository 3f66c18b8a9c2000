"""Request handlers of the relay, one module per concern (docs/contracts.md section 6).

Each handler is a function ``(conn, frame) -> Awaitable | None`` that ``server/connection.py``
registers in its ``_HANDLERS`` table; it reaches the connection only through the members it needs.
"""

from typing import Final

# announced in hello.caps (docs/contracts.md section 5)
CAPS: Final = ("block", "send_many", "blobs", "drained", "epoch", "batch")
