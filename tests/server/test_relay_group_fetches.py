"""Group setup's own bundle-fetch budget (docs/groups.md section 2, docs/server.md "Limits")."""

from __future__ import annotations

from pathlib import Path

from relay_client import RelayClient
from relay_harness import harness, prekey_upload, run

from cipherpost.protocol.frames import Bundle, Error, FetchBundle, Ok


def test_group_fetches_have_their_own_budget(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, bundle_fetches_per_hour=2, group_bundle_fetches_per_hour=3) as h:
            names = ("bob", "dave", "erin", "frank", "gina")
            for name in names:
                client, identity = await h.user(name)
                assert isinstance(await client.request(prekey_upload(identity, client.rid(), one_time=3,
                                                                     kem=3)), Ok)
            carol, _ = await h.user("carol")

            async def fetch(client: RelayClient, name: str, group: bool) -> Bundle | Error:
                reply = await client.request(FetchBundle(rid=client.rid(), username=name, group=group))
                assert isinstance(reply, Bundle | Error)
                return reply

            assert isinstance(await fetch(carol, "bob", False), Bundle)
            assert isinstance(await fetch(carol, "dave", False), Bundle)
            plain = await fetch(carol, "erin", False)
            assert isinstance(plain, Error) and plain.code == "rate_limited" and "2 per hour" in plain.message
            for name in ("erin", "frank", "gina"):      # the 1:1 budget is spent; group setup goes on
                assert isinstance(await fetch(carol, name, True), Bundle)
            over = await fetch(carol, "bob", True)
            assert isinstance(over, Error) and over.code == "rate_limited"
            assert "group prekey bundle fetches" in over.message and "3 per hour" in over.message
    run(scenario())


def test_group_fetch_budget_flag_and_default(tmp_path: Path) -> None:
    import argparse

    from cipherpost.cli.server_cmd import config_from_args, register
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    default = config_from_args(parser.parse_args(["server", "--data", str(tmp_path)]))
    assert default.group_bundle_fetches_per_hour == 1000
    set_ = config_from_args(parser.parse_args(["server", "--data", str(tmp_path),
                                               "--group-bundle-fetches-per-hour", "50"]))
    assert set_.group_bundle_fetches_per_hour == 50
