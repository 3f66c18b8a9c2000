"""The relay's storage interface: accounts, invites, prekeys and mailboxes behind one Protocol.

The server depends only on :class:`RelayStore`; :mod:`cipherpost.store.sqlite` is the default
backend and a PostgreSQL backend can implement the same methods (each mutation below is one
transaction there: ``SELECT ... FOR UPDATE SKIP LOCKED`` for prekey consumption, a unique index on
``(recipient, sender, msg_id)`` for idempotent sends).

Contract for every backend:

- Mutations are durable when their awaitable completes (committed; the server replies only then).
- ``take_bundle`` consumes at most one one-time prekey of each kind atomically: two concurrent
  calls never return the same key.
- ``enqueue`` is idempotent on ``(recipient, sender, msg_id)`` for at least ``dedup_window_ms``.
- ``ack`` deletes only messages of the given recipient.
- Errors are the typed :class:`StoreError` subclasses below; messages never contain bodies or keys.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class StoreError(Exception):
    """Base class of storage failures."""


class UsernameTaken(StoreError):
    pass


class UnknownAccount(StoreError):
    pass


class InvalidInvite(StoreError):
    """The invite token is unknown, already used, or expired."""


class MailboxFull(StoreError):
    pass


class NoPrekeys(StoreError):
    """The account has not published a signed prekey and a KEM prekey yet."""


class PrekeyPoolFull(StoreError):
    pass


@dataclass(frozen=True, slots=True)
class PoolCounts:
    """How many one-time prekeys an account has left, per kind (X25519, ML-KEM-768)."""

    one_time: int
    kem: int


@dataclass(frozen=True, slots=True)
class BundleParts:
    """One consumed prekey bundle, as published (encoded) by its owner, plus what is left."""

    identity: bytes
    signed_prekey: bytes
    kem_prekey: bytes  # a one-time KEM prekey, or the last-resort one when the pool is empty
    one_time_prekey: bytes | None
    remaining: PoolCounts


@dataclass(slots=True)  # not frozen: created per message on the hot path, frozen init costs ~2 us
class NewMessage:
    sender: str
    recipient: str
    msg_id: bytes
    kind: str
    body: bytes
    ts: int  # ms since the epoch


@dataclass(slots=True)  # not frozen: created per message on the hot path, frozen init costs ~2 us
class StoredMessage:
    seq: int
    recipient: str
    sender: str
    msg_id: bytes
    kind: str
    body: bytes
    ts: int


@dataclass(slots=True)  # not frozen: created per message on the hot path, frozen init costs ~2 us
class EnqueueResult:
    """``duplicate`` is true when ``(recipient, sender, msg_id)`` was already accepted earlier."""

    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StoreStats:
    accounts: int
    queued_messages: int


class RelayStore(Protocol):
    """Everything the relay persists. All methods are safe to call concurrently from one event loop."""

    async def open(self) -> None: ...

    async def close(self) -> None:
        """Finish (commit) every operation already submitted, then release resources."""

    async def create_account(self, username: str, identity: bytes, now_ms: int,
                             invite_hash: bytes | None = None) -> None:
        """Create an account; with ``invite_hash``, consume that invite in the same transaction.

        Raises :class:`UsernameTaken` or :class:`InvalidInvite`.
        """

    async def get_identity(self, username: str) -> bytes | None: ...

    async def add_invite(self, token_hash: bytes, now_ms: int, expires_ms: int) -> None: ...

    async def put_prekeys(self, username: str, *, signed_prekey: bytes | None,
                          one_time: Sequence[tuple[int, bytes]], kem_one_time: Sequence[tuple[int, bytes]],
                          kem_last_resort: bytes | None, max_pool: int) -> PoolCounts:
        """Replace the signed / last-resort prekeys when given; add one-time prekeys (same key id
        replaces). Raises :class:`PrekeyPoolFull` (nothing written) if a pool would exceed ``max_pool``."""

    async def prekey_counts(self, username: str) -> PoolCounts: ...

    async def take_bundle(self, username: str, *, one_time: bool = True) -> BundleParts:
        """Consume one one-time prekey of each kind atomically. Raises UnknownAccount, NoPrekeys.

        ``one_time=False`` (the relay's per-target drain bound, issue 9) consumes none: no one-time
        X25519 prekey, and the last-resort KEM prekey (a one-time KEM prekey only if the account
        has published no last-resort one)."""

    def enqueue(self, message: NewMessage, max_queue: int) -> Awaitable[EnqueueResult]:
        """Store a message durably; the awaitable completes after the commit.

        Raises :class:`UnknownAccount` (recipient) or :class:`MailboxFull` (``max_queue`` queued).
        A plain method returning an awaitable so that the server can attach a completion callback
        instead of spawning a task per message; backends batch these into group commits.
        """

    def enqueue_then(self, message: NewMessage, max_queue: int,
                     callback: Callable[[EnqueueResult | None, StoreError | None], None]) -> None:
        """Like :meth:`enqueue`, but call ``callback(result, None)`` or ``callback(None, error)`` on
        the event loop after the commit. The server's per-message path: no future per message."""

    async def pending(self, recipient: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """The recipient's queued messages with ``seq > after_seq``, oldest first."""

    async def ack(self, recipient: str, seqs: Sequence[int]) -> int:
        """Delete those of ``seqs`` queued for ``recipient``; return how many were deleted."""

    def ack_later(self, recipient: str, seqs: Sequence[int]) -> None:
        """Like :meth:`ack` without waiting or a result (failures are logged): the ack frame needs no
        reply, so the server does not pay for a future per ack."""

    async def prune(self, now_ms: int, dedup_window_ms: int) -> None:
        """Forget message ids older than the deduplication window and expired invites."""

    async def stats(self) -> StoreStats: ...
