"""What anonymous callers and logs learn (issue 9): /metrics only on its own loopback listener, no
counter that moves with a recipient's presence, no database query per scrape, and info logs that
do not tie usernames to IP:port unless the operator asks."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from relay_client import RelayClient
from relay_harness import ServerProcess, harness, run

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Accepted, Deliver, Send


def _get(url: str, cert: Path | None = None) -> tuple[int, str, str]:
    ctx = ssl.create_default_context(cafile=str(cert)) if cert is not None else None
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=5) as response:
            return response.status, response.headers.get("Content-Type"), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read().decode()


def _samples(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))


def test_metrics_are_served_on_the_loopback_listener_not_the_public_port(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, metrics_listen="127.0.0.1:0") as h:
            alice, _ = await h.user("alice")
            bob, _ = await h.user("bob")
            await alice.send("bob", b"one")
            await bob.receive_messages(1)
            await alice.send_raw(b"garbage")
            await alice.next_push()
            public = h.server.url.replace("wss://", "https://")
            assert h.cert is not None
            status, _, body = await asyncio.to_thread(_get, public + "/healthz", h.cert)
            assert (status, body) == (200, "ok\n")  # load balancers still check the public port
            status, _, body = await asyncio.to_thread(_get, public + "/metrics", h.cert)
            assert status == 404 and "cipherpost_" not in body
            listener = h.server.metrics_listener
            assert listener is not None and listener.host == "127.0.0.1" and listener.port != 0
            status, ctype, text = await asyncio.to_thread(_get, listener.url)
            assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
            lines = _samples(text)
            assert lines["cipherpost_messages_accepted_total"] == "1"
            assert lines["cipherpost_messages_queued"] == "1"  # not acked yet
            assert lines["cipherpost_connections_open"] == "2"
            assert lines["cipherpost_accounts"] == "2"
            assert lines['cipherpost_errors_total{code="bad_frame"}'] == "1"
            assert int(lines["cipherpost_store_commits_total"]) >= 1
            assert not any("alice" in line or "bob" in line for line in text.splitlines())
    run(scenario())


def test_no_metric_moves_with_the_recipients_presence(tmp_path: Path) -> None:
    """A sender who can scrape /metrics sends to the victim and diffs the counters: the diff must be
    the same whether the victim is online (the message is pushed) or offline (it waits)."""

    async def diff_of_one_send(h_url: str, alice: RelayClient, to: str) -> dict[str, int]:
        before = _samples((await asyncio.to_thread(_get, h_url))[2])
        assert isinstance(await alice.send(to, b"are you there?"), Accepted)
        await asyncio.sleep(0.3)  # the push (if any) has been written
        after = _samples((await asyncio.to_thread(_get, h_url))[2])
        return {k: int(float(after[k])) - int(float(before.get(k, "0"))) for k in after
                if after[k] != before.get(k)}

    async def scenario() -> None:
        async with harness(tmp_path, metrics_listen="127.0.0.1:0") as h:
            assert h.server.metrics_listener is not None
            url = h.server.metrics_listener.url
            alice, _ = await h.user("alice")
            online, _ = await h.user("online")
            offline, _ = await h.user("offline")
            await offline.close()
            spare = await h.connect()  # keeps the number of open connections equal in both cases
            await asyncio.sleep(0.2)
            seen_online = diff_of_one_send(url, alice, "online")
            d_online = await seen_online
            pushed = await online.next_push(5)
            assert isinstance(pushed, Deliver)  # the victim really was online and got it
            d_offline = await diff_of_one_send(url, alice, "offline")
            assert d_online == d_offline, (d_online, d_offline)
            await spare.close()
    run(scenario())


def test_a_scrape_runs_no_store_query(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, metrics_listen="127.0.0.1:0") as h:
            await h.user("alice")
            listener = h.server.metrics_listener
            assert listener is not None
            await asyncio.to_thread(_get, listener.url)
            ops = h.server.store.batched_ops  # type: ignore[attr-defined]
            for _ in range(20):
                status, _, _ = await asyncio.to_thread(_get, listener.url)
                assert status == 200
            assert h.server.store.batched_ops == ops  # type: ignore[attr-defined]
    run(scenario())


def test_metrics_listener_rejects_other_methods_and_paths(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, metrics_listen="127.0.0.1:0") as h:
            listener = h.server.metrics_listener
            assert listener is not None
            base = listener.url.removesuffix("/metrics")
            assert (await asyncio.to_thread(_get, base + "/nothing"))[0] == 404
            assert (await asyncio.to_thread(_get, base + "/healthz"))[:3:2] == (200, "ok\n")
            reader, writer = await asyncio.open_connection(listener.host, listener.port)
            writer.write(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 405")
            writer.close()
    run(scenario())


@pytest.mark.parametrize("flag", [False, True])
def test_info_logs_tie_usernames_to_addresses_only_with_the_flag(tmp_path: Path, flag: bool) -> None:
    extra = ["--metrics-listen", "127.0.0.1:0"] + (["--log-peer-addresses"] if flag else [])
    server = ServerProcess(tmp_path / "data", extra=extra).start()
    try:
        async def scenario() -> None:
            client = await RelayClient.connect(server.url, tmp_path / "data" / "tls-cert.pem")
            assert (await client.register(IdentityKeyPair.generate(), "alice")).t == "ok"
            assert isinstance(await client.request(Send(rid=client.rid(), to="alice", id=bytes(16),
                                                        kind="msg", body=b"x")), Accepted)
            await client.close()
        run(scenario())
    finally:
        code, log = server.terminate()
    assert code == 0
    lines = [line for line in log.splitlines() if "user=alice" in line]
    assert any("event=registered" in line for line in lines)
    assert any("event=metrics_listening url=http://127.0.0.1:" in line for line in log.splitlines())
    assert all(("127.0.0.1:" in line) == flag for line in lines), lines
