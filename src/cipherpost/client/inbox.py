"""Receiving: a ``deliver`` batch -> one profile transaction -> ack -> show (DESIGN.md "Delivery").

One batch (what one ``deliver`` frame carries; the relay pages its queue 256 at a time) is handled
as one unit, so catching up on thousands of messages costs one commit per batch, not one per message:

1. Under the client's state lock, open one transaction. Each message runs inside its own SAVEPOINT:
   a message that cannot be decrypted, parsed or stored rolls back only its own step and becomes a
   notice row *inside the batch* (never a failed batch redelivered forever).
2. Sessions are read from the database at most once per batch and then advanced in memory; the
   advanced states, the prekey store and the collapsed notices are written once, just before the
   commit. The in-memory prekey store replaces the client's only after the commit.
3. Only after the commit are the relay's sequence numbers acked: a crash anywhere before it means
   redelivery, and the ``(sender, id)`` uniqueness of the history drops the copies (exactly once).

Also here: names from the network are validated (``names.check_sender``); blocked senders are acked
and dropped unseen; a stranger's messages are *requests* (``requests.py``), nothing pinned; gaps in
a chain's counters become "N messages from X did not arrive" notices; repeated undecryptable
messages from one sender collapse into one notice; an undecryptable message asks its sender to send
it again (``decryption_errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..crypto.errors import CryptoError, DuplicateMessage
from ..crypto.pqxdh import psk_id
from ..crypto.prekey_store import PrekeyStore
from ..crypto.session import Session, accept_session, decrypt, envelope_session_id, inspect_envelope
from . import attachments
from .attachments import FileOffer
from .errors import ClientError, ConnectionFailed
from .names import InvalidSenderName, check_sender, confusable_warning, shown_name
from .plaintext import parse_payload
from .profile import Contact, StoredMessage
from .requests import REQUEST, REQUEST_SHOWN, request_warning

if TYPE_CHECKING:
    from .client import Client

INVALID_NAMES = "\x00invalid"   # one collapsed notice for every refused sender name
UNDECRYPTABLE = "undecryptable"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class IncomingMessage:
    """A message as shown to the user (``recv --json`` prints exactly these fields)."""

    id: str
    sender: str
    text: str
    sent_at: int | None
    received_at: int | None
    warning: str | None = None
    row: int | None = field(default=None, compare=False, repr=False)   # for mark_shown
    request: bool = field(default=False, compare=False)   # from a stranger: not a contact yet
    file: FileOffer | None = None  # an attachment (client/attachments.py), not yet downloaded
    group: str | None = None   # the group's name for a group message or event (client/groups.py)

    @classmethod
    def from_stored(cls, m: StoredMessage) -> IncomingMessage:
        warning, group, sender = m.extra.get("warning"), m.extra.get("group"), m.extra.get("from", m.contact)
        return cls(m.msg_id.hex(), sender if isinstance(sender, str) else "", m.text, m.sent_at,
                   m.received_at,
                   warning if isinstance(warning, str) else None, m.row,
                   m.status in (REQUEST, REQUEST_SHOWN), attachments.offer_of(m.extra),
                   group if isinstance(group, str) else None)


@dataclass
class _SessionEntry:
    contact: str
    identity: bytes
    session: Session
    with_psk: bool
    dirty: bool = False


@dataclass
class _Notice:
    """An unshown undecryptable notice that later failures from the same sender add to."""

    row: int
    who: str    # "from WHO" in the collapsed text
    text: str
    more: int = 0


@dataclass
class _Batch:
    prekeys: PrekeyStore
    sessions: dict[bytes, _SessionEntry | None] = field(default_factory=dict)
    accepted: set[bytes] = field(default_factory=set)   # initial messages accepted in this batch
    contacts: dict[str, Contact | None] = field(default_factory=dict)
    shown: list[IncomingMessage] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    touched_notices: set[str] = field(default_factory=set)
    retexts: dict[int, str] = field(default_factory=dict)   # notice row -> its collapsed text
    pake: list[str] = field(default_factory=list)
    derr_in: list[tuple[str, bytes]] = field(default_factory=list)
    derr_out: list[tuple[str, bytes, bytes | None]] = field(default_factory=list)
    dropped: int = 0


@dataclass(frozen=True)
class _Stored:
    """What one message changed, applied to the batch once its savepoint is released."""

    session_id: bytes
    entry: _SessionEntry
    new_prekeys: PrekeyStore | None
    keep_only: tuple[str, list[bytes]] | None
    shown: list[IncomingMessage]
    event: tuple[str, dict[str, Any]]


class Receiver:
    """The receive path of one :class:`Client` (which owns the state lock and the connection)."""

    def __init__(self, client: Client) -> None:
        self._c = client
        self.listeners: list[Callable[[IncomingMessage], None]] = []
        self.activity = asyncio.Event()     # set after every handled batch
        self.drained = asyncio.Event()      # set by the relay's `drained` push, where announced
        self.idle = asyncio.Event()         # no delivered batch is being handled (receive waits)
        self.idle.set()
        self._handling = 0
        self._notices: dict[str, _Notice] = {}
        # What this process stored and has not shown yet, by row: take_new_messages then reads
        # only row ids instead of decrypting every record again (a catch-up of 10,000 messages).
        self._unshown: dict[int, IncomingMessage] = {}

    # ------------------------------------------------------------------ one deliver frame
    async def handle_deliver(self, messages: list[Any]) -> None:
        self._handling += 1
        self.idle.clear()
        try:
            await self._handle_deliver(messages)
        finally:
            self._handling -= 1
            if not self._handling:
                self.idle.set()

    async def _handle_deliver(self, messages: list[Any]) -> None:
        c = self._c
        seqs: list[int] = []
        async with c._state_lock:
            batch = _Batch(c.prekeys)
            try:
                with c.db.transaction():
                    for m in messages:
                        if not isinstance(m, dict) or type(m.get("seq")) is not int:
                            continue
                        seqs.append(m["seq"])
                        self._one(batch, m)
                        c._emit("batch_step", seq=m["seq"])   # inside the open transaction
                    self._finish(batch)
            except BaseException:
                self._notices.clear()   # their rows were rolled back with the batch
                raise
            c.prekeys = batch.prekeys
            if batch.retexts:   # notices that counted more failures, in this batch or an earlier one
                batch.shown = [dataclasses.replace(m, text=batch.retexts[m.row]) if m.row in batch.retexts
                               else m for m in batch.shown]
                for row, text in batch.retexts.items():
                    if row in self._unshown:
                        self._unshown[row] = dataclasses.replace(self._unshown[row], text=text)
            self._unshown.update((m.row, m) for m in batch.shown if m.row is not None)
            for entry in batch.sessions.values():
                if entry is not None:
                    entry.dirty = False
        for name, details in batch.events:
            c._emit(name, **details)   # committed, not yet acked: crash tests stop here
        conn = c._conn
        if seqs and conn is not None:
            # Acked only now: everything above is committed (DESIGN.md "Delivery").
            with contextlib.suppress(ConnectionFailed):
                await conn.send({"t": "ack", "seqs": seqs})
        c._emit("batch_acked", count=len(seqs), shown=len(batch.shown), dropped=batch.dropped)
        for sender in batch.pake:
            for pake_listener in c._pake_listeners:
                pake_listener(sender)
        for message in batch.shown:
            for listener in self.listeners:
                listener(message)
        await c.retries.after_batch(batch.derr_out, batch.derr_in)
        await c.groups.after_batch()
        self.activity.set()

    def _one(self, batch: _Batch, m: dict[str, Any]) -> None:
        c = self._c
        raw_sender, msg_id, body, kind = m.get("from"), m.get("id"), m.get("body"), m.get("kind")
        if not isinstance(msg_id, bytes) or not isinstance(body, bytes):
            return
        try:
            sender = check_sender(raw_sender, c.username)
        except InvalidSenderName as exc:
            shown = shown_name(raw_sender) if isinstance(raw_sender, str) else "(none)"
            self._undecryptable(batch, INVALID_NAMES, shown, msg_id, str(exc))
            c._emit("sender_refused", sender=shown)
            return
        if c.blocks.is_blocked(sender):
            batch.dropped += 1   # acked with the batch, never stored or shown
            return
        if kind == "pake":
            ts = m.get("ts")
            if c.pake_mailbox.put(sender, body, ts if isinstance(ts, int) else now_ms()) == "spake2":
                batch.pake.append(sender)
            return
        if kind == "derr":
            batch.derr_in.append((sender, body))
            return
        if kind == "grp":   # a group message (client/groups.py)
            batch.shown.extend(c.groups.receive_grp(sender, msg_id, body, m.get("ts")))
            return
        if kind != "msg" or c.db.has_message(sender, "in", msg_id):
            return   # unknown kind, or a redelivery of something already stored: just ack it again
        try:
            stored = self._decrypt_and_store(batch, sender, msg_id, body, m.get("ts"))
        except DuplicateMessage:
            batch.contacts.clear()
            return
        except Exception as exc:  # one bad message must never stop the inbox
            # Whatever went wrong with this message, it is reported and acked, not retried forever
            # (a message the client cannot process would otherwise block every later one).
            batch.contacts.clear()
            detail = str(exc) if isinstance(exc, CryptoError | ClientError) else type(exc).__name__
            asked = c.retries.should_ask(sender, msg_id)
            if asked:
                batch.derr_out.append((sender, msg_id, _session_id_of(body)))
            reason = f"could not decrypt a message from {sender}: {detail}"
            if asked:
                reason += f" (asked {sender} to send it again)"
            self._undecryptable(batch, sender, sender, msg_id, reason)
            batch.events.append(("decrypt_failed", {"sender": sender, "reason": str(exc)}))
            return
        self._apply(batch, stored)

    def _apply(self, batch: _Batch, stored: _Stored) -> None:
        if stored.keep_only is not None:
            name, keys = stored.keep_only
            for sid, entry in list(batch.sessions.items()):
                if entry is not None and entry.contact == name and entry.identity not in keys:
                    batch.sessions[sid] = None
        batch.sessions[stored.session_id] = stored.entry
        if stored.new_prekeys is not None:
            batch.prekeys = stored.new_prekeys
            batch.accepted.add(stored.session_id)
        batch.shown.extend(stored.shown)
        batch.events.append(stored.event)

    def _finish(self, batch: _Batch) -> None:
        """Write what the batch kept in memory, inside its transaction."""
        c = self._c
        now = now_ms()
        for sid, entry in batch.sessions.items():
            if entry is not None and entry.dirty:
                c.db.save_session(sid, entry.contact, entry.identity, entry.session.serialize(), now,
                                  with_psk=entry.with_psk)
        if batch.prekeys is not c.prekeys:
            c._save_prekeys(batch.prekeys)
        for key in batch.touched_notices:
            notice = self._notices[key]
            text = _collapsed_text(notice)
            c.db.replace_text(notice.row, text, {"warning": UNDECRYPTABLE, "more": notice.more})
            batch.retexts[notice.row] = text

    # ------------------------------------------------------------------ one message
    def _session(self, batch: _Batch, session_id: bytes) -> _SessionEntry | None:
        if session_id not in batch.sessions:
            stored = self._c.db.get_session(session_id)
            batch.sessions[session_id] = None if stored is None else _SessionEntry(
                stored[0], stored[1], Session.deserialize(stored[2]), stored[3])
        return batch.sessions[session_id]

    def _contact(self, batch: _Batch, name: str) -> Contact | None:
        if name not in batch.contacts:
            batch.contacts[name] = self._c.db.get_contact(name)
        return batch.contacts[name]

    def _decrypt_and_store(self, batch: _Batch, sender: str, msg_id: bytes, body: bytes,
                           ts: Any) -> _Stored:
        c = self._c
        session_id = envelope_session_id(body)
        entry = self._session(batch, session_id)
        new_store: PrekeyStore | None = None
        info = None if entry is not None and entry.contact == sender else inspect_envelope(body)
        if info is None and entry is not None:
            before = entry.session
            plaintext, session = decrypt(before, body)
            gap = _new_skipped(before, session)
            with_psk = entry.with_psk
        elif info is not None and info.initial is not None:
            if info.session_id in batch.accepted or c.db.session_was_accepted(info.session_id):
                raise DuplicateMessage("replayed initial message of an earlier session")
            known = self._contact(batch, sender)
            psk = None if known is None else known.psk
            if info.initial.psk_id is not None:
                if psk is None or not hmac.compare_digest(psk_id(psk), info.initial.psk_id):
                    raise ClientError("the message uses a verification key this profile does not hold")
            elif psk is not None:
                raise ClientError(f"{sender} is verified by password, but this new session does not use "
                                  "the verification key; refused (re-verify if they reinstalled)")
            plaintext, session, new_store = accept_session(c.identity, batch.prekeys, body, psk=psk)
            gap = len(session.ratchet.skipped)   # earlier messages of this session never came
            with_psk = psk is not None
            batch.events.append(("pqxdh_respond", {
                "sender": sender, "session": session.session_id.hex()[:8],
                "one_time": info.initial.one_time_prekey_id is not None}))
        else:
            raise ClientError("no session matches this message (it may predate a reset of either side)")
        kind, content, sent_at = parse_payload(plaintext, sender=sender, me=c.username)
        peer = session.peer.encode()
        if kind == "group":   # a group payload (client/groups.py), never shown as text
            if new_store is not None:
                c.db.mark_session_accepted(session.session_id)
            events = c.groups.on_control(sender, peer, content)
            batch.contacts.clear()   # a change may have pinned members: later messages are from contacts
            return _Stored(session.session_id, _SessionEntry(sender, peer, session, with_psk, dirty=True),
                           new_store, None, events, ("group_control", {}))
        text, file_extra = attachments.read_content(kind, content)
        contact = self._contact(batch, sender)
        # One message's writes are one step: undone alone if any of them fails. The common case
        # (a known contact, same key, no gap) is a single INSERT, atomic by itself.
        simple = contact is not None and peer == contact.identity and new_store is None and not gap
        with contextlib.nullcontext() if simple else c.db.savepoint():
            received = now_ms()
            warning: str | None = None
            extra: dict[str, Any] | None = None
            status = "new"
            held = False
            keep_only: tuple[str, list[bytes]] | None = None
            if contact is None:
                # A stranger: a request, shown apart; nothing is pinned until the user accepts it.
                status = REQUEST
                warning = request_warning(sender, confusable_warning(sender, c.db.contact_names()))
                extra = {"warning": warning, "key": peer}
            elif peer != contact.identity:
                c.db.set_pending_identity(sender, peer)
                batch.contacts.pop(sender, None)
                warning = str(c._identity_changed(contact, peer))
                extra = {"warning": warning, "key": peer}
                # From a VERIFIED contact, text under an unverified new key is held back until the
                # user accepts that key: it may be someone else writing in their name.
                held = contact.verified
                # Only the pinned key and the newest pending one keep sessions.
                keep_only = (sender, [contact.identity, peer])
                c.db.drop_sessions_except(sender, keep_only[1])
            if new_store is not None:
                c.db.mark_session_accepted(session.session_id)
            shown: list[IncomingMessage] = []
            if gap:
                gap_id = hashlib.sha256(b"gap:" + msg_id).digest()[:16]
                gap_text = (f"1 message from {sender} did not arrive (if it still comes, it is shown then)"
                            if gap == 1 else f"{gap} messages from {sender} did not arrive (if they still "
                            "come, they are shown then)")
                row = c.db.add_message(sender, "event", gap_id, gap_text, sent_at=None, received_at=received,
                                       status="new", extra={"warning": "gap", "missing": gap})
                if row is not None:
                    shown.append(IncomingMessage(gap_id.hex(), sender, gap_text, None, received, "gap", row))
            if file_extra:
                extra = {**(extra or {}), **file_extra}
            row = c.db.add_message(sender, "in", msg_id, text, sent_at=sent_at, received_at=received,
                                   status="held" if held else status, extra=extra)
            if held:
                notice = (f"a message from {sender} is held back: it came under a NEW key, and {sender} "
                          f"was verified. It is shown once you accept the new key (verify {sender}).")
                nrow = c.db.add_message(sender, "event", msg_id, notice, sent_at=None, received_at=received,
                                        status="new", extra={"warning": warning})
                shown.append(IncomingMessage(msg_id.hex(), sender, notice, None, received, warning, nrow))
            elif row is not None:
                shown.append(IncomingMessage(msg_id.hex(), sender, text, sent_at, received, warning, row,
                                             status == REQUEST, attachments.offer_of(file_extra or {})))
        entry = _SessionEntry(sender, peer, session, with_psk, dirty=True)
        return _Stored(session.session_id, entry, new_store, keep_only, shown,
                       ("decrypt", {"sender": sender, "msg_id": msg_id.hex(),
                                    "session": session.session_id.hex()[:8], "server_ts": ts}))

    # ------------------------------------------------------------------ notices
    def _undecryptable(self, batch: _Batch, key: str, contact: str, msg_id: bytes, reason: str) -> None:
        """One notice per sender until it is shown; later failures only count into it."""
        c = self._c
        notice = self._notices.get(key)
        if notice is not None:
            notice.more += 1
            batch.touched_notices.add(key)
            return
        received = now_ms()
        row = c.db.add_message(contact, "event", msg_id, reason, sent_at=None, received_at=received,
                               status="new", extra={"warning": UNDECRYPTABLE})
        if row is None:
            return   # a redelivered failure already reported
        self._notices[key] = _Notice(row, "senders with invalid names" if key == INVALID_NAMES else contact,
                                     reason)
        batch.shown.append(IncomingMessage(msg_id.hex(), contact, reason, None, received, UNDECRYPTABLE, row))

    def forget_shown_notices(self) -> None:
        """The notices were shown: the next failure from the same sender starts a new one."""
        self._notices.clear()

    # ------------------------------------------------------------------ what the user sees
    def take_new_messages(self, *, mark: bool = True) -> list[IncomingMessage]:
        """Messages, requests and notices not yet shown; marks them shown unless ``mark`` is False
        (then call :meth:`mark_shown` once each is really shown)."""
        db = self._c.db
        rows = db.rows_with_status("new", REQUEST)
        cached = self._unshown
        if all(r in cached and cached[r].request == (status == REQUEST) for r, status in rows):
            new = [cached[r] for r, _ in rows]
        else:   # stored by an earlier process, released from held, accepted requests: read them
            new = [IncomingMessage.from_stored(m) for m in db.messages_with_status("new", REQUEST)]
        if mark:
            self.mark_shown(new)
        return new

    def mark_shown(self, messages: list[IncomingMessage]) -> None:
        db = self._c.db
        asked = {m.row for m in messages if m.row is not None and m.request}
        if asked:   # a request settled since it arrived (a group pinned its sender) is shown as usual
            asked &= {m.row for m in db.messages_with_status(REQUEST)}
        with db.transaction():
            db.set_status([m.row for m in messages if m.row is not None and m.row not in asked], "shown")
            db.set_status(sorted(r for r in asked if r is not None), REQUEST_SHOWN)
        for m in messages:
            if m.row is not None:
                self._unshown.pop(m.row, None)
        self.forget_shown_notices()

    async def receive(self, *, wait: float = 0.0, settle: float = 0.5,
                      mark_shown: bool = True) -> list[IncomingMessage]:
        """Connect, take what the relay holds, and wait up to ``wait`` seconds for more.

        With a relay that announces ``drained`` the queue's end is known; otherwise the stream is
        taken as finished once it has been quiet for ``settle`` seconds.
        """
        c = self._c
        await c.connect()   # a new connection clears `drained`; an open one has had it already
        conn = c._require_conn()
        await conn.request({"t": "ping"})
        deadline = time.monotonic() + wait
        have = c.db.has_unshown()
        got_any: list[bool] = [have]

        def note(_: IncomingMessage) -> None:
            got_any[0] = True
        self.listeners.append(note)
        try:
            if "drained" in conn.caps:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.drained.wait(), timeout=max(wait, 30.0))
                live = False
                while not got_any[0] and time.monotonic() < deadline:
                    self.activity.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.activity.wait(), deadline - time.monotonic())
                    live = True
                # Queued mail ends at `drained`; mail that came live has no such end: let the rest
                # of its burst (and the work its batch still awaits, e.g. decryption-error reports)
                # finish, as without `drained`.
                while live and got_any[0]:
                    self.activity.clear()
                    try:
                        await asyncio.wait_for(self.activity.wait(), timeout=settle)
                    except TimeoutError:
                        break
                # A batch may still be finishing (its rows are committed, its acks and
                # decryption-error reports not yet sent): let it end before returning.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.idle.wait(), timeout=max(wait, 30.0))
            else:
                while True:
                    self.activity.clear()
                    timeout = settle if got_any[0] else max(settle, deadline - time.monotonic())
                    try:
                        await asyncio.wait_for(self.activity.wait(), timeout=timeout)
                    except TimeoutError:
                        break
        finally:
            self.listeners.remove(note)
        return self.take_new_messages(mark=mark_shown)


def _collapsed_text(notice: _Notice) -> str:
    more = notice.more
    return f"{notice.text} (and {more} more undecryptable message{'s' if more != 1 else ''} from " \
           f"{notice.who})"


def _new_skipped(before: Session, after: Session) -> int:
    """How many message keys this step stored for messages that have not arrived (a gap)."""
    old, new = before.ratchet.skipped, after.ratchet.skipped
    if new is old or len(new) < len(old):
        return 0   # no skip, or one stored key was used (a late message arrived)
    return sum(1 for k in new if k not in old)


def _session_id_of(body: bytes) -> bytes | None:
    try:
        return envelope_session_id(body)
    except CryptoError:
        return None
