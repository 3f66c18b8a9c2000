"""Standard output for commands that print: each line written and flushed before it counts.

``recv`` marks a message shown only after :func:`line` returned for it, so ``cipherpost recv |
head -1`` shows one message and leaves the rest for the next ``recv``. A reader that goes away
(``head`` exits, a closed pipe) raises :class:`OutputClosed`; ``main`` ends the command quietly
with :data:`EXIT_PIPE_CLOSED`, as a program killed by SIGPIPE would (Python docs, "Note on
SIGPIPE" in the signal module: stdout is pointed at /dev/null so the interpreter's final flush
cannot print a second error).
"""

from __future__ import annotations

import contextlib
import os
import sys

EXIT_PIPE_CLOSED = 128 + 13   # 141: what a shell reports for a program ended by SIGPIPE


class OutputClosed(Exception):
    """Whoever read standard output has gone away; nothing more can be shown."""


def line(text: str) -> None:
    """Write one line to standard output and flush it (OutputClosed if the reader is gone)."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None


def silence_stdout() -> None:
    """Point standard output at /dev/null, so that exiting does not try to flush into a closed pipe."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
