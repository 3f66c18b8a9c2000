"""Account lifecycle frames against a real TLS relay: set_recovery, recover, delete_account, the login
counter and displacement (docs/wire.md "Accounts"), each refusal leaving the account as it was."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from relay_client import RelayClient
from relay_harness import Harness, harness, prekey_upload, run

from cipherpost.crypto.encoding import pack
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.recovery import RecoveryKey
from cipherpost.protocol.frames import (
    Auth,
    DeleteAccount,
    Error,
    FetchBundle,
    Ok,
    Recover,
    Register,
    SetRecovery,
)

pytestmark = pytest.mark.usefixtures("relay_backend")  # SQLite, and PostgreSQL when configured


def _bound(client: RelayClient, *items: bytes | str) -> bytes:
    return pack([client.hello.nonce, client.channel, *items])


async def _register(h: Harness, name: str) -> tuple[RelayClient, IdentityKeyPair, RecoveryKey]:
    identity = IdentityKeyPair.generate()
    key, _ = RecoveryKey.generate()
    client = await h.connect()
    reply = await client.request(Register(rid=client.rid(), username=name, identity=identity.public.encode(),
                                          sig=client.proof(identity, "register", name),
                                          recovery_public=key.public))
    assert isinstance(reply, Ok), reply
    return client, identity, key


def _recover_frame(client: RelayClient, name: str, new: IdentityKeyPair, key: RecoveryKey,
                   *, payload: bytes | None = None) -> Recover:
    payload = payload or _bound(client, name, new.public.encode())
    return Recover(rid=client.rid(), username=name, identity=new.public.encode(),
                   recovery_sig=key.sign("recover", payload), sig=new.sign("recover-identity", payload))


async def _auth(client: RelayClient, identity: IdentityKeyPair, name: str, counter: int | None) -> object:
    sig = client.proof(identity, "auth", name)
    return await client.request(Auth(rid=client.rid(), username=name, sig=sig, counter=counter))


async def _closed(client: RelayClient) -> tuple[int | None, str | None]:
    await asyncio.wait_for(asyncio.shield(client._reader), 10)
    return client.ws.close_code, client.ws.close_reason


def _code(reply: object) -> str:
    assert isinstance(reply, Error), reply
    return reply.code


def test_hello_announces_the_account_capabilities(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            client = await h.connect()
            assert {"accounts", "login_counter"} <= set(client.hello.caps)
    run(scenario())


def test_recover_rebinds_closes_old_connections_and_refuses_replays(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            old_conn, old_identity, key = await _register(h, "alice")
            assert isinstance(await old_conn.request(prekey_upload(old_identity, old_conn.rid(), one_time=3,
                                                                   kem=3)), Ok)
            new = IdentityKeyPair.generate()
            attempt = await h.connect()
            # The new identity must prove itself: a recovery signature alone is not enough.
            frame = _recover_frame(attempt, "alice", new, key)
            bad = Recover(rid=attempt.rid(), username="alice", identity=new.public.encode(),
                          recovery_sig=frame.recovery_sig, sig=old_identity.sign("recover-identity", b"x"))
            assert _code(await attempt.request(bad)) == "bad_signature"
            ok = await attempt.request(frame)
            assert isinstance(ok, Ok) and ok.username == "alice"
            assert await _closed(old_conn) == (4002, "the account was recovered on another device")
            # The old key is refused, the new one logs in; old prekeys are gone with the old key.
            again = await h.connect()
            assert _code(await _auth(again, old_identity, "alice", 1)) == "auth_failed"
            assert isinstance(await _auth(again, new, "alice", 1), Ok)
            bob, _, _ = await _register(h, "bob")
            assert _code(await bob.request(FetchBundle(rid=bob.rid(), username="alice"))) == "no_prekeys"
            # A captured recover frame is bound to its connection's nonce: useless elsewhere.
            replay = await h.connect()
            stolen = Recover(rid=replay.rid(), username="alice", identity=frame.identity,
                             recovery_sig=frame.recovery_sig, sig=frame.sig)
            assert _code(await replay.request(stolen)) == "bad_recovery"
    run(scenario())


def test_recover_refusals(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _, key = await _register(h, "alice")
            new = IdentityKeyPair.generate()
            # while authenticated
            assert _code(await alice.request(_recover_frame(alice, "alice", new, key))) == \
                "already_authenticated"
            c = await h.connect()
            assert _code(await c.request(_recover_frame(c, "nobody", new, key))) == "unknown_user"
            # an account without a recovery key (registered by an old client)
            legacy = IdentityKeyPair.generate()
            assert isinstance(await (await h.connect()).register(legacy, "legacy"), Ok)
            reply = await c.request(_recover_frame(c, "legacy", new, key))
            assert _code(reply) == "bad_recovery" and "no recovery key" in reply.message  # type: ignore[attr-defined]
            # the right key still works after all that
            assert isinstance(await c.request(_recover_frame(c, "alice", new, key)), Ok)
    run(scenario())


def test_recovery_attempts_are_limited_per_account(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, recovery_attempts_per_account_per_hour=2) as h:
            _, _, key = await _register(h, "alice")
            wrong, _ = RecoveryKey.generate()
            new = IdentityKeyPair.generate()
            c = await h.connect()
            for _ in range(2):
                assert _code(await c.request(_recover_frame(c, "alice", new, wrong))) == "bad_recovery"
            c = await h.connect()
            reply = await c.request(_recover_frame(c, "alice", new, key))
            assert _code(reply) == "rate_limited" and "this account" in reply.message  # type: ignore[attr-defined]
    run(scenario())


def test_set_recovery_replaces_the_key_and_checks_its_signature(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, identity, old_key = await _register(h, "alice")
            new_key, _ = RecoveryKey.generate()
            forged = SetRecovery(rid=alice.rid(), recovery_public=new_key.public,
                                 sig=IdentityKeyPair.generate().sign("set-recovery",
                                                                    _bound(alice, "alice", new_key.public)))
            assert _code(await alice.request(forged)) == "bad_signature"
            good = SetRecovery(rid=alice.rid(), recovery_public=new_key.public,
                               sig=identity.sign("set-recovery", _bound(alice, "alice", new_key.public)))
            assert isinstance(await alice.request(good), Ok)
            new = IdentityKeyPair.generate()
            c = await h.connect()
            assert _code(await c.request(_recover_frame(c, "alice", new, old_key))) == "bad_recovery"
            assert isinstance(await c.request(_recover_frame(c, "alice", new, new_key)), Ok)
    run(scenario())


def test_login_counter_refuses_old_copies_and_displaces_older_connections(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            _, identity, _ = await _register(h, "alice")
            first = await h.connect()
            assert isinstance(await _auth(first, identity, "alice", 5), Ok)
            for counter in (5, 4, None):   # equal, lower, none once the account uses a counter
                c = await h.connect()
                reply = await _auth(c, identity, "alice", counter)
                assert _code(reply) == "stale_profile", counter
            assert not first._reader.done()   # a refused login displaces nobody
            newer = await h.connect()
            assert isinstance(await _auth(newer, identity, "alice", 6), Ok)
            assert await _closed(first) == (4001, "displaced by a newer login")
            # A counter that is checked before the signature would let anyone lock the owner out.
            c = await h.connect()
            assert _code(await _auth(c, IdentityKeyPair.generate(), "alice", 1000)) == "auth_failed"
            assert isinstance(await _auth(await h.connect(), identity, "alice", 7), Ok)
    run(scenario())


def test_accounts_without_counters_keep_several_connections(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            _, identity, _ = await _register(h, "alice")
            conns = [await h.connect() for _ in range(3)]
            for c in conns:
                assert isinstance(await c.auth(identity, "alice"), Ok)
            assert not any(c._reader.done() for c in conns)
    run(scenario())


def test_delete_account_needs_the_identity_and_reserves_the_name(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, identity, _ = await _register(h, "alice")
            other = await h.connect()
            assert isinstance(await other.auth(identity, "alice"), Ok)
            stranger = IdentityKeyPair.generate()
            forged = DeleteAccount(rid=alice.rid(),
                                   sig=stranger.sign("delete-account", _bound(alice, "alice")))
            assert _code(await alice.request(forged)) == "bad_signature"
            sig = identity.sign("delete-account", _bound(alice, "alice"))
            ok = await alice.request(DeleteAccount(rid=alice.rid(), sig=sig))
            assert isinstance(ok, Ok)
            assert await _closed(alice) == (4003, "account deleted")
            assert await _closed(other) == (4003, "account deleted")
            c = await h.connect()
            assert _code(await c.register(IdentityKeyPair.generate(), "alice")) == "name_reserved"
            assert _code(await c.auth(identity, "alice")) == "unknown_user"
            bob, _, _ = await _register(h, "bob")
            reply = await bob.send("alice", b"x")
            assert _code(reply) in ("suspended", "unknown_user")
    run(scenario())


def test_register_refuses_an_invalid_recovery_key_and_look_alikes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            c = await h.connect()
            identity = IdentityKeyPair.generate()
            frame = Register(rid=c.rid(), username="alice", identity=identity.public.encode(),
                             sig=c.proof(identity, "register", "alice"), recovery_public=b"\x01" * 31)
            assert _code(await c.request(frame)) == "bad_frame"
            await _register(h, "alice")
            reply = await c.register(IdentityKeyPair.generate(), "a1ice")
            assert _code(reply) == "name_confusable" and "'alice'" in reply.message  # type: ignore[attr-defined]
            assert _code(await c.register(IdentityKeyPair.generate(), "admin")) == "name_reserved"
    run(scenario())


def test_recovery_attempts_are_limited_per_network(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, recovery_attempts_per_prefix_per_hour=2) as h:
            keys = {name: (await _register(h, name))[2] for name in ("alice", "bob", "carol")}
            new = IdentityKeyPair.generate()
            wrong, _ = RecoveryKey.generate()
            c = await h.connect()
            for name in ("alice", "bob"):       # one wrong attempt each: two from this network
                assert _code(await c.request(_recover_frame(c, name, new, wrong))) == "bad_recovery"
            c = await h.connect()
            reply = await c.request(_recover_frame(c, "carol", new, keys["carol"]))
            assert _code(reply) == "rate_limited" and "your network" in reply.message  # type: ignore[attr-defined]
            assert h.server.limiters.recovery_prefix.fail_closed  # type: ignore[attr-defined]
    run(scenario())
