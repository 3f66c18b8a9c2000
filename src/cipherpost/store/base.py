"""The relay's storage interface: accounts, invites, prekeys and mailboxes behind one Protocol.

The server depends only on :class:`RelayStore`; :mod:`cipherpost.store.sqlite` is the default
backend and :mod:`cipherpost.store.postgres` implements the same methods (each mutation below is
one transaction there: the account row locked ``FOR UPDATE`` for prekey consumption, a unique key on
``(sender, msg_id)`` for idempotent sends, ``mailbox_heads`` rows locked in sorted order for fan-out).
Schema versions of every backend come from one list, :mod:`cipherpost.store.migrations`.
docs/contracts.md sections 1 and 4 describe the same contract in prose.

Contract for every backend:

- Mutations are durable when their awaitable completes (committed; the server replies only then).
- ``take_bundle`` consumes at most one one-time prekey of each kind atomically: two concurrent
  calls never return the same key.
- ``enqueue_many`` is idempotent on ``(sender, msg_id)`` for at least ``dedup_window_ms``: a
  recipient that was ACCEPTED once reads DUPLICATE on every retry (one remembered row per
  ``(sender, msg_id)``, not per recipient); a recipient that was refused may be retried.
- One body is stored once, whatever the number of recipients, and is deleted with its last
  reference (ack or account deletion).
- Every rule of :class:`MailboxPolicy`, account states and blocks is checked for each recipient in
  the same transaction as the insert. A blocked sender's message reads ACCEPTED and is not stored.
- Each recipient's sequence numbers grow and commit in order (the relay's push drops ``seq <= last``).
- ``ack`` deletes only messages of the given recipient.
- Errors are the typed :class:`StoreError` subclasses below; messages never contain bodies or keys.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

# Defaults of MailboxPolicy (docs/contracts.md 1.2); the relay's config overrides them.
DEFAULT_MAX_QUEUE = 10_000  # messages waiting per recipient
DEFAULT_MAX_QUEUE_PER_SENDER = 1_000  # per (sender, recipient): a stranger cannot fill a mailbox
DEFAULT_MAX_STORED_BYTES = 256 * 1024 * 1024  # per recipient account: queued mail (+ blobs, issue 13)
MAX_FANOUT = 1_000  # recipients of one Delivery
MAX_BLOCKS = 10_000  # senders one account may block (a user's input must not grow the store unbounded)
EPOCH_BYTES = 16


class StoreError(Exception):
    """Base class of storage failures."""


class UsernameTaken(StoreError):
    pass


class NameReserved(UsernameTaken):
    """The name, or one that looks like it, is reserved (by the operator, or by a deleted account).

    A :class:`UsernameTaken` so that a caller that only knows the older error still refuses."""


class NameConfusable(UsernameTaken):
    """The name looks like an existing account's (``protocol/usernames.py:skeleton`` is equal)."""

    def __init__(self, name: str, similar_to: str) -> None:
        super().__init__(f"{name!r} looks like the existing name {similar_to!r}")
        self.similar_to = similar_to


class InvalidName(StoreError):
    """Not a valid username (``protocol/usernames.py``); the server validates before the store."""


class UnknownAccount(StoreError):
    pass


class AccountDeleted(UnknownAccount):
    """The account was deleted; its row only reserves the name."""


class AccountSuspended(UnknownAccount):
    """The recipient's account is suspended or deleted (single-recipient ``enqueue``)."""


class InvalidInvite(StoreError):
    """The invite token is unknown, already used, or expired."""


class MailboxFull(StoreError):
    pass


class SenderCapReached(MailboxFull):
    """This sender's share of the recipient's queue (``max_queue_per_sender``) is used up."""


class QuotaExceeded(MailboxFull):
    """The recipient's byte quota (``max_stored_bytes``) or the store's disk budget is used up.

    A :class:`MailboxFull` so that callers written before quotas still refuse the send."""


class NoPrekeys(StoreError):
    """The account has not published a signed prekey and a KEM prekey yet."""


class PrekeyPoolFull(StoreError):
    pass


class InvalidDelivery(StoreError):
    """A :class:`Delivery` with no recipient, more than ``MAX_FANOUT``, or the same one twice."""


class BlockListFull(StoreError):
    """The account already blocks ``MAX_BLOCKS`` senders."""


class SchemaTooNew(StoreError):
    """The store was written by a newer cipherpost (its schema version is above ours)."""


class BlobNotFound(StoreError):
    """No such blob, or not the caller's (the relay answers both the same: ``not_found``)."""


class BlobConflict(StoreError):
    """``blob_reserve`` of an existing id with another size or chunk size, or a commit of a blob
    that is already committed to other readers."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """Metadata of one blob (issue 13, docs/attachments.md); its bytes are in a ``BlobStore``.

    ``readers``: the accounts that may read it and have not released it yet (empty until commit)."""

    blob_id: bytes
    owner: str
    size: int
    chunk_size: int
    created_ms: int
    committed: bool
    readers: tuple[str, ...]

    def may_read(self, name: str) -> bool:
        return name == self.owner or name in self.readers


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
class Delivery:
    """One envelope for one or more recipients (a group fan-out); the body is stored once."""

    sender: str
    msg_id: bytes  # 16 bytes, chosen by the sender
    kind: str
    body: bytes
    ts: int  # ms since the epoch
    recipients: Sequence[str]  # 1..MAX_FANOUT, distinct, normalised


class RecipientStatus(enum.Enum):
    ACCEPTED = "accepted"  # committed, or dropped because the recipient blocked the sender (the
    # sender cannot tell the two apart, by design; seq is None when dropped)
    DUPLICATE = "duplicate"  # (sender, msg_id) already accepted for this recipient: no new copy
    UNKNOWN_USER = "unknown_user"
    SUSPENDED = "suspended"  # recipient account suspended or deleted
    MAILBOX_FULL = "mailbox_full"  # recipient's total queue cap (max_queue)
    SENDER_CAP = "sender_cap"  # this sender's share of the recipient's queue is used up
    QUOTA_EXCEEDED = "quota_exceeded"  # recipient's byte quota or the store's disk budget


@dataclass(slots=True)  # not frozen: one per recipient on the hot path
class RecipientResult:
    """``seq`` is the recipient's sequence number when stored (also for DUPLICATE, when known)."""

    recipient: str
    status: RecipientStatus
    seq: int | None


@dataclass(frozen=True, slots=True)
class MailboxPolicy:
    """Caps and quotas checked for each recipient in the enqueue's transaction (contracts 1.2)."""

    max_queue: int = DEFAULT_MAX_QUEUE  # messages waiting per recipient
    max_queue_per_sender: int = DEFAULT_MAX_QUEUE_PER_SENDER  # per (sender, recipient)
    max_stored_bytes: int = DEFAULT_MAX_STORED_BYTES  # per recipient: bytes of queued mail (+ blobs)
    disk_budget_bytes: int | None = None  # every stored body together; None = unlimited

    @classmethod
    def queue_only(cls, max_queue: int) -> MailboxPolicy:
        """The policy of the first slice (``enqueue(message, max_queue)``): only the total cap."""
        return cls(max_queue=max_queue, max_queue_per_sender=max_queue, max_stored_bytes=2**62,
                   disk_budget_bytes=None)


@dataclass(slots=True)  # not frozen: created per message on the hot path, frozen init costs ~2 us
class EnqueueResult:
    """``duplicate`` is true when ``(sender, msg_id)`` was already accepted for this recipient.

    ``dropped`` is true when the recipient blocks the sender: reply ``accepted`` as for any other
    send, but deliver nothing (``seq`` is 0 then)."""

    seq: int
    duplicate: bool
    dropped: bool = False


class AccountState(enum.Enum):
    ACTIVE = "active"
    SUSPENDED = "suspended"  # cannot log in or receive; senders get SUSPENDED
    DELETED = "deleted"  # mailbox, prekeys and blocks gone; the row reserves the name


@dataclass(frozen=True, slots=True)
class AccountInfo:
    username: str
    identity: bytes  # empty once DELETED
    state: AccountState
    created_ms: int
    recovery_public: bytes | None  # public half of the recovery key (issue 10)
    login_counter: int  # highest login counter seen (one live copy of a profile, issue 8.7)
    state_changed_ms: int | None = None
    state_by: str | None = None  # who changed the state last (operator name, "user", ...)
    state_reason: str | None = None


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Per sender, counts only (``admin top``): never a recipient, a body or a time finer than an hour."""

    sender: str
    messages: int  # deliveries accepted (one per recipient) since ``since_ms``, by hour bucket
    bytes_sent: int  # body bytes of those deliveries
    bytes_stored: int  # bytes of this sender's mail queued now (per recipient copy)


@dataclass(frozen=True, slots=True)
class OperatorAction:
    """One entry of the operator log (``cipherpost admin``): who did what to which names, when, why.

    The relay polls the log (``operator_log``) to act on live connections (a suspended account's
    connections are closed), so the log is also how an ``admin`` process reaches a running relay."""

    id: int  # grows with each entry
    ts_ms: int
    operator: str
    action: str  # suspend | unsuspend | delete | reserve | unreserve
    names: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class StoreStats:
    accounts: int
    queued_messages: int


EnqueueCallback = Callable[[EnqueueResult | None, StoreError | None], None]
EnqueueManyCallback = Callable[[list[RecipientResult] | None, StoreError | None], None]


class RelayStore(Protocol):
    """Everything the relay persists. All methods are safe to call concurrently from one event loop."""

    async def open(self) -> None:
        """Create or migrate the schema (:mod:`cipherpost.store.migrations`); raises
        :class:`SchemaTooNew` for a store written by a newer cipherpost."""

    async def close(self) -> None:
        """Finish (commit) every operation already submitted, then release resources."""

    # --- accounts -----------------------------------------------------------------------------

    async def create_account(self, username: str, identity: bytes, now_ms: int,
                             invite_hash: bytes | None = None, recovery_public: bytes | None = None) -> None:
        """Create an ACTIVE account; with ``invite_hash``, consume that invite in the same transaction.

        Raises :class:`UsernameTaken` (the name exists), :class:`NameReserved` (reserved, or a
        deleted account's), :class:`NameConfusable` (its skeleton equals an account's),
        :class:`InvalidName` or :class:`InvalidInvite`.
        """

    async def get_identity(self, username: str) -> bytes | None:
        """The account's identity, or None when it does not exist or is not ACTIVE."""

    async def get_account(self, username: str) -> AccountInfo | None:
        """The account in any state (None when it never existed)."""

    async def list_accounts(self) -> list[AccountInfo]:
        """Every account, by name (``admin list``)."""

    async def set_state(self, username: str, state: AccountState, by: str, reason: str) -> None:
        """ACTIVE <-> SUSPENDED, recorded with who and why. Raises :class:`UnknownAccount`,
        :class:`AccountDeleted` (DELETED is final) and ``ValueError`` for DELETED (use
        :meth:`delete_account`)."""

    async def delete_account(self, username: str, by: str, reason: str) -> None:
        """Delete the mailbox, prekeys, blocks (both ways) and recovery key; keep the row as DELETED,
        which reserves the name. Idempotent; raises :class:`UnknownAccount`."""

    async def rebind_identity(self, username: str, identity: bytes, recovery_public: bytes | None) -> None:
        """Recovery: bind the name to a new identity; prekeys are dropped, queued mail is kept, the
        login counter restarts at 0. Raises :class:`UnknownAccount` / :class:`AccountDeleted`."""

    async def set_recovery_public(self, username: str, recovery_public: bytes) -> None:
        """Add or replace the public half of the account's recovery key."""

    async def bump_login(self, username: str, counter: int) -> bool:
        """Record a login's counter; False (nothing written) when it is lower than the stored one:
        an old copy of the profile. Raises :class:`UnknownAccount`."""

    async def reserve(self, names: Sequence[str]) -> None:
        """Reserve names (and their look-alikes) against registration. Raises :class:`InvalidName`."""

    async def unreserve(self, names: Sequence[str]) -> None: ...

    async def reserved(self) -> list[str]:
        """The reserved names, sorted (deleted accounts' names are not listed: see list_accounts)."""

    async def add_invite(self, token_hash: bytes, now_ms: int, expires_ms: int) -> None: ...

    async def log_operator_action(self, operator: str, action: str, names: Sequence[str], reason: str,
                                  now_ms: int) -> None:
        """Append to the operator log (never pruned: an operator's actions stay accountable)."""

    async def operator_log(self, after_id: int, limit: int) -> list[OperatorAction]:
        """Entries with ``id > after_id``, oldest first."""

    # --- prekeys ------------------------------------------------------------------------------

    async def put_prekeys(self, username: str, *, signed_prekey: bytes | None,
                          one_time: Sequence[tuple[int, bytes]], kem_one_time: Sequence[tuple[int, bytes]],
                          kem_last_resort: bytes | None, max_pool: int,
                          replace_pools: bool = False) -> PoolCounts:
        """Replace the signed / last-resort prekeys when given; add one-time prekeys (same key id
        replaces). With ``replace_pools`` both one-time pools are emptied first, in the same
        transaction (after a store epoch change, contracts 1.5). Raises :class:`PrekeyPoolFull`
        (nothing written) if a pool would exceed ``max_pool``."""

    async def prekey_counts(self, username: str) -> PoolCounts: ...

    async def take_bundle(self, username: str, *, one_time: bool = True) -> BundleParts:
        """Consume one one-time prekey of each kind atomically. Raises UnknownAccount (also for an
        account that is not ACTIVE), NoPrekeys.

        ``one_time=False`` (the relay's per-target drain bound, issue 9) consumes none: no one-time
        X25519 prekey, and the last-resort KEM prekey (a one-time KEM prekey only if the account
        has published no last-resort one)."""

    # --- mailboxes ----------------------------------------------------------------------------

    def enqueue_many_then(self, delivery: Delivery, policy: MailboxPolicy,
                          callback: EnqueueManyCallback) -> None:
        """Store one body for every recipient that passes its checks; call ``callback(results, None)``
        (one :class:`RecipientResult` per recipient, in the order of ``delivery.recipients``) or
        ``callback(None, error)`` on the event loop after the commit. Raises
        :class:`InvalidDelivery` at once for a malformed recipient list."""

    async def enqueue_many(self, delivery: Delivery, policy: MailboxPolicy) -> list[RecipientResult]: ...

    def enqueue(self, message: NewMessage, policy: MailboxPolicy | int) -> Awaitable[EnqueueResult]:
        """Store a message for one recipient durably; the awaitable completes after the commit.

        A thin wrapper of :meth:`enqueue_many_then`. An ``int`` policy is the first slice's
        ``max_queue`` (:meth:`MailboxPolicy.queue_only`). Raises :class:`UnknownAccount`,
        :class:`AccountSuspended`, :class:`MailboxFull`, :class:`SenderCapReached` or
        :class:`QuotaExceeded` (the last two are MailboxFull). A plain method returning an awaitable
        so that the server can attach a completion callback instead of spawning a task per message.
        """

    def enqueue_then(self, message: NewMessage, policy: MailboxPolicy | int,
                     callback: EnqueueCallback) -> None:
        """Like :meth:`enqueue`, but call ``callback(result, None)`` or ``callback(None, error)`` on
        the event loop after the commit. The server's per-message path: no future per message."""

    async def pending(self, recipient: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """The recipient's queued messages with ``seq > after_seq``, oldest first."""

    async def ack(self, recipient: str, seqs: Sequence[int]) -> int:
        """Delete those of ``seqs`` queued for ``recipient``; return how many were deleted."""

    def ack_later(self, recipient: str, seqs: Sequence[int]) -> None:
        """Like :meth:`ack` without waiting or a result (failures are logged): the ack frame needs no
        reply, so the server does not pay for a future per ack."""

    async def set_block(self, owner: str, blocked: str, blocked_on: bool) -> None:
        """``owner`` blocks (or unblocks) ``blocked``: later messages from it read ACCEPTED and are not
        stored. Raises :class:`UnknownAccount` (either name) or :class:`BlockListFull`."""

    async def blocked(self, owner: str) -> list[str]: ...

    # --- operators and upkeep -----------------------------------------------------------------

    async def usage(self, since_ms: int) -> list[UsageRow]:
        """Per sender, deliveries and bytes sent in the hour buckets from ``since_ms`` on, and bytes
        stored now; most messages first."""

    async def epoch(self) -> bytes:
        """16 random bytes made with the store; clients republish prekeys when it changes."""

    async def renew_epoch(self) -> bytes:
        """A new epoch (after a restore or a ``migrate-store``)."""

    async def prune(self, now_ms: int, dedup_window_ms: int) -> None:
        """Forget message ids older than the deduplication window, expired invites, old usage rows."""

    async def stats(self) -> StoreStats: ...

    # --- blob metadata and its share of the quota ledger (migration 3, docs/attachments.md) ------

    async def blob_reserve(self, owner: str, blob_id: bytes, size: int, chunk_size: int, now_ms: int,
                           policy: MailboxPolicy) -> BlobInfo:
        """Create the blob's row and charge ``size`` to ``owner``'s ``max_stored_bytes`` (the same
        ledger as the mail queued for it) in one transaction, or return the existing row of the
        same owner, size and chunk size (a resumed upload). ``QuotaExceeded`` over the quota or the
        disk budget; ``BlobNotFound`` when the id is another account's; ``BlobConflict`` on other
        sizes."""

    async def blob_info(self, blob_id: bytes) -> BlobInfo | None: ...

    async def blob_commit(self, blob_id: bytes, owner: str, readers: Sequence[str]) -> BlobInfo:
        """Fix the readers (names that are not accounts are dropped). Idempotent for the same
        readers; ``BlobConflict`` for others."""

    async def blob_release(self, blob_id: bytes, who: str) -> bool:
        """``who`` is done with the blob (a reader saved it; the owner abandons an uncommitted one).
        True when the row was deleted and its bytes returned to the owner's quota: the caller
        deletes the bytes. ``BlobNotFound`` if ``who`` may not read it."""

    async def blobs_expired(self, before_ms: int) -> list[bytes]:
        """Delete the rows of blobs created before ``before_ms`` (quota returned); their ids."""

