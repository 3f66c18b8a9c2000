"""Operator actions reach a running relay: poll the operator log, close what it ended.

``cipherpost admin`` works on the relay's store, possibly from another process (or, with
PostgreSQL, another machine). Every action it takes is appended to the store's operator log; each
relay reads the new entries every ``operator_poll_s`` seconds (default 2) and closes the live
connections of accounts that were suspended or deleted (close code 4003). New logins and sends
need no poll: they read the account's state from the store (``handlers/accounts.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..store.base import OperatorAction
from .handlers.accounts import CLOSE_ACCOUNT_GONE

if TYPE_CHECKING:
    from .app import RelayServer

log = logging.getLogger("cipherpost.server")

PAGE = 256
ENDING_ACTIONS = {"suspend": "account suspended by the relay's operator",
                  "delete": "account deleted by the relay's operator"}


class OperatorWatch:
    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.last_id = 0

    async def skip_history(self) -> None:
        """Start after the last entry: what happened before this relay started is in the store."""
        while page := await self.server.store.operator_log(self.last_id, PAGE):
            self.last_id = page[-1].id

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.server.config.operator_poll_s)
            try:
                await self.poll()
            except Exception as exc:  # the watch must outlive a failed read (a busy database)
                log.error("event=operator_poll_failed error=%s", type(exc).__name__)

    async def poll(self) -> None:
        while page := await self.server.store.operator_log(self.last_id, PAGE):
            for action in page:
                self.apply(action)
            self.last_id = page[-1].id

    def apply(self, action: OperatorAction) -> None:
        reason = ENDING_ACTIONS.get(action.action)
        for name in action.names:
            self.server.forget_identity(name)
            if reason is None:
                continue
            for conn in self.server.connections_of(name):
                if not conn.closed:
                    log.info("event=closed_by_operator user=%s peer=%s action=%s", name, conn.peer,
                             action.action)
                    conn.close_now(CLOSE_ACCOUNT_GONE, reason)
