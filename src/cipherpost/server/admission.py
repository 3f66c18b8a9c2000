"""Accept-time admission: every TCP connection is counted from ``accept()``, before any TLS byte.

The TLS handshake happens before the WebSocket layer sees a connection, so limits applied there
(HTTP 503/429) come too late: a stream of idle TCP connections that never send a byte would hold
file descriptors and handshake state until they time out, and real users would wait behind them.
This module is the gate at ``accept()``:

- ``Admission`` (pure: addresses in, decisions out, no sockets) keeps one ``Slot`` per accepted
  connection, grouped by address prefix (IPv4 /24, IPv6 /64: what one subscriber, household or
  cloud customer usually holds). A slot is *pending* until the connection authenticates, then
  *established*.
- Pending connections are capped globally (``max_pending``) and per prefix (``max_pending_per_prefix``).
  When a cap is reached the gate evicts a pending connection of the prefix that holds the most
  pending slots, oldest first within it: a flood from some prefixes evicts its own connections,
  not a slow mobile user elsewhere (evicting the oldest overall would do exactly that). Among
  prefixes that hold equally many, and within a prefix, a connection that has not sent a single
  byte goes before one that is part-way through its handshake (``tcp_progressed``: the kernel's
  count of bytes received), so a flood of idle sockets from thousands of prefixes (one each)
  evicts itself, not the slow client that arrived in the middle of it.
- All connections are capped by ``max_connections``. When the relay is full and prefix P connects,
  with K prefixes active (P included) no prefix may hold more than
  ``share = max(max_pending_per_prefix, max_connections // K)``: if P already holds ``share`` it is
  refused, else the heaviest prefix, if it holds more than ``share``, loses one connection (pending
  first, oldest first) and P is admitted. So 16 prefixes cannot lock out a 17th.
- Open files never reach the soft limit: the gate refuses at ``fd_limit`` (the soft limit minus
  half the reserve kept for the store and files), so ``accept()`` never fails with EMFILE, which
  would make asyncio stop accepting for everyone for a second.

``GatedListener`` is the shell: a listening socket whose ``accept()`` applies the decisions
(refuse: reset at once; evict: ``shutdown()``, which the event loop sees as end of stream and
closes the normal way) and returns ``AdmittedSocket``s, whose ``close()`` frees their slot. asyncio
accepts through ``sock.accept()`` (``BaseSelectorEventLoop._accept_connection``), so passing the
listener as ``serve(sock=...)`` is all the wiring the event loop needs.

docs/server.md ("Connections") states the limits; tests in tests/server/test_relay_admission.py.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import itertools
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("cipherpost.server")

IPV4_PREFIX_BITS: Final = 24
IPV6_PREFIX_BITS: Final = 64
PROGRESS_SCAN: Final = 16  # pending connections looked at for one that sent nothing, per eviction
MAX_REFUSED_PER_ACCEPT: Final = 64  # then yield to the event loop; the listener stays readable
_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, no TIME_WAIT


def prefix_of(ip: str) -> str:
    """The address prefix a connection is counted under: IPv4 /24, IPv6 /64 (IPv4-mapped as IPv4)."""
    head, dot, _ = ip.rpartition(".")
    if dot and ":" not in ip:  # the common case, without ipaddress's cost
        return head + ".0/24"
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return prefix_of(str(addr.ipv4_mapped))
    bits = IPV4_PREFIX_BITS if addr.version == 4 else IPV6_PREFIX_BITS
    return str(ipaddress.ip_network((addr, bits), strict=False))


class SlotState(enum.Enum):
    PENDING = "pending"          # accepted, not authenticated yet (TLS, WebSocket upgrade, auth)
    ESTABLISHED = "established"  # authenticated
    EVICTED = "evicted"          # told to go; its file is open until the event loop closes it
    CLOSED = "closed"


# The one state table (STYLE.md, habit 3): (state, event) -> new state.
TRANSITIONS: Final[dict[tuple[SlotState, str], SlotState]] = {
    (SlotState.PENDING, "authenticated"): SlotState.ESTABLISHED,
    (SlotState.PENDING, "evict"): SlotState.EVICTED,
    (SlotState.ESTABLISHED, "evict"): SlotState.EVICTED,
    (SlotState.PENDING, "closed"): SlotState.CLOSED,
    (SlotState.ESTABLISHED, "closed"): SlotState.CLOSED,
    (SlotState.EVICTED, "closed"): SlotState.CLOSED,
}


class Slot:
    """One accepted connection. ``handle`` and ``closer`` belong to the shell."""

    __slots__ = ("closer", "handle", "ip", "prefix", "state")

    def __init__(self, ip: str, prefix: str) -> None:
        self.ip = ip
        self.prefix = prefix
        self.state = SlotState.PENDING
        self.handle: AdmittedSocket | None = None
        self.closer: Callable[[], None] | None = None  # graceful close for an established one

    def __repr__(self) -> str:
        return f"Slot({self.prefix}, {self.state.value})"


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_connections: int         # all connections, pending ones included
    max_pending: int             # not yet authenticated, all prefixes together
    max_pending_per_prefix: int  # also the share any prefix keeps when the relay is full
    fd_limit: int                # accepted sockets never exceed this (open-file soft limit - reserve/2)


class _Ranking:
    """A count per prefix, with the prefix of the highest count found without scanning them all.

    Prefixes with equal counts come out in the order they reached that count."""

    __slots__ = ("buckets", "count", "top")

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.buckets: dict[int, dict[str, None]] = {}
        self.top = 0

    def add(self, key: str, delta: int) -> None:
        old = self.count.get(key, 0)
        new = old + delta
        if old:
            bucket = self.buckets[old]
            del bucket[key]
            if not bucket:
                del self.buckets[old]
        if new > 0:
            self.count[key] = new
            self.buckets.setdefault(new, {})[key] = None
            self.top = max(self.top, new)
        else:
            del self.count[key]

    def heaviest(self) -> str | None:
        return next(iter(self.heaviest_tied()), None)

    def heaviest_tied(self) -> dict[str, None]:
        """Every prefix with the highest count, in the order they reached it."""
        while self.top and self.top not in self.buckets:
            self.top -= 1
        return self.buckets[self.top] if self.top else {}


class _Prefix:
    __slots__ = ("established", "pending")

    def __init__(self) -> None:
        self.pending: dict[Slot, None] = {}      # insertion order = accept order
        self.established: dict[Slot, None] = {}


class Admission:
    """The policy: which connection to refuse, which to evict. Pure; the clock is not needed."""

    def __init__(self, limits: AdmissionLimits,
                 progressed: Callable[[Slot], bool] = lambda slot: False) -> None:
        self.limits = limits
        self.progressed = progressed  # has this connection sent anything yet? (the shell asks TCP)
        self.files = 0     # accepted sockets not closed yet (evicted ones included)
        self.live = 0      # pending + established
        self.pending = 0
        self.refused = 0
        self.evicted = 0
        self._prefixes: dict[str, _Prefix] = {}
        self._total = _Ranking()
        self._pending = _Ranking()
        self._per_ip: dict[str, int] = {}

    # --- decisions --------------------------------------------------------------------------

    def admit(self, ip: str) -> tuple[Slot | None, list[Slot]]:
        """A connection from ``ip`` was accepted: its slot (None: refuse it) and the slots to evict."""
        lim = self.limits
        prefix = prefix_of(ip)
        if self.files >= lim.fd_limit:
            self.refused += 1
            return None, []
        victims: list[Slot] = []
        if self.live >= lim.max_connections:
            active = len(self._total.count) + (prefix not in self._total.count)
            share = max(lim.max_pending_per_prefix, lim.max_connections // active)
            heavy = self._total.heaviest()
            if (self._total.count.get(prefix, 0) >= share or heavy is None
                    or self._total.count[heavy] <= share):
                self.refused += 1
                return None, []
            victims.append(self._evict_one(heavy))
        slot = Slot(ip, prefix)
        entry = self._prefixes.get(prefix)
        if entry is None:
            entry = self._prefixes[prefix] = _Prefix()
        entry.pending[slot] = None
        self._total.add(prefix, 1)
        self._pending.add(prefix, 1)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self.files += 1
        self.live += 1
        self.pending += 1
        if len(entry.pending) > lim.max_pending_per_prefix:
            victims.append(self._evict_pending(prefix))
        elif self.pending > lim.max_pending:
            victims.append(self._evict_pending_heaviest())
        return slot, victims

    def _evict_one(self, prefix: str) -> Slot:
        entry = self._prefixes[prefix]
        if entry.pending:
            return self._evict_pending(prefix)
        slot = next(iter(entry.established))
        self._step(slot, "evict")
        return slot

    def _evict_pending(self, prefix: str) -> Slot:
        """The prefix's oldest pending connection; among its PROGRESS_SCAN oldest, the first that
        has not sent a byte is taken before one that is part-way through its handshake."""
        pending = self._prefixes[prefix].pending
        slot = next(iter(pending))
        for candidate in itertools.islice(pending, PROGRESS_SCAN):
            if not self.progressed(candidate):
                slot = candidate
                break
        self._step(slot, "evict")
        return slot

    def _evict_pending_heaviest(self) -> Slot:
        """From the prefix holding the most pending slots, oldest first. When several prefixes
        hold that many (a flood from many prefixes, one connection each), the one whose oldest
        connection has sent nothing goes first: a slow client mid-handshake outlives idle sockets."""
        tied = self._pending.heaviest_tied()
        prefix = next(iter(tied))
        for candidate in itertools.islice(tied, PROGRESS_SCAN):
            if not self.progressed(next(iter(self._prefixes[candidate].pending))):
                prefix = candidate
                break
        return self._evict_pending(prefix)

    # --- events from the shell --------------------------------------------------------------

    def authenticated(self, slot: Slot) -> None:
        if slot.state is SlotState.PENDING:
            self._step(slot, "authenticated")

    def closed(self, slot: Slot) -> None:
        if slot.state is not SlotState.CLOSED:
            self._step(slot, "closed")
            self.files -= 1

    def connections_from(self, ip: str) -> int:
        """Live (pending or established) connections from this exact address."""
        return self._per_ip.get(ip, 0)

    def connections_in_prefix(self, prefix: str) -> int:
        return self._total.count.get(prefix, 0)

    def _step(self, slot: Slot, event: str) -> None:
        new = TRANSITIONS.get((slot.state, event))
        if new is None:
            raise AssertionError(f"admission: {event} while {slot.state.value}")
        old, slot.state = slot.state, new
        entry = self._prefixes[slot.prefix] if old is not SlotState.EVICTED else None
        if entry is None:
            return  # an evicted slot left every count when it was evicted
        if old is SlotState.PENDING:
            del entry.pending[slot]
            self._pending.add(slot.prefix, -1)
            self.pending -= 1
        if new is SlotState.ESTABLISHED:
            entry.established[slot] = None
            return
        if old is SlotState.ESTABLISHED:
            del entry.established[slot]
        self._total.add(slot.prefix, -1)
        self.live -= 1
        left = self._per_ip[slot.ip] - 1
        if left:
            self._per_ip[slot.ip] = left
        else:
            del self._per_ip[slot.ip]
        if new is SlotState.EVICTED:
            self.evicted += 1
        if not entry.pending and not entry.established:
            del self._prefixes[slot.prefix]


# --- the socket shell -----------------------------------------------------------------------

class AdmittedSocket(socket.socket):
    """An accepted socket that frees its admission slot when closed."""

    __slots__ = ("_gate", "slot")
    _gate: GatedListener | None
    slot: Slot

    def close(self) -> None:
        fd = self.fileno()
        super().close()
        gate, self._gate = getattr(self, "_gate", None), None
        if gate is not None:
            gate._release(self, fd)


class GatedListener(socket.socket):
    """A listening socket whose ``accept()`` applies ``Admission``'s decisions."""

    __slots__ = ("admission", "by_fd", "on_refused")
    admission: Admission
    by_fd: dict[int, AdmittedSocket]
    on_refused: Callable[[], None]  # counts a refusal (metrics)

    def accept(self) -> tuple[socket.socket, object]:
        admission: Admission = self.admission
        for _ in range(MAX_REFUSED_PER_ACCEPT):
            fd, addr = self._accept()  # type: ignore[attr-defined]  # BlockingIOError: nothing waiting
            ip = str(addr[0]) if isinstance(addr, tuple) and addr else "?"
            slot, victims = admission.admit(ip)
            for victim in victims:
                _evict(victim)
            if slot is None:
                _reset(fd)
                self.on_refused()
                continue
            sock = AdmittedSocket(self.family, self.type, self.proto, fileno=fd)
            sock._gate = self
            sock.slot = slot
            slot.handle = sock
            self.by_fd[fd] = sock
            return sock, addr
        raise BlockingIOError("refused a burst of connections; accepting again on the next loop turn")

    def _release(self, sock: AdmittedSocket, fd: int) -> None:
        slot: Slot = sock.slot
        slot.handle = None
        slot.closer = None
        if self.by_fd.get(fd) is sock:
            del self.by_fd[fd]
        self.admission.closed(slot)

    def slot_of(self, fd: int, peer: object) -> Slot | None:
        """The live slot of the connection on descriptor ``fd`` whose peer address is ``peer``."""
        sock = self.by_fd.get(fd)
        if sock is None or sock.slot.state is SlotState.CLOSED:
            return None
        try:
            if sock.getpeername() != peer:
                return None
        except OSError:
            return None
        slot: Slot = sock.slot
        return slot


def gated_listener(host: str, port: int, admission: Admission, backlog: int = 1024,
                   on_refused: Callable[[], None] = lambda: None) -> GatedListener:
    """Bind and listen on the first address ``host`` resolves to."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, sockaddr = infos[0]
    sock = GatedListener(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    sock.admission = admission
    sock.by_fd = {}
    sock.on_refused = on_refused
    return sock


_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in Linux's struct tcp_info (4.1+)


def tcp_progressed(slot: Slot) -> bool:
    """Whether the peer of ``slot`` has sent any byte (Linux TCP_INFO); False where unknown."""
    sock = slot.handle
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_BYTES_RECEIVED + 8)
    except OSError:
        return False
    if len(info) < _TCPI_BYTES_RECEIVED + 8:
        return False
    return int.from_bytes(info[_TCPI_BYTES_RECEIVED:_TCPI_BYTES_RECEIVED + 8], "little") > 0


def _reset(fd: int) -> None:
    s = socket.socket(fileno=fd)
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    s.close()


def _evict(slot: Slot) -> None:
    closer, sock = slot.closer, slot.handle
    if closer is not None:
        closer()
        return
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # the event loop reads end of stream and closes it


# --- open files -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OpenFiles:
    soft: int
    hard: int
    raised_from: int | None  # the soft limit before start, when it was raised


def raise_open_file_limit(wanted: int) -> OpenFiles | None:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` as far as the hard limit allows.

    None where the platform has no such limit (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if soft != infinite and soft < wanted:
        target = wanted if hard == infinite else min(hard, wanted)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return OpenFiles(soft, hard, None)
        return OpenFiles(target, hard, soft)
    return OpenFiles(soft, hard, None)
