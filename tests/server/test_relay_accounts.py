"""Registration, registration modes, and authentication against a real TLS relay."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from relay_client import RelayClient
from relay_harness import REPO, SERVER_MAIN, harness, run

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Auth, Error, FetchBundle, Ok, Ping, Pong, Register, Send

pytestmark = pytest.mark.usefixtures("relay_backend")  # every test on SQLite and on PostgreSQL


def test_register_then_username_rules(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            client, _ = await h.user("alice")
            # the channel binding the client computed from TLS is the server's certificate hash
            assert client.channel == h.server.channel_binding
            again = await h.connect()
            taken = await again.register(IdentityKeyPair.generate(), "alice")
            assert isinstance(taken, Error) and taken.code == "username_taken"
            not_normal = await again.register(IdentityKeyPair.generate(), "Bob")
            assert isinstance(not_normal, Error) and not_normal.code == "invalid_username"
            assert "normal form" in not_normal.message and "'bob'" in not_normal.message
            for bad in ("ab", "a" * 33, "bob!", "_bob", "bo b"):
                reply = await again.register(IdentityKeyPair.generate(), bad)
                assert isinstance(reply, Error) and reply.code == "invalid_username", bad
            # a failed register leaves the connection usable: register another name on it
            ok = await again.register(IdentityKeyPair.generate(), "bob.smith-2")
            assert isinstance(ok, Ok) and ok.username == "bob.smith-2"
            twice = await again.register(IdentityKeyPair.generate(), "carol")
            assert isinstance(twice, Error) and twice.code == "already_authenticated"
    run(scenario())


def test_register_requires_proof_of_possession(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            client = await h.connect()
            owner, thief = IdentityKeyPair.generate(), IdentityKeyPair.generate()
            forged = await client.request(Register(
                rid=client.rid(), username="mallory", identity=owner.public.encode(),
                sig=client.proof(thief, "register", "mallory")))
            assert isinstance(forged, Error) and forged.code == "auth_failed"
            # a signature made for "auth" is not a registration proof (domain separation)
            wrong_label = await client.request(Register(
                rid=client.rid(), username="mallory", identity=owner.public.encode(),
                sig=client.proof(owner, "auth", "mallory")))
            assert isinstance(wrong_label, Error) and wrong_label.code == "auth_failed"
            # nothing was created
            probe = await h.connect()
            unknown = await probe.auth(owner, "mallory")
            assert isinstance(unknown, Error) and unknown.code == "unknown_user"
    run(scenario())


def test_closed_registration(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, registration="closed") as h:
            client = await h.connect()
            reply = await client.register(IdentityKeyPair.generate(), "alice")
            assert isinstance(reply, Error) and reply.code == "registration_closed"
    run(scenario())


def _invite(data: Path) -> str:
    out = subprocess.run([sys.executable, "-c", SERVER_MAIN, "invite", "--data", str(data), "--create"],
                         cwd=REPO,
                         capture_output=True, text=True, timeout=30, check=True)
    token = out.stdout.strip()
    assert len(token) >= 20
    return token


def test_invite_registration(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = _invite(data)  # before the server runs: the CLI creates the database

    async def scenario() -> None:
        async with harness(data, registration="invite") as h:
            client = await h.connect()
            missing = await client.register(IdentityKeyPair.generate(), "alice")
            assert isinstance(missing, Error) and missing.code == "bad_invite"
            wrong = await client.register(IdentityKeyPair.generate(), "alice", invite="not-a-token")
            assert isinstance(wrong, Error) and wrong.code == "bad_invite"
            ok = await client.register(IdentityKeyPair.generate(), "alice", invite=token)
            assert isinstance(ok, Ok)
            reuse = await (await h.connect()).register(IdentityKeyPair.generate(), "bob", invite=token)
            assert isinstance(reuse, Error) and reuse.code == "bad_invite"
            # an invite issued while the server runs works too
            fresh = _invite(data)
            ok2 = await (await h.connect()).register(IdentityKeyPair.generate(), "bob", invite=fresh)
            assert isinstance(ok2, Ok)
    run(scenario())


def test_auth_success_and_failures(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            first, alice = await h.user("alice")
            await first.close()
            # wrong key
            c = await h.connect()
            wrong = await c.auth(IdentityKeyPair.generate(), "alice")
            assert isinstance(wrong, Error) and wrong.code == "auth_failed"
            # replayed nonce: a valid signature from another connection's nonce does not verify here
            old = await h.connect()
            replayed_sig = old.proof(alice, "auth", "alice")
            fresh = await h.connect()
            replay = await fresh.request(Auth(rid=fresh.rid(), username="alice", sig=replayed_sig))
            assert isinstance(replay, Error) and replay.code == "auth_failed"
            # the same signature is fine on the connection whose nonce it signed, exactly once
            ok = await old.request(Auth(rid=old.rid(), username="alice", sig=replayed_sig))
            assert isinstance(ok, Ok) and ok.username == "alice" and ok.prekeys is not None
            again = await old.request(Auth(rid=old.rid(), username="alice", sig=replayed_sig))
            assert isinstance(again, Error) and again.code == "already_authenticated"
            # bound to the server certificate: a signature over another channel fails
            other = await h.connect()
            other.channel = bytes(32)
            mitm = await other.auth(alice, "alice")
            assert isinstance(mitm, Error) and mitm.code == "auth_failed"
            unknown = await (await h.connect()).auth(alice, "nobody")
            assert isinstance(unknown, Error) and unknown.code == "unknown_user"
    run(scenario())


def test_unauthenticated_frames_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path) as h:
            await h.user("bob")
            c = await h.connect()
            pong = await c.request(Ping(rid=7))
            assert isinstance(pong, Pong) and pong.rid == 7
            for frame in (Send(rid=c.rid(), to="bob", id=b"\x01" * 16, kind="msg", body=b"x"),
                          FetchBundle(rid=c.rid(), username="bob")):
                reply = await c.request(frame)
                assert isinstance(reply, Error) and reply.code == "not_authenticated"
                assert reply.rid == frame.rid
    run(scenario())


def test_too_many_auth_failures_close_the_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, max_auth_failures=3) as h:
            await h.user("alice")
            c = await h.connect()
            for _ in range(3):
                assert (await c.auth(IdentityKeyPair.generate(), "alice")).t == "error"
            await c.ws.wait_closed()
            assert c.ws.close_code == 1008
    run(scenario())


def test_plaintext_dev_mode_on_loopback(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, insecure_plaintext_dev=True) as h:
            assert h.server.url.startswith("ws://127.0.0.1:") and h.server.cert_fingerprint is None
            client = await RelayClient.connect(h.server.url, None)
            h.clients.append(client)
            assert client.channel == bytes(32)
            ok = await client.register(IdentityKeyPair.generate(), "dev")
            assert isinstance(ok, Ok)
    run(scenario())
