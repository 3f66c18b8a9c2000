"""Wake-ups across relay instances: "mail is waiting for user X" (docs/server.md, scale-out).

A relay instance pushes a committed message to the recipient's connections on *this* instance
itself (``RelayServer.route``). When several instances share one PostgreSQL store, the recipient
may be connected to another one: the :class:`Bus` carries a wake-up ``(user, seq)`` there, with
the message itself when its body is at most ``INLINE_BODY_MAX``. That instance pushes it if its seq
is the connection's next one, and otherwise pages the mail from the store (``Connection.push`` /
``Connection.wake``, gap-checked). The store stays the source of truth: a lost, late or reordered
wake-up costs a delay (a page query), never a message or its order.

- :class:`LocalBus` (default, one process): nothing to carry; ``route`` already pushed.
- :class:`RedisBus` (``--bus redis://...``, redis-py asyncio pub/sub): one channel per user,
  ``<prefix>:wake:<user>``. An instance subscribes to a user's channel when the user's first
  connection authenticates, and ``watch`` returns only once Redis confirmed the subscription, so
  the connection's first sync query cannot miss a wake-up published between the two. Publishes of
  one event-loop iteration go out in one pipeline. When Redis is lost the instance keeps serving:
  it logs ``event=bus_down``, wakes every local user every ``POLL_INTERVAL_S`` (a store query per
  connection) and reconnects with backoff; when Redis is back it re-subscribes, logs
  ``event=bus_up`` and wakes every local user once, which covers the wake-ups lost meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..crypto.encoding import pack, unpack
from ..crypto.errors import CryptoError
from ..protocol.frames import DeliveredMessage

log = logging.getLogger("cipherpost.server")

INLINE_BODY_MAX = 16 * 1024  # bodies up to this size travel in the wake-up (no page query needed)
POLL_INTERVAL_S = 2.0  # while Redis is unreachable: how often every local user is woken
RECONNECT_MAX_S = 2.0  # backoff cap between reconnection attempts
SUBSCRIBE_TIMEOUT_S = 2.0  # watch() stops waiting for Redis's confirmation (the poll covers it)
READ_TIMEOUT_S = 1.0  # get_message's wait; bounds how late stop() is noticed

# (user, seq or None = "page whatever is new", the message itself when it was small enough to carry)
WakeHandler = Callable[[str, "int | None", "DeliveredMessage | None"], None]
ControlHandler = Callable[[str, str], None]  # (what, user): "identity" = drop the cached identity
PRESENCE_TTL_MS = 30_000  # a claimed connection counts this long unless its instance refreshes it
# (every third of it); ?presence_ttl_ms=N in the bus URL changes it

# Atomic check-and-claim on one sorted set per user: member = instance:connection, score = expiry
# (Redis server time, so that instances' clocks do not matter). Expired members are dropped first:
# a SIGKILLed instance's connections stop counting after PRESENCE_TTL_MS, no counter leaks.
_CLAIM_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class Bus(Protocol):
    """Carries wake-ups between relay instances that share one store."""

    async def start(self, on_wake: WakeHandler, local_users: Callable[[], Iterable[str]],
                    on_control: ControlHandler | None = None) -> None:
        """Begin delivering wake-ups to ``on_wake``; ``local_users()`` lists the users connected
        here (woken all at once after an outage). Never raises for an unreachable broker."""

    async def stop(self) -> None: ...

    async def watch(self, user: str) -> None:
        """Receive ``user``'s wake-ups from now on; returns when they are certain to arrive (or the
        bus is down, in which case the poll delivers)."""

    def unwatch(self, user: str) -> None:
        """The last local connection of ``user`` is gone."""

    def publish(self, user: str, message: DeliveredMessage) -> None:
        """``message`` was committed for ``user`` (after the commit; never blocks)."""

    async def claim(self, user: str, conn: object, limit: int) -> bool:
        """Count one more authenticated connection of ``user`` across instances; False (nothing
        counted) when ``limit`` are already open. Fails open while the bus is down (each instance
        still applies the limit to its own connections)."""

    def release(self, user: str, conn: object) -> None:
        """The connection counted by :meth:`claim` is gone."""

    def identity_changed(self, user: str) -> None:
        """Tell the other instances to drop ``user``'s cached identity (``on_control``)."""

    def control(self, what: str, user: str) -> None:
        """Tell the other instances something about ``user``'s connections (``on_control(what, user)``;
        ``what`` holds no ':'): account handlers close them there (handlers/accounts.py)."""

    @property
    def healthy(self) -> bool: ...


class LocalBus:
    """One relay process: ``RelayServer.route`` pushes to local connections; nothing else to do."""

    healthy = True

    async def start(self, on_wake: WakeHandler, local_users: Callable[[], Iterable[str]],
                    on_control: ControlHandler | None = None) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def watch(self, user: str) -> None:
        return None

    def unwatch(self, user: str) -> None:
        return None

    def publish(self, user: str, message: DeliveredMessage) -> None:
        return None

    async def claim(self, user: str, conn: object, limit: int) -> bool:
        return True  # one process: RelayServer counts its own connections

    def release(self, user: str, conn: object) -> None:
        return None

    def identity_changed(self, user: str) -> None:
        return None

    def control(self, what: str, user: str) -> None:
        return None


def parse_bus_url(url: str) -> tuple[str, str, int]:
    """``redis://host:port/db?prefix=NAME&presence_ttl_ms=N`` -> (URL for redis-py without our two
    parameters, prefix, presence TTL in ms)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"--bus must be a redis:// or rediss:// URL, not {parts.scheme or url!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), "cipherpost")
    if not prefix or any(c in prefix for c in ": \n"):
        raise ValueError("--bus prefix must be non-empty, without ':' or spaces")
    ttl_text = next((v for k, v in query if k == "presence_ttl_ms"), str(PRESENCE_TTL_MS))
    if not ttl_text.isdigit() or not 300 <= int(ttl_text) <= 3_600_000:
        raise ValueError("--bus presence_ttl_ms must be a whole number of ms in 300-3600000")
    rest = urlencode([(k, v) for k, v in query if k not in ("prefix", "presence_ttl_ms")])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), prefix, int(ttl_text)


class RedisBus:
    """Wake-ups over Redis pub/sub; see the module docstring for the failure behaviour."""

    def __init__(self, url: str) -> None:
        self._url, self.prefix, self.presence_ttl_ms = parse_bus_url(url)
        self.instance = secrets.token_hex(6)  # our own publishes are not echoed back to us
        self._on_wake: WakeHandler | None = None
        self._local_users: Callable[[], Iterable[str]] = tuple
        self._client: Any = None
        self._pubsub: Any = None
        self._up = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._confirmed: dict[str, asyncio.Future[None]] = {}  # channel -> subscription confirmed
        self._outbox: list[tuple[str, bytes]] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._presence_task: asyncio.Task[None] | None = None
        self._on_control: ControlHandler | None = None
        self._claim: Any = None
        self._claims: dict[object, tuple[str, str]] = {}  # connection -> (presence key, member)
        self.wakeups_received = 0
        self.wakeups_published = 0

    @property
    def healthy(self) -> bool:
        return self._up

    def _channel(self, user: str) -> str:
        return f"{self.prefix}:wake:{user}"

    @property
    def _control_channel(self) -> str:
        return f"{self.prefix}:control"

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, on_wake: WakeHandler, local_users: Callable[[], Iterable[str]],
                    on_control: ControlHandler | None = None) -> None:
        import redis.asyncio as redis  # optional dependency: the [scale] extra

        self._on_wake = on_wake
        self._on_control = on_control
        self._local_users = local_users
        self._client = redis.Redis.from_url(self._url, socket_connect_timeout=2.0, socket_timeout=5.0,
                                            health_check_interval=0)
        self._claim = self._client.register_script(_CLAIM_LUA)
        self._task = asyncio.create_task(self._run())
        self._presence_task = asyncio.create_task(self._refresh_claims())

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._task, self._flush_task, self._poll_task, self._presence_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await self._close_pubsub()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    # --- subscriptions ----------------------------------------------------------------------

    async def watch(self, user: str) -> None:
        channel = self._channel(user)
        confirmed = self._confirmed.get(channel)
        if confirmed is None:
            confirmed = self._confirmed[channel] = asyncio.get_running_loop().create_future()
            if self._up and self._pubsub is not None:
                try:
                    await self._pubsub.subscribe(channel)
                except Exception as exc:  # the reader notices the outage too and reconnects
                    self._went_down(exc)
        if confirmed.done() or not self._up:
            return
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            log.warning("event=bus_subscribe_slow user=%s", user)

    def unwatch(self, user: str) -> None:
        channel = self._channel(user)
        if self._confirmed.pop(channel, None) is None or self._pubsub is None or not self._up:
            return
        asyncio.get_running_loop().create_task(self._unsubscribe(channel))

    async def _unsubscribe(self, channel: str) -> None:
        if channel in self._confirmed:  # watched again meanwhile
            return
        with contextlib.suppress(Exception):
            await self._pubsub.unsubscribe(channel)

    # --- publishing -------------------------------------------------------------------------

    def publish(self, user: str, message: DeliveredMessage) -> None:
        if not self._up:
            return  # the recipient's instance polls while Redis is away
        m = message
        if len(m.body) <= INLINE_BODY_MAX:  # saves the receiving instance a page query
            payload = pack([self.instance, m.seq, m.sender, m.id, m.kind, m.body, m.ts])
        else:
            payload = pack([self.instance, m.seq])
        self._outbox.append((user, payload))
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                for attempt in (1, 2):  # a second time on a fresh connection (Redis restarted)
                    pipe = self._client.pipeline(transaction=False)
                    for user, payload in batch:
                        pipe.publish(self._channel(user), payload)
                    try:
                        await pipe.execute()
                    except Exception as exc:
                        if attempt == 2:  # the recipients' instances lose Redis too: they poll
                            log.warning("event=bus_publish_failed error=%s wakeups=%d", type(exc).__name__,
                                        len(batch))
                        continue
                    self.wakeups_published += len(batch)
                    break
        finally:
            self._flush_task = None

    # --- the reader: wake-ups in, reconnection, poll while down --------------------------------

    def _went_down(self, exc: BaseException) -> None:
        self._up = False
        if self._poll_task is None and not self._stopping:
            log.warning("event=bus_down error=%s poll_interval_s=%g", type(exc).__name__, POLL_INTERVAL_S)
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            self._wake_everyone()

    async def _connect(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=False)
        self._pubsub = pubsub
        await self._client.ping()
        loop = asyncio.get_running_loop()
        for channel, confirmed in list(self._confirmed.items()):  # confirmations come again
            if confirmed.done():
                self._confirmed[channel] = loop.create_future()
        # a pub/sub connection needs a subscription before it may read: the control channel
        await pubsub.subscribe(self._control_channel, *self._confirmed)

    async def _run(self) -> None:
        delay = 0.1
        while not self._stopping:
            try:
                await self._connect()
            except Exception as exc:
                self._went_down(exc)
                await self._close_pubsub()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = 0.1
            self._up = True
            recovered = self._poll_task is not None
            if self._poll_task is not None:
                self._poll_task.cancel()
                self._poll_task = None
            log.info("event=bus_up prefix=%s instance=%s", self.prefix, self.instance)
            if recovered:
                self._wake_everyone()  # once: wake-ups published while we were away are lost
            try:
                await self._read()
            except Exception as exc:
                self._went_down(exc)
            await self._close_pubsub()

    async def _read(self) -> None:
        pubsub = self._pubsub
        while not self._stopping:
            message = await pubsub.get_message(timeout=READ_TIMEOUT_S)
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            if kind == "subscribe":
                confirmed = self._confirmed.get(channel)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
            elif kind == "message":
                if channel == self._control_channel:
                    self._control(message["data"])
                else:
                    self._deliver(channel, message["data"])

    def _deliver(self, channel: str, data: bytes) -> None:
        user = channel[len(self.prefix) + len(":wake:"):]
        try:
            fields = unpack(data, what="wake-up")
            origin, seq = fields[0], fields[1]
            message = None
            if len(fields) == 7:
                message = DeliveredMessage(seq=seq, sender=fields[2], id=fields[3], kind=fields[4],
                                           body=fields[5], ts=fields[6])
            if not isinstance(origin, str) or not isinstance(seq, int):
                raise ValueError("bad wake-up")
        except (CryptoError, ValueError, TypeError, IndexError):
            log.warning("event=bus_bad_wakeup")
            return
        if origin == self.instance:
            return
        self.wakeups_received += 1
        assert self._on_wake is not None
        self._on_wake(user, seq, message)

    def _control(self, data: bytes) -> None:
        try:
            origin, what, user = data.decode().split(":", 2)
        except (UnicodeDecodeError, ValueError):
            log.warning("event=bus_bad_control")
            return
        if origin != self.instance and self._on_control is not None:
            self._on_control(what, user)

    def identity_changed(self, user: str) -> None:
        self.control("identity", user)

    def control(self, what: str, user: str) -> None:
        if self._up:
            asyncio.get_running_loop().create_task(self._publish_control(what, user))

    async def _publish_control(self, what: str, user: str) -> None:
        try:
            await self._client.publish(self._control_channel, f"{self.instance}:{what}:{user}")
        except Exception as exc:  # the other instances lose Redis too; their caches are per process
            log.warning("event=bus_publish_failed error=%s what=%s", type(exc).__name__, what)

    # --- presence: authenticated connections per account, across instances ---------------------

    async def claim(self, user: str, conn: object, limit: int) -> bool:
        key, member = f"{self.prefix}:conns:{user}", f"{self.instance}:{id(conn):x}"
        if self._up:
            try:
                if not await self._claim(keys=[key], args=[member, limit, self.presence_ttl_ms]):
                    return False
            except Exception as exc:  # fail open: the instance's own cap still holds
                log.warning("event=bus_claim_failed error=%s", type(exc).__name__)
        self._claims[conn] = (key, member)
        return True

    def release(self, user: str, conn: object) -> None:
        claim = self._claims.pop(conn, None)
        if claim is not None and self._up:
            asyncio.get_running_loop().create_task(self._release(*claim))

    async def _release(self, key: str, member: str) -> None:
        with contextlib.suppress(Exception):  # it expires anyway
            await self._client.zrem(key, member)

    async def _refresh_claims(self) -> None:
        """Keep this instance's live connections counted; a dead instance's expire."""
        while True:
            await asyncio.sleep(self.presence_ttl_ms / 3000)  # three refreshes per TTL
            if not self._claims or not self._up:
                continue
            try:
                now_ms = int((await self._client.time())[0]) * 1000
                pipe = self._client.pipeline(transaction=False)
                for key, member in list(self._claims.values()):
                    pipe.zadd(key, {member: now_ms + self.presence_ttl_ms})
                    pipe.pexpire(key, self.presence_ttl_ms)
                await pipe.execute()
            except Exception as exc:
                log.warning("event=bus_presence_refresh_failed error=%s", type(exc).__name__)

    def _wake_everyone(self) -> None:
        if self._on_wake is None:
            return
        for user in list(self._local_users()):
            self._on_wake(user, None, None)

