"""The accept-time gate (server/admission.py): pending caps per prefix, eviction from the heaviest
prefix, a fair share for every prefix when the relay is full, the open-file budget; the policy
alone, then against a real relay process with real TLS and clients bound to 127.x.y.z."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from pathlib import Path

import pytest
from conn_support import DelayProxy, Relay, client_from
from relay_harness import run

from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.protocol.frames import Accepted, Deliver, Ok
from cipherpost.server.admission import (
    Admission,
    AdmissionLimits,
    Slot,
    SlotState,
    prefix_of,
    tcp_progressed,
)

# --- the policy alone ---------------------------------------------------------------------------


def test_prefixes_are_ipv4_slash_24_and_ipv6_slash_64() -> None:
    assert prefix_of("203.0.113.77") == "203.0.113.0/24"
    assert prefix_of("::ffff:203.0.113.77") == "203.0.113.0/24"
    assert prefix_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert prefix_of("fe80::1%eth0") == "fe80::/64"


def test_pending_cap_evicts_the_oldest_of_the_prefix_with_most_pending() -> None:
    gate = Admission(AdmissionLimits(max_connections=100, max_pending=4, max_pending_per_prefix=10,
                                     fd_limit=1000))
    slow_mobile, _ = gate.admit("198.51.100.7")  # oldest overall, alone in its prefix
    flood = [gate.admit(f"203.0.113.{i}")[0] for i in range(3)]
    new, victims = gate.admit("203.0.113.200")
    assert new is not None
    assert victims == [flood[0]]  # the flooding prefix's oldest, not the oldest overall
    assert slow_mobile is not None and slow_mobile.state is SlotState.PENDING
    assert flood[0] is not None and flood[0].state is SlotState.EVICTED
    assert gate.pending == 4 and gate.files == 5  # evicted: out of the counts, its file still open
    gate.closed(flood[0])
    assert gate.files == 4


def test_per_prefix_pending_cap_evicts_within_that_prefix() -> None:
    gate = Admission(AdmissionLimits(max_connections=100, max_pending=100, max_pending_per_prefix=2,
                                     fd_limit=1000))
    a, _ = gate.admit("10.0.0.1")
    b, _ = gate.admit("10.0.0.2")
    other, _ = gate.admit("10.0.1.1")
    c, victims = gate.admit("10.0.0.3")
    assert victims == [a] and c is not None and b is not None and other is not None
    assert gate.connections_in_prefix("10.0.0.0/24") == 2


def test_authenticated_connections_are_not_pending_and_free_their_slot_on_close() -> None:
    gate = Admission(AdmissionLimits(max_connections=100, max_pending=1, max_pending_per_prefix=1,
                                     fd_limit=1000))
    a, _ = gate.admit("10.0.0.1")
    assert a is not None
    gate.authenticated(a)
    b, victims = gate.admit("10.0.0.2")  # a is established: it no longer counts as pending
    assert victims == [] and b is not None and gate.pending == 1 and gate.live == 2
    gate.closed(a)
    gate.closed(b)
    assert (gate.live, gate.pending, gate.files, gate.connections_from("10.0.0.1")) == (0, 0, 0, 0)


def test_when_full_no_prefix_keeps_more_than_its_share() -> None:
    limits = AdmissionLimits(max_connections=64, max_pending=64, max_pending_per_prefix=2, fd_limit=1000)
    gate = Admission(limits)
    for p in range(16):  # 16 prefixes x 4 established connections fill the relay
        for i in range(4):
            slot, _ = gate.admit(f"10.{p}.0.{i + 1}")
            assert slot is not None
            gate.authenticated(slot)
    assert gate.admit("10.0.0.99") == (None, [])  # a saturating prefix gets nothing more
    assert gate.refused == 1
    newcomer, victims = gate.admit("10.200.0.1")  # a 17th prefix: share max(2, 64 // 17) = 3
    assert newcomer is not None and len(victims) == 1 and victims[0].state is SlotState.EVICTED
    heaviest = 4
    for k in range(18, 33):  # more prefixes arrive; each is under its share, so each gets in
        slot, victims = gate.admit(f"10.{100 + k}.0.1")
        assert slot is not None and len(victims) == 1
        counts = [gate.connections_in_prefix(f"10.{p}.0.0/24") for p in range(16)]
        assert max(counts) <= heaviest  # the evictions come from the heaviest prefixes
        heaviest = max(counts)
    assert heaviest == 3  # every saturating prefix gave up a slot
    share = max(limits.max_pending_per_prefix, limits.max_connections // 33)
    assert gate.connections_in_prefix("10.0.0.0/24") > share
    assert gate.admit("10.0.0.99") == (None, [])  # over its share: it cannot take a slot back
    assert gate.live == 64


def test_among_equally_loaded_prefixes_an_idle_socket_goes_before_a_slow_handshake() -> None:
    talked: set[str] = set()
    gate = Admission(AdmissionLimits(max_connections=100, max_pending=3, max_pending_per_prefix=10,
                                     fd_limit=1000), progressed=lambda slot: slot.ip in talked)
    slow, _ = gate.admit("198.51.100.7")  # the oldest, but it has sent its ClientHello
    talked.add("198.51.100.7")
    idle = [gate.admit(f"203.0.{i}.1")[0] for i in range(2)]  # one idle socket per prefix
    _, victims = gate.admit("203.0.9.1")
    assert victims == [idle[0]] and slow is not None and slow.state is SlotState.PENDING


def test_tcp_progress_is_the_kernels_count_of_bytes_received() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as client:
        accepted, _ = listener.accept()
        with accepted:
            slot = Slot("127.0.0.1", "127.0.0.0/24")
            slot.handle = accepted  # type: ignore[assignment]
            assert not tcp_progressed(slot)
            client.sendall(b"hello")
            deadline = time.monotonic() + 5
            while not tcp_progressed(slot) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert tcp_progressed(slot)


def test_open_files_never_reach_the_limit() -> None:
    gate = Admission(AdmissionLimits(max_connections=10, max_pending=10, max_pending_per_prefix=10,
                                     fd_limit=3))
    slots = [gate.admit(f"10.0.{i}.1")[0] for i in range(3)]
    assert all(slots) and gate.admit("10.9.9.9") == (None, [])
    assert gate.files == 3


def test_a_refusal_changes_no_count() -> None:
    gate = Admission(AdmissionLimits(max_connections=1, max_pending=1, max_pending_per_prefix=1,
                                     fd_limit=10))
    gate.admit("10.0.0.1")
    before = (gate.live, gate.pending, gate.files, gate.connections_from("10.0.0.1"))
    assert gate.admit("10.0.0.2") == (None, [])
    assert (gate.live, gate.pending, gate.files, gate.connections_from("10.0.0.1")) == before


# --- against a real relay process ---------------------------------------------------------------


def test_a_17th_prefix_gets_in_while_16_prefixes_saturate_the_relay(tmp_path: Path) -> None:
    relay = Relay(tmp_path / "relay", ["--max-connections", "256", "--max-pending-per-prefix", "8",
                                       "--max-connections-per-ip", "64"]).start()

    async def scenario() -> None:
        held = []
        for p in range(16):  # each prefix: one account, 16 authenticated connections
            ident = IdentityKeyPair.generate()
            first = await client_from(relay, f"127.{10 + p}.0.1")
            assert isinstance(await first.register(ident, f"flood{p}"), Ok)
            held.append(first)
            for _ in range(15):
                c = await client_from(relay, f"127.{10 + p}.0.1")
                assert isinstance(await c.auth(ident, f"flood{p}"), Ok)
                held.append(c)
        with pytest.raises(OSError):  # full: a saturating prefix is refused at accept
            await client_from(relay, "127.10.0.2")
        t0 = time.monotonic()
        newcomer = await asyncio.wait_for(client_from(relay, "127.99.0.1"), 5)
        assert isinstance(await newcomer.register(IdentityKeyPair.generate(), "newcomer"), Ok)
        took = time.monotonic() - t0
        await asyncio.sleep(0.5)
        evicted = [c for c in held if c.ws.close_code is not None]
        assert len(evicted) == 1 and evicted[0].ws.close_code == 1013  # one, told to retry later
        print(f"17th prefix connected and registered in {took:.2f} s")
        for c in [*held, newcomer]:
            with contextlib.suppress(Exception):
                await c.close()

    try:
        run(scenario(), timeout=90)
    finally:
        assert "Traceback" not in relay.stop()


def _flood_socket(ip: str, port: int) -> socket.socket | None:
    s = socket.socket()
    s.setblocking(False)
    try:
        s.bind((ip, 0))
        err = s.connect_ex(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    if err not in (0, errno.EINPROGRESS):
        s.close()
        return None
    return s


def test_idle_flood_from_4096_prefixes_does_not_lock_out_a_slow_client(tmp_path: Path) -> None:
    """1,000 idle TCP connections per second (no TLS byte ever) from 4,096 prefixes, under the
    open-file limit docs/server.md recommends (max_connections + 256), while a client on a link
    with a 500 ms round trip connects, registers and sends."""
    max_conn = 2048
    relay = Relay(tmp_path / "relay", ["--max-connections", str(max_conn), "--max-pending-connections",
                                       "1024"], nofile=(max_conn + 256, max_conn + 256)).start()

    async def scenario() -> None:
        bob = await client_from(relay, "127.250.0.1")
        assert isinstance(await bob.register(IdentityKeyPair.generate(), "bob"), Ok)
        flood: list[socket.socket] = []
        stop = asyncio.Event()

        async def flooder() -> None:
            n = 0
            t0 = time.monotonic()
            while not stop.is_set():
                due = int((time.monotonic() - t0) * 1000)  # 1,000 per second
                while n < due:
                    prefix = n % 4096
                    s = _flood_socket(f"127.{1 + prefix // 256}.{prefix % 256}.1", relay.port)
                    if s is not None:
                        flood.append(s)
                    n += 1
                await asyncio.sleep(0.005)

        flooding = asyncio.create_task(flooder())
        await asyncio.sleep(3.0)  # the flood is at full strength: pending caps and timeouts at work
        proxy = await DelayProxy(relay.port, "127.251.0.1", 0.25).start()  # 500 ms round trip
        try:
            t0 = time.monotonic()
            alice = await asyncio.wait_for(
                client_from(relay, "", url=f"wss://127.0.0.1:{proxy.port}", open_timeout=10), 10)
            assert isinstance(await alice.register(IdentityKeyPair.generate(), "alice"), Ok)
            assert isinstance(await alice.send("bob", b"through the flood"), Accepted)
            took = time.monotonic() - t0
            got = await asyncio.wait_for(bob.pushes.get(), 10)
            assert isinstance(got, Deliver) and got.messages[0].body == b"through the flood"
            print(f"slow client connected, registered and sent in {took:.2f} s; "
                  f"flood sockets opened {len(flood)}")
        finally:
            stop.set()
            await flooding
            for s in flood:
                s.close()
            await proxy.close()
        assert len(flood) >= 3000

    try:
        run(scenario(), timeout=60)
    finally:
        log = relay.stop()
        assert "Traceback" not in log and "out of system resource" not in log


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit")


def test_relay_raises_its_open_file_limit_or_says_how_to_fix_it(tmp_path: Path) -> None:
    enough = Relay(tmp_path / "enough", ["--max-connections", "1000"], nofile=(300, 4000)).start()
    assert enough.proc is not None
    assert _open_files_limit(enough.proc.pid) == (1256, 4000)  # max_connections + 256 reserved
    assert "open_file_limit_low" not in enough.stop()

    low = Relay(tmp_path / "low", nofile=(300, 600)).start()  # the default 10,000 cannot fit
    assert low.proc is not None
    assert _open_files_limit(low.proc.pid) == (600, 600)

    async def still_serves() -> None:
        c = await client_from(low, "127.0.0.1")
        assert isinstance(await c.register(IdentityKeyPair.generate(), "alice"), Ok)
        await c.close()

    run(still_serves())
    log = low.stop()
    assert "the open-file limit fits only 344 connections" in log
    assert "raise the hard limit to at least 10256" in log and "or lower --max-connections" in log
