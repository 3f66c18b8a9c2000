"""Bounded state (issue 9): nothing a user sends grows relay memory without limit, unknown-user
logins count as failures, registrations are limited per address prefix, prekey re-uploads are
refused before any signature work, and draining one target's one-time prekeys is bounded without
ever refusing a first contact. Each against a real relay over real TLS."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

from relay_client import RelayClient
from relay_harness import harness, prekey_upload, run

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.prekeys import KemPrekey
from cipherpost.protocol.frames import Accepted, Bundle, Error, FetchBundle, Ok, Ping, Pong, Send


def test_pake_sends_to_made_up_names_leave_no_limiter_state(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, pake_per_hour=2, rate_per_second=1e6, rate_burst=10**6) as h:
            alice, _ = await h.user("alice")
            await h.user("bob")
            replies = await asyncio.gather(*[
                alice.request(Send(rid=alice.rid(), to=f"nobody-{os.urandom(6).hex()}", id=os.urandom(16),
                                   kind="pake", body=b"x")) for _ in range(300)])
            assert all(isinstance(r, Error) and r.code == "unknown_user" for r in replies)
            from cipherpost.server.limits import MemoryLimiter
            pake = h.server.limiters.pake
            assert isinstance(pake, MemoryLimiter) and len(pake) == 0
            # an existing recipient is limited as before: one key, 2 per hour
            sent = [await alice.send("bob", b"spake2", kind="pake") for _ in range(3)]
            assert [type(r) for r in sent] == [Accepted, Accepted, Error]
            assert isinstance(sent[2], Error) and sent[2].code == "rate_limited"
            assert len(pake) == 1
    run(scenario())


def test_every_in_memory_limiter_has_a_hard_key_cap(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, limiter_max_keys=3, registrations_per_prefix_per_hour=100) as h:
            bob, bob_id = await h.user("bob")
            assert isinstance(await bob.request(prekey_upload(bob_id, bob.rid(), one_time=20, kem=20)), Ok)
            for i in range(8):  # 8 requesters: 8 keys offered to the per-requester and per-pair limiters
                client, _ = await h.user(f"req{i}")
                assert isinstance(await client.request(FetchBundle(rid=client.rid(), username="bob")), Bundle)
            memory = h.server.limiters._memory
            # recovery adds 2 limiters, group setup fetches 1
            assert len(memory) == 14 and all(lim.max_keys == 3 for lim in memory)
            assert all(len(lim) <= 3 for lim in memory)
            assert h.server.limiters.fetch.evictions >= 5  # type: ignore[attr-defined]
    run(scenario())


def test_auth_for_unknown_users_counts_as_a_failure(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_auth_failures=3) as h:
            prober = await h.connect()
            stranger = IdentityKeyPair.generate()
            for name in ("anna", "ben"):
                reply = await prober.auth(stranger, name)
                assert isinstance(reply, Error) and reply.code == "unknown_user"
            assert h.server.metrics.auth_failure == 2
            reply = await prober.auth(stranger, "carl")  # the third failure closes the connection
            assert isinstance(reply, Error) and reply.code == "unknown_user"
            await asyncio.wait_for(prober.ws.wait_closed(), 5)
            assert prober.ws.close_code == 1008 and "failed authentication" in prober.ws.close_reason
    run(scenario())


def test_auth_failures_are_counted_per_address_prefix_across_connections(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, auth_failures_per_prefix_per_hour=4, max_auth_failures=100) as h:
            _, alice_id = await h.user("alice")
            stranger = IdentityKeyPair.generate()
            for _ in range(2):  # reconnecting does not reset the count
                prober = await h.connect()
                for _ in range(2):
                    assert (await prober.auth(stranger, "nobody")).t == "error"
            prober = await h.connect()
            assert (await prober.auth(stranger, "nobody")).t == "error"  # the 5th: over the limit
            await asyncio.wait_for(prober.ws.wait_closed(), 5)
            assert "from this network" in prober.ws.close_reason
            # a correct login from the same prefix is never refused by others' failures
            again = await h.connect()
            assert isinstance(await again.auth(alice_id, "alice"), Ok)
            # another prefix has its own count
            other = await RelayClient.connect(h.server.url, h.cert, local_addr=("127.0.9.1", 0))
            h.clients.append(other)
            assert (await other.auth(stranger, "nobody")).t == "error"
            assert isinstance(await other.request(Ping(rid=other.rid())), Pong)
    run(scenario())


def test_registrations_are_limited_per_address_prefix(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, registrations_per_prefix_per_hour=3) as h:
            await h.user("user0")
            client = await h.connect()
            taken = await client.register(IdentityKeyPair.generate(), "user0")  # refused: costs nothing
            assert isinstance(taken, Error) and taken.code == "username_taken"
            for i in (1, 2):
                await h.user(f"user{i}")
            refused = await client.register(IdentityKeyPair.generate(), "user3")
            assert isinstance(refused, Error) and refused.code == "rate_limited"
            assert "from this network" in refused.message and "3 per hour" in refused.message
            assert await h.server.store.get_identity("user3") is None
            # the same /24 is one party; another /24 is not
            same = await RelayClient.connect(h.server.url, h.cert, local_addr=("127.0.0.77", 0))
            h.clients.append(same)
            assert (await same.register(IdentityKeyPair.generate(), "user4")).t == "error"
            other = await RelayClient.connect(h.server.url, h.cert, local_addr=("127.0.5.1", 0))
            h.clients.append(other)
            assert isinstance(await other.register(IdentityKeyPair.generate(), "user5"), Ok)
    run(scenario())


def test_prekey_reuploads_are_refused_before_any_signature_work(tmp_path: Path) -> None:
    """Four abusive accounts re-upload the same 150 signed KEM prekeys in a loop (each was 150
    signature checks and an fsynced 200 KB write); once over their budget every upload is refused
    before a signature is checked, and a legitimate send still goes through."""

    async def scenario() -> None:
        async with harness(tmp_path, prekey_uploads_per_account_per_hour=1000,
                           rate_per_second=1e6, rate_burst=10**6) as h:
            alice, _ = await h.user("alice")
            await h.user("bob")
            abusers = [await h.user(f"abuser{i}") for i in range(4)]
            frames = {name: prekey_upload(identity, 0, kem=150)
                      for name, (_, identity) in zip("abcd", abusers, strict=True)}

            async def abuse(client: RelayClient, key: str) -> list[str]:
                out = []
                for _ in range(20):
                    reply = await client.request(replace(frames[key], rid=client.rid()))
                    out.append(reply.t if isinstance(reply, Ok) else reply.code)  # type: ignore[union-attr]
                return out

            results = await asyncio.gather(*[abuse(client, key)
                                             for (client, _), key in zip(abusers, "abcd", strict=True)])
            for outcome in results:  # 1000 keys per hour: 6 uploads of 152 keys, then refusals
                assert outcome[:6] == ["ok"] * 6 and outcome[6:] == ["rate_limited"] * 14
            # refused before the signatures: a forged upload over the budget reads rate_limited
            client, _ = abusers[0]
            forged = await client.request(prekey_upload(IdentityKeyPair.generate(), client.rid(), kem=150))
            assert isinstance(forged, Error) and forged.code == "rate_limited"
            assert isinstance(await alice.send("bob", b"still works"), Accepted)
    run(scenario())


def test_pool_size_and_key_ids_are_checked_before_signatures(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_prekey_pool=100) as h:
            bob, bob_id = await h.user("bob")
            forged_big = prekey_upload(IdentityKeyPair.generate(), bob.rid(), kem=150)  # bad signatures
            reply = await bob.request(forged_big)
            assert isinstance(reply, Error) and reply.code == "bad_prekey" and "exceed 100" in reply.message
            forged = prekey_upload(IdentityKeyPair.generate(), bob.rid(), kem=2)
            repeated = replace(forged, rid=bob.rid(), kem_one_time=[forged.kem_one_time[0]] * 2)
            reply = await bob.request(repeated)
            assert isinstance(reply, Error) and reply.code == "bad_prekey"
            assert "repeats a key id" in reply.message
            assert isinstance(await bob.request(prekey_upload(bob_id, bob.rid(), kem=2)), Ok)
    run(scenario())


def test_draining_a_targets_pool_is_bounded_and_first_contact_still_works(tmp_path: Path) -> None:
    """Six throwaway accounts fetch the target's bundle again and again: at most the per-target
    bound of one-time keys is spent per hour; beyond it every fetch still gets a bundle, with the
    last-resort KEM prekey and no one-time X25519 prekey."""

    async def scenario() -> None:
        async with harness(tmp_path, one_time_prekeys_per_target_per_hour=5) as h:
            bob, bob_id = await h.user("bob")
            assert isinstance(await bob.request(prekey_upload(bob_id, bob.rid(), one_time=40, kem=40)), Ok)
            throwaways = [(await h.user(f"throwaway{i}"))[0] for i in range(6)]
            bundles: list[Bundle] = []
            for _ in range(3):
                for client in throwaways:
                    reply = await client.request(FetchBundle(rid=client.rid(), username="bob"))
                    assert isinstance(reply, Bundle), reply
                    bundles.append(reply)
            with_one_time = [b for b in bundles if b.one_time_prekey is not None]
            assert len(with_one_time) == 5
            assert all(not KemPrekey.decode(b.kem_prekey).last_resort for b in with_one_time)
            rest = [b for b in bundles if b.one_time_prekey is None]
            assert len(rest) == 13 and all(KemPrekey.decode(b.kem_prekey).last_resort for b in rest)
            counts = await h.server.store.prekey_counts("bob")
            assert (counts.one_time, counts.kem) == (35, 35)
            assert h.server.metrics.bundles_last_resort == 13
    run(scenario())
