"""Prekey directory: signature checks on upload, atomic consumption under concurrency, low-pool notice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from relay_harness import harness, mlkem_public, prekey_upload, run

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.prekeys import KemPrekey, PrekeyBundle, SignedPrekey
from cipherpost.protocol.frames import Bundle, Error, FetchBundle, Ok, PrekeysLow, UploadPrekeys

pytestmark = pytest.mark.usefixtures("relay_backend")  # every test on SQLite and on PostgreSQL


def test_upload_checks_every_signature(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            bob, bob_id = await h.user("bob")
            stranger = IdentityKeyPair.generate()
            forged = await bob.request(prekey_upload(stranger, bob.rid(), kem=1))
            assert isinstance(forged, Error) and forged.code == "bad_signature"
            # one bad key among good ones refuses the whole upload
            good = prekey_upload(bob_id, bob.rid(), one_time=2, kem=2)
            bad_kem = KemPrekey.create(stranger, 9, mlkem_public(), False).encode()
            mixed = UploadPrekeys(rid=bob.rid(), signed_prekey=good.signed_prekey, one_time=good.one_time,
                                  kem_one_time=[*good.kem_one_time, bad_kem],
                                  kem_last_resort=good.kem_last_resort)
            reply = await bob.request(mixed)
            assert isinstance(reply, Error) and reply.code == "bad_signature"
            flag = KemPrekey.create(bob_id, 5, mlkem_public(), True).encode()  # last-resort in one-time list
            reply = await bob.request(UploadPrekeys(rid=bob.rid(), kem_one_time=[flag]))
            assert isinstance(reply, Error) and reply.code == "bad_prekey"
            not_last = KemPrekey.create(bob_id, 5, mlkem_public(), False).encode()
            reply = await bob.request(UploadPrekeys(rid=bob.rid(), kem_last_resort=not_last))
            assert isinstance(reply, Error) and reply.code == "bad_prekey"
            garbage = await bob.request(UploadPrekeys(rid=bob.rid(), one_time=[b"\x93\x01\x02"]))
            assert isinstance(garbage, Error) and garbage.code == "bad_prekey"
            # nothing of the refused uploads was stored
            alice, _ = await h.user("alice")
            empty = await alice.request(FetchBundle(rid=alice.rid(), username="bob"))
            assert isinstance(empty, Error) and empty.code == "no_prekeys"
            ok = await bob.request(prekey_upload(bob_id, bob.rid(), one_time=2, kem=2))
            assert isinstance(ok, Ok) and ok.prekeys is not None
            assert (ok.prekeys.one_time, ok.prekeys.kem) == (2, 2)
    run(scenario())


def test_fetch_bundle_of_unknown_user(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            alice, _ = await h.user("alice")
            reply = await alice.request(FetchBundle(rid=alice.rid(), username="nobody"))
            assert isinstance(reply, Error) and reply.code == "unknown_user"
            bad = await alice.request(FetchBundle(rid=alice.rid(), username="No Body"))
            assert isinstance(bad, Error) and bad.code == "invalid_username"
    run(scenario())


def test_pool_limit(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_prekey_pool=3) as h:
            bob, bob_id = await h.user("bob")
            assert isinstance(await bob.request(prekey_upload(bob_id, bob.rid(), one_time=3)), Ok)
            over = await bob.request(prekey_upload(bob_id, bob.rid(), one_time=1, first_id=10))
            assert isinstance(over, Error) and over.code == "bad_prekey" and "3" in over.message
    run(scenario())


def test_concurrent_fetches_never_share_a_one_time_prekey(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, prekeys_low_threshold=5) as h:
            bob, bob_id = await h.user("bob")
            upload = prekey_upload(bob_id, bob.rid(), one_time=12, kem=8)
            assert isinstance(await bob.request(upload), Ok)
            fetchers = [(await h.user(f"fetcher{i}"))[0] for i in range(4)]

            async def fetch_many(client, n):  # type: ignore[no-untyped-def]
                replies = await asyncio.gather(*[
                    client.request(FetchBundle(rid=client.rid(), username="bob")) for _ in range(n)])
                return replies

            results = await asyncio.gather(*[fetch_many(c, 5) for c in fetchers])  # 20 fetches at once
            bundles = [b for r in results for b in r]
            assert all(isinstance(b, Bundle) for b in bundles)
            one_time = [b.one_time_prekey for b in bundles if b.one_time_prekey is not None]
            assert len(one_time) == 12 and len(set(one_time)) == 12
            assert set(one_time) == set(upload.one_time)
            kems = [b.kem_prekey for b in bundles]
            one_time_kems = [k for k in kems if k != upload.kem_last_resort]
            assert len(one_time_kems) == 8 and set(one_time_kems) == set(upload.kem_one_time)
            assert kems.count(upload.kem_last_resort) == 12  # last resort once the pool is empty
            for b in bundles:  # each bundle verifies as the client will check it
                verified = PrekeyBundle.from_parts(b.identity, b.signed_prekey, b.kem_prekey,
                                                   b.one_time_prekey)
                assert verified.identity == bob_id.public
                assert SignedPrekey.decode(b.signed_prekey).verify(bob_id.public) is None
            # the owner was told its pools ran low
            lows = []
            while not bob.pushes.empty():
                frame = bob.pushes.get_nowait()
                if isinstance(frame, PrekeysLow):
                    lows.append(frame)
            assert lows and lows[-1].one_time == 0 and lows[-1].kem == 0
    run(scenario())


def test_auth_reports_prekey_counts_and_low_pool(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, prekeys_low_threshold=3) as h:
            bob, bob_id = await h.user("bob")
            assert isinstance(await bob.request(prekey_upload(bob_id, bob.rid(), one_time=2, kem=5)), Ok)
            again = await h.connect()
            ok = await again.auth(bob_id, "bob")
            assert isinstance(ok, Ok) and ok.prekeys is not None
            assert (ok.prekeys.one_time, ok.prekeys.kem) == (2, 5)
            low = await again.next_push()
            assert isinstance(low, PrekeysLow) and low.one_time == 2
    run(scenario())
