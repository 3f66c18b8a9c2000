"""Accounts across relay instances (one PostgreSQL schema, one Redis bus, real processes): a newer
login, a recovery, a deletion or an operator's suspension on one instance ends the account's
connections on the others; a copy refused on one is refused on all."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from pg_support import NEEDS_REDIS, PG_URL, REDIS_URL, pg_schema, redis_prefix, with_query
from relay_client import RelayClient
from relay_harness import run
from test_multi_instance import Cluster, cluster

from cipherpost.crypto.encoding import pack
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.recovery import RecoveryKey
from cipherpost.protocol.frames import Auth, DeleteAccount, Error, Ok, Recover, Register

__all__ = ["pg_schema", "redis_prefix"]  # fixtures, imported for pytest


async def _login(c: Cluster, i: int, name: str, identity: IdentityKeyPair, counter: int) -> RelayClient:
    client = await RelayClient.connect(c.url(i), c.cert)
    reply = await client.request(Auth(rid=client.rid(), username=name,
                                      sig=client.proof(identity, "auth", name), counter=counter))
    assert isinstance(reply, Ok), reply
    return client


async def _closed(client: RelayClient) -> tuple[int | None, str | None]:
    await asyncio.wait_for(asyncio.shield(client._reader), 20)
    return client.ws.close_code, client.ws.close_reason


@NEEDS_REDIS
def test_account_endings_reach_connections_on_other_instances(tmp_path: Path, pg_schema: str,
                                                               redis_prefix: str) -> None:
    bus = with_query(REDIS_URL, "prefix", redis_prefix)
    with cluster(tmp_path, pg_schema, bus, 2) as c:
        async def scenario() -> None:
            identity, (key, _) = IdentityKeyPair.generate(), RecoveryKey.generate()
            first = await RelayClient.connect(c.url(0), c.cert)
            assert isinstance(await first.request(Register(
                rid=first.rid(), username="alice", identity=identity.public.encode(),
                sig=first.proof(identity, "register", "alice"), recovery_public=key.public)), Ok)
            await first.close()
            # A newer login on instance 1 displaces the older one on instance 0.
            older = await _login(c, 0, "alice", identity, 1)
            newer = await _login(c, 1, "alice", identity, 2)
            assert await _closed(older) == (4001, "displaced by a newer login")
            # The counter is shared: the older copy is refused on either instance.
            for i in (0, 1):
                stale = await RelayClient.connect(c.url(i), c.cert)
                reply = await stale.request(Auth(rid=stale.rid(), username="alice",
                                                 sig=stale.proof(identity, "auth", "alice"), counter=2))
                assert isinstance(reply, Error) and reply.code == "stale_profile"
            # A recovery on instance 0 ends the connection on instance 1.
            new = IdentityKeyPair.generate()
            recovering = await RelayClient.connect(c.url(0), c.cert)
            payload = pack([recovering.hello.nonce, recovering.channel, "alice", new.public.encode()])
            assert isinstance(await recovering.request(Recover(
                rid=recovering.rid(), username="alice", identity=new.public.encode(),
                recovery_sig=key.sign("recover", payload), sig=new.sign("recover-identity", payload))), Ok)
            assert await _closed(newer) == (4002, "the account was recovered on another device")
            # The new key logs in on the other instance at once (its cached identity was dropped).
            on_one = await _login(c, 1, "alice", new, 1)
            assert await _closed(recovering) == (4001, "displaced by a newer login")
            # An operator suspends alice (another process, the shared store): both instances act.
            result = subprocess.run([sys.executable, "-m", "cipherpost", "admin", "--store",
                                     with_query(PG_URL, "schema", pg_schema), "--as", "ops", "suspend",
                                     "alice"], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert await _closed(on_one) == (4003, "account suspended by the relay's operator")
            result = subprocess.run([sys.executable, "-m", "cipherpost", "admin", "--store",
                                     with_query(PG_URL, "schema", pg_schema), "--as", "ops", "unsuspend",
                                     "alice"], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            # A deletion on instance 1 ends the connection on instance 0.
            on_zero = await _login(c, 0, "alice", new, 2)
            deleting = await _login(c, 1, "alice", new, 3)
            assert await _closed(on_zero) == (4001, "displaced by a newer login")
            on_zero = await RelayClient.connect(c.url(0), c.cert)   # a counter-less old client
            assert (await on_zero.auth(new, "alice")).t == "error"  # the account uses a counter
            sig = new.sign("delete-account", pack([deleting.hello.nonce, deleting.channel, "alice"]))
            assert isinstance(await deleting.request(DeleteAccount(rid=deleting.rid(), sig=sig)), Ok)
            assert await _closed(deleting) == (4003, "account deleted")
            again = await RelayClient.connect(c.url(0), c.cert)
            reply = await again.register(IdentityKeyPair.generate(), "alice")
            assert isinstance(reply, Error) and reply.code == "name_reserved"
        run(scenario(), timeout=120)
