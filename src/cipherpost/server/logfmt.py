"""Structured logs on stderr: one ``key=value`` line per event. Never secrets, bodies or signatures."""

from __future__ import annotations

import logging
import sys
import time


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"ts={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} " \
               f"logger={record.name} {record.getMessage()}"
        if record.exc_info and record.exc_info[0] is not None:
            line += f" exc={record.exc_info[0].__name__}"  # the type only: no traceback text in logs
        return line


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger("cipherpost")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    ws_logger = logging.getLogger("websockets")
    ws_logger.handlers[:] = [handler]
    ws_logger.setLevel(logging.WARNING)
