"""The relay on PostgreSQL when the database connection breaks: an error the client can act on, never
a silent drop, and a retry that stores the message once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pg_support import NEEDS_POSTGRES, PG_URL, SLOW_MARKER, CommitGate, pg_schema, terminate, with_query
from relay_harness import harness, run

from cipherpost.protocol.frames import Accepted, Error, Send

pytestmark = NEEDS_POSTGRES
__all__ = ["pg_schema"]  # the fixture, imported for pytest


def test_send_whose_commit_is_cut_off_gets_an_error_and_its_retry_is_stored_once(
        tmp_path: Path, pg_schema: str) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, store_url=with_query(PG_URL, "schema", pg_schema)) as h:
            alice, _ = await h.user("alice")
            bob, _ = await h.user("bob")
            gate = CommitGate(pg_schema)
            await gate.close_gate()
            msg_id = os.urandom(16)
            body = SLOW_MARKER + b"hello"
            try:
                sending = asyncio.create_task(
                    alice.request(Send(rid=alice.rid(), to="bob", id=msg_id, kind="msg", body=body), 30))
                pid = await gate.waiting_backend()  # the send's COMMIT is in progress
                await terminate(pid)
                reply = await sending
                assert isinstance(reply, Error) and reply.code == "internal" and "retry" in reply.message
                await gate.open_gate()
                retry = await alice.request(Send(rid=alice.rid(), to="bob", id=msg_id, kind="msg", body=body))
                again = await alice.request(Send(rid=alice.rid(), to="bob", id=msg_id, kind="msg", body=body))
                assert isinstance(retry, Accepted) and isinstance(again, Accepted)
            finally:
                await gate.close()
            [m] = await bob.receive_messages(1)
            assert (m.id, m.body) == (msg_id, body)
            assert (await h.server.store.stats()).queued_messages == 1  # once, not twice
            # the relay goes on serving with fresh connections from its pool
            assert isinstance(await alice.send("bob", b"next"), Accepted)
            assert [x.body for x in await bob.receive_messages(1)] == [b"next"]
    run(scenario(), timeout=60)
