"""Group chats: the shell around ``group_state`` (membership) and ``crypto/sender_keys`` (messages).

docs/groups.md is the specification. What this module does, and when:
- create/add/remove/leave: sign a change (``group_state.sign_change``), apply it, store the log and
  queue it to the members over the pairwise sessions (``_queue_pairwise``: an ordinary 1:1 message
  whose plaintext kind is ``"group"``), the whole log (``welcome``) to new members.
- send_group: rotate our sender key if a member we gave it to is gone (lazy rotation), give the
  current key to members who lack it (pinned from the signed state first, so a substituted bundle
  is refused), encrypt once, store the advanced key, the history row and the group outbox entry in
  one transaction, then transmit: ``send_many`` where announced, and only refused recipients again.
- receiving (called by ``inbox.py`` inside the batch transaction; never raises for bad input, it
  turns into a notice): changes, logs, state requests, sender keys, resend requests, and group
  messages. Network follow-ups are queued and sent by :meth:`Groups.after_batch`.

Storage (encrypted profile meta): ``group:<id>`` one record per group (log, flags, who holds our
sender key from which iteration), ``gkey:<id>:<member>`` a ``SenderKeyRecord`` per member (ours
included), ``gout`` the group outbox.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ..crypto.encoding import pack, unpack
from ..crypto.errors import CryptoError, DuplicateMessage, UnknownSenderKey
from ..crypto.sender_keys import (
    GroupMessage,
    SenderKeyDistribution,
    SenderKeyRecord,
    create_sender_key,
    distribution_message,
    group_decrypt,
    group_encrypt,
    process_distribution,
    rotate_sender_key,
)
from ..crypto.session import encrypt
from ..protocol.usernames import normalize_username
from .errors import ClientError, ServerError, UnknownContact
from .group_state import (
    Change,
    ChangeDoesNotFollow,
    GroupChangeRefused,
    GroupState,
    apply_change,
    decode_log,
    distribution_id,
    merge_logs,
    replay,
    sign_change,
)
from .group_wire import BadGroupPayload, decode_control, decode_text, encode_control, encode_text
from .inbox import IncomingMessage

if TYPE_CHECKING:
    from .client import Client

PLAINTEXT_VERSION: Final = 1
MAX_PENDING_PER_GROUP: Final = 200
RESEND_REQUESTS_PER_HOUR: Final = 5         # resend_req per (group, sender)
RESENDS_PER_MEMBER_PER_HOUR: Final = 5      # skd answers per (group, requester)
STATE_REQUESTS_PER_HOUR: Final = 10         # state_req per group
STATE_ANSWERS_PER_MEMBER_PER_HOUR: Final = 5
FINAL_STATUSES: Final = frozenset({"accepted", "duplicate", "unknown_user", "suspended"})
PERMANENT_ERRORS: Final = frozenset({"unknown_user", "suspended", "bad_frame", "too_large"})
HOUR_MS: Final = 3600 * 1000


def now_ms() -> int:
    return int(time.time() * 1000)


def history_key(group_id: bytes) -> str:
    """The history "contact" of a group: '#' never starts a username, so no 1:1 chat collides."""
    return "#" + group_id.hex()


@dataclass
class GroupRecord:
    """One group as this member holds it (stored encrypted; see the module docstring)."""

    log: list[Change]
    status: str = "member"                              # member | removed | left
    rotate: bool = False                                # rotate our sender key on the next send
    distributed: dict[str, int] = field(default_factory=dict)   # member -> first iteration given
    snapshots: dict[int, bytes] = field(default_factory=dict)   # iteration -> our chain key then
    pending: list[list[Any]] = field(default_factory=list)      # [sender, msg_id, body, ts]
    limits: dict[str, list[int]] = field(default_factory=dict)  # bounded requests: key -> times
    state: GroupState | None = None

    @property
    def current(self) -> GroupState:
        if self.state is None:
            self.state = replay(self.log)
        return self.state

    def encode(self) -> bytes:
        return pack([1, [c.encode() for c in self.log], self.status, self.rotate,
                     list(self.distributed.items()), list(self.snapshots.items()), self.pending,
                     list(self.limits.items())])

    @classmethod
    def decode(cls, data: bytes) -> GroupRecord:
        a = unpack(data, what="group record")
        return cls(decode_log(a[1]), a[2], a[3], dict(a[4]), dict(a[5]), a[6], dict(a[7]))

    def allow(self, key: str, per_hour: int) -> bool:
        now = now_ms()
        recent = [t for t in self.limits.get(key, []) if now - t < HOUR_MS]
        if len(recent) >= per_hour:
            return False
        self.limits[key] = [*recent, now]
        return True


@dataclass(frozen=True)
class MemberInfo:
    name: str
    admin: bool
    verified: bool
    key_changed: bool


@dataclass(frozen=True)
class GroupInfo:
    name: str
    group_id: str
    version: int
    status: str
    members: list[MemberInfo]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.group_id, "version": self.version, "status": self.status,
                "members": [m.name for m in self.members],
                "admins": [m.name for m in self.members if m.admin],
                "verified": {m.name: m.verified for m in self.members},
                "key_changed": [m.name for m in self.members if m.key_changed]}


class Groups:
    """The groups of one :class:`Client` (which owns the state lock, the database and the link)."""

    def __init__(self, client: Client) -> None:
        self._c = client
        self._followups: list[tuple[str, bytes]] = []   # (member, pairwise group payload)
        self._flush_lock = asyncio.Lock()

    # ------------------------------------------------------------------ storage
    def _ids(self) -> list[bytes]:
        blob = self._c.db.get_secret_meta("groups")
        return [] if blob is None else list(unpack(blob, what="group index"))

    def _load(self, gid: bytes) -> GroupRecord | None:
        blob = self._c.db.get_secret_meta("group:" + gid.hex())
        return None if blob is None else GroupRecord.decode(blob)

    def _save(self, rec: GroupRecord) -> None:
        gid = rec.log[0].group_id
        ids = self._ids()
        if gid not in ids:
            self._c.db.set_secret_meta("groups", pack([*ids, gid]))
        self._c.db.set_secret_meta("group:" + gid.hex(), rec.encode())

    def _key(self, gid: bytes, member: str) -> SenderKeyRecord | None:
        blob = self._c.db.get_secret_meta(f"gkey:{gid.hex()}:{member}")
        return None if blob is None else SenderKeyRecord.deserialize(blob)

    def _save_key(self, gid: bytes, member: str, record: SenderKeyRecord) -> None:
        self._c.db.set_secret_meta(f"gkey:{gid.hex()}:{member}", record.serialize())

    def _by_name(self, name: str) -> GroupRecord:
        for gid in self._ids():
            rec = self._load(gid)
            if rec is not None and rec.current.name == name:
                return rec
        raise UnknownContact(f"no group named {name!r}")

    def _by_distribution(self, dist: bytes) -> GroupRecord | None:
        for gid in self._ids():
            if distribution_id(gid) == dist:
                return self._load(gid)
        return None

    # ------------------------------------------------------------------ queries
    def all(self) -> list[GroupInfo]:
        return [self._info(rec) for gid in self._ids() if (rec := self._load(gid)) is not None]

    def info(self, name: str) -> GroupInfo:
        return self._info(self._by_name(name))

    def _info(self, rec: GroupRecord) -> GroupInfo:
        state = rec.current
        members = []
        for name, identity in sorted(state.members.items()):
            contact = self._c.db.get_contact(name) if name != self._c.username else None
            same = contact is not None and contact.identity == identity
            members.append(MemberInfo(name, name in state.admins,
                                      name == self._c.username or (same and contact is not None
                                                                   and contact.verified),
                                      contact is not None and (not same or contact.pending_identity is not None)))
        return GroupInfo(state.name, state.group_id.hex(), state.version, rec.status, members)

    def history(self, name: str, limit: int = 50) -> list[Any]:
        return self._c.db.history(history_key(self._by_name(name).log[0].group_id), limit)

    # ------------------------------------------------------------------ membership (admins)
    async def create(self, name: str, members: Iterable[str]) -> GroupInfo:
        c = self._c
        names = _names(members, c.username)
        if not names or not 0 < len(name) <= 64:
            raise ClientError("a group needs a name (at most 64 characters) and at least one other member")
        if any(g.name == name for g in self.all()):
            raise ClientError(f"you already have a group named {name!r}")
        identities = [[c.username, c.identity.public.encode()]]
        for m in names:
            identities.append([m, await self._member_identity(m)])
        gid = os.urandom(32)
        change = sign_change(c.identity, c.username, None, gid, "create", [name, identities, [c.username]])
        async with c._state_lock:
            rec = GroupRecord([change], state=apply_change(None, change))
            with c.db.transaction():
                self._save(rec)
                self._event(rec, f"you created the group {name} with {', '.join(names)}")
            for m in names:
                await self._queue_pairwise(m, encode_control("welcome", gid, [change.encode()]))
        await self.flush()
        c._emit("group_created", group=name, members=len(names) + 1)
        return self.info(name)

    async def add(self, name: str, members: Iterable[str]) -> GroupInfo:
        c = self._c
        rec = self._by_name(name)
        names = _names(members, c.username)
        new = [[m, await self._member_identity(m)] for m in names]
        return await self._change(rec, "add", new, welcome=names)

    async def remove(self, name: str, members: Iterable[str]) -> GroupInfo:
        return await self._change(self._by_name(name), "remove", _names(members, self._c.username))

    async def leave(self, name: str) -> GroupInfo:
        return await self._change(self._by_name(name), "leave", [])

    async def _change(self, rec: GroupRecord, op: str, args: Any,
                      welcome: list[str] | None = None) -> GroupInfo:
        c = self._c
        async with c._state_lock:
            rec = self._load(rec.log[0].group_id) or rec
            old = rec.current
            if rec.status != "member":
                raise ClientError(f"you are no longer a member of {old.name}")
            change = sign_change(c.identity, c.username, old, old.group_id, op, args)
            new = apply_change(old, change)   # raises (nothing stored) if we may not do this
            rec.log.append(change)
            rec.state = new
            with c.db.transaction():
                self._after_state(rec, old, new, _own_text(op, args))
                self._save(rec)
            for m in sorted(old.members):
                if m != c.username:
                    await self._queue_pairwise(m, encode_control("change", old.group_id, change.encode()))
            log = [x.encode() for x in rec.log]
            for m in welcome or []:
                await self._queue_pairwise(m, encode_control("welcome", old.group_id, log))
        await self.flush()
        c._emit("group_changed", group=old.name, op=op, version=new.version)
        return self._info(rec)

    async def _member_identity(self, name: str) -> bytes:
        """The key a new member is written into the state with: the pinned one (fetching and pinning
        a bundle for a new contact); a pending key change must be resolved first."""
        contact = await self._c.ensure_contact(name)
        if contact.pending_identity is not None:
            raise ClientError(f"{name}'s identity key changed; verify {name} before adding them to a group")
        return contact.identity

    # ------------------------------------------------------------------ sending
    async def send(self, name: str, text: str) -> bytes:
        c = self._c
        async with c._state_lock:
            rec = self._by_name(name)
            state = rec.current
            gid = state.group_id
            if rec.status != "member":
                raise ClientError(f"you are no longer a member of {name}")
            own = self._key(gid, c.username) or create_sender_key(distribution_id(gid))
            if rec.rotate:   # lazy rotation (docs/groups.md section 4)
                own = rotate_sender_key(own)
                rec.rotate, rec.distributed, rec.snapshots = False, {}, {}
                c._emit("group_rotated", group=name)
            others = sorted(m for m in state.members if m != c.username)
            need = [m for m in others if m not in rec.distributed]
            if need:
                dist = distribution_message(own)
                with c.db.transaction():
                    self._save_key(gid, c.username, own)   # the key is durable before it is handed out
                for m in need:
                    if await self._queue_pairwise(m, encode_control("skd", gid, dist.encode())):
                        rec.distributed[m] = dist.iteration
                        rec.snapshots[dist.iteration] = dist.chain_key
                rec.snapshots = {i: k for i, k in rec.snapshots.items() if i in rec.distributed.values()}
            sent_at = now_ms()
            plaintext = _pad(encode_text(text, sent_at, c.username, gid, state.version))
            body, own = group_encrypt(own, plaintext, _ad(gid, c.username))
            msg_id = os.urandom(16)
            with c.db.transaction():
                self._save_key(gid, c.username, own)
                self._save(rec)
                c.db.add_message(history_key(gid), "out", msg_id, text, sent_at=sent_at, received_at=None,
                                 status="queued", extra={"group": name, "from": c.username})
                outbox = self._outbox()
                outbox.append([msg_id, body, others, history_key(gid)])
                c.db.set_secret_meta("gout", pack(outbox))
        c._emit("group_encrypt", group=name, msg_id=msg_id.hex(), body_bytes=len(body),
                recipients=len(others))
        await self.flush()
        return msg_id

    def _outbox(self) -> list[list[Any]]:
        blob = self._c.db.get_secret_meta("gout")
        return [] if blob is None else list(unpack(blob, what="group outbox"))

    async def flush(self) -> int:
        """The pairwise outbox first (sender keys before the messages that need them), then each
        group message once: ``send_many`` where announced; only refused recipients are retried."""
        c = self._c
        if not c.connected:
            return 0
        await c.flush_outbox()
        delivered = 0
        async with self._flush_lock:
            for msg_id, body, recipients, _hist in self._outbox():
                conn = c._require_conn()
                if "send_many" in conn.caps:
                    reply = await conn.request({"t": "send_many", "id": msg_id, "kind": "grp", "body": body,
                                                "to": recipients})
                    status = reply.get("status")
                    if not isinstance(status, list) or len(status) != len(recipients):
                        raise ClientError("the relay answered send_many with a wrong status list")
                    left = [r for r, s in zip(recipients, status, strict=True) if s not in FINAL_STATUSES]
                    refused = {s for s in status if s not in ("accepted", "duplicate")}
                else:
                    left, refused = [], set()
                    for r in recipients:
                        try:
                            await conn.request({"t": "send", "to": r, "id": msg_id, "kind": "grp",
                                                "body": body})
                        except ServerError as exc:
                            refused.add(exc.code)
                            if exc.code not in PERMANENT_ERRORS:
                                left.append(r)
                delivered += len(recipients) - len(left)
                with c.db.transaction():
                    outbox = self._outbox()
                    for item in outbox:
                        if item[0] == msg_id:
                            item[2] = left
                    c.db.set_secret_meta("gout", pack([i for i in outbox if i[2]]))
                    if not left:
                        c.db.set_status_by_id(msg_id, "out", "sent")
                c._emit("group_accepted", msg_id=msg_id.hex(), recipients=len(recipients), retry=len(left),
                        refused=sorted(refused))
        return delivered

    async def _queue_pairwise(self, name: str, content: bytes) -> bool:
        """Queue a group payload to ``name`` inside an ordinary 1:1 message (caller holds the state
        lock). False if it cannot go now (an unresolved key change, a block, a refused fetch)."""
        c = self._c
        payload = _pad(pack([PLAINTEXT_VERSION, "group", content, now_ms(), c.username, name]))
        try:
            session, with_psk = await c._sending_session(name, group=True)   # the group fetch budget
        except ClientError as exc:
            c._emit("group_pairwise_skipped", to=name, reason=str(exc))
            return False
        envelope, session = encrypt(session, payload)
        with c.db.transaction():
            c.db.save_session(session.session_id, name, session.peer.encode(), session.serialize(),
                              now_ms(), with_psk=with_psk)
            c.db.add_outbox(os.urandom(16), name, "msg", envelope, now_ms())
        return True

    def _pin_member(self, name: str, identity: bytes) -> None:
        """Pin a member we have no contact for with the key the admin signed (inside a transaction);
        a contact pinned with another key gets that key as pending (an identity change)."""
        if name == self._c.username:
            return
        contact = self._c.db.get_contact(name)
        if contact is None:
            self._c.db.add_contact(name, identity, now_ms())
        elif contact.identity != identity and contact.pending_identity != identity:
            self._c.db.set_pending_identity(name, identity)

    # ------------------------------------------------------------------ receiving (inside the batch)
    def on_control(self, sender: str, peer: bytes, content: Any) -> list[IncomingMessage]:
        """A pairwise group payload from ``sender`` whose session is with identity ``peer``."""
        try:
            ctl = decode_control(content)
            handler = _CONTROL[ctl.type]
            return handler(self, sender, peer, ctl.group_id, ctl.value)
        except (GroupChangeRefused, BadGroupPayload, CryptoError) as exc:
            self._c._emit("group_refused", sender=sender, reason=str(exc))
            return [self._notice(sender, f"refused a group update from {sender}: {exc}")]

    def _member_check(self, rec: GroupRecord, sender: str, peer: bytes) -> None:
        identity = rec.current.members.get(sender)
        if identity is None:
            raise GroupChangeRefused(f"{sender} is not a member of {rec.current.name}")
        if identity != peer:
            raise GroupChangeRefused(f"{sender} wrote under another identity key than the group names")

    def _on_change(self, sender: str, peer: bytes, gid: bytes, value: Any) -> list[IncomingMessage]:
        rec = self._load(gid)
        if rec is None:
            return []   # not ours (yet): a welcome brings the whole log
        if not isinstance(value, bytes):
            raise BadGroupPayload("malformed group change")
        change = Change.decode(value)
        old = rec.current
        if old.members.get(sender) != peer and old.members.get(change.signer) != peer:
            raise GroupChangeRefused(f"{sender} is not a member of {old.name} under this key")
        if change.version <= old.version and rec.log[change.version - 1].digest() == change.digest():
            return []   # already applied (a resend)
        if change.version > old.version + 1:
            self._ask_state(rec, sender)
            return []
        try:
            if change.version == old.version + 1:
                new = apply_change(old, change)
                rec.log.append(change)
            else:
                merged = merge_logs(rec.log, [*rec.log[: change.version - 1], change])
                if [c.digest() for c in merged] == [c.digest() for c in rec.log]:
                    return []   # the change lost to the one we hold (docs/groups.md)
                dropped = rec.log[len([1 for a, b in zip(merged, rec.log, strict=False)
                                       if a.digest() == b.digest()]):]
                rec.log = merged
                new = replay(merged)
                self._reissue(rec, dropped)
        except ChangeDoesNotFollow:
            self._ask_state(rec, sender)
            return []
        rec.state = new
        shown = self._after_state(rec, old, new, _describe(change, old))
        self._save(rec)
        return shown

    def _on_log(self, sender: str, peer: bytes, gid: bytes, value: Any) -> list[IncomingMessage]:
        log = decode_log(value)
        if any(c.group_id != gid for c in log):
            raise GroupChangeRefused("a group log mixes groups")
        rec = self._load(gid)
        if rec is None:
            state = replay(log)
            if self._c.username not in state.members:
                raise GroupChangeRefused("a group log that does not name you as a member")
            rec = GroupRecord(log, state=state)
            self._member_check(rec, sender, peer)
            for m, identity in state.members.items():
                self._pin_member(m, identity)
            self._save(rec)
            admins = ", ".join(sorted(state.admins))
            return [self._event(rec, f"{sender} added you to the group {state.name} (admins: {admins}; "
                                     f"members: {', '.join(sorted(state.members))})")]
        old = rec.current
        merged = merge_logs(rec.log, log)
        if [c.digest() for c in merged] == [c.digest() for c in rec.log]:
            return []
        new = replay(merged)
        if old.members.get(sender) != peer and new.members.get(sender) != peer:
            raise GroupChangeRefused(f"{sender} is not a member of {old.name} under this key")
        common = len([1 for a, b in zip(merged, rec.log, strict=False) if a.digest() == b.digest()])
        self._reissue(rec, rec.log[common:])
        rec.log, rec.state = merged, new
        shown = self._after_state(rec, old, new, f"the group {new.name} caught up to version {new.version}")
        self._save(rec)
        return shown

    def _on_state_req(self, sender: str, peer: bytes, gid: bytes, value: Any) -> list[IncomingMessage]:
        rec = self._load(gid)
        if rec is None:
            return []
        self._member_check(rec, sender, peer)
        if rec.allow("state:" + sender, STATE_ANSWERS_PER_MEMBER_PER_HOUR):
            self._followups.append((sender, encode_control("state", gid, [c.encode() for c in rec.log])))
        self._save(rec)
        return []

    def _on_skd(self, sender: str, peer: bytes, gid: bytes, value: Any) -> list[IncomingMessage]:
        rec = self._load(gid)
        if rec is None or not isinstance(value, bytes):
            return []
        self._member_check(rec, sender, peer)
        dist = SenderKeyDistribution.decode(value)
        if dist.distribution_id != distribution_id(gid):
            raise GroupChangeRefused("a sender key for another group")
        self._save_key(gid, sender, process_distribution(self._key(gid, sender), dist))
        self._c._emit("group_sender_key", group=rec.current.name, sender=sender, chain=dist.chain_id)
        shown: list[IncomingMessage] = []
        waiting = [p for p in rec.pending if p[0] == sender]
        if waiting:
            rec.pending = [p for p in rec.pending if p[0] != sender]
            self._save(rec)
            for p in waiting:
                shown.extend(self.on_group_message(p[0], p[1], p[2], p[3], retry=True))
        return shown

    def _on_resend_req(self, sender: str, peer: bytes, gid: bytes, value: Any) -> list[IncomingMessage]:
        rec = self._load(gid)
        own = None if rec is None else self._key(gid, self._c.username)
        if rec is None or own is None or rec.status != "member":
            return []
        self._member_check(rec, sender, peer)
        if not rec.allow("resend:" + sender, RESENDS_PER_MEMBER_PER_HOUR):
            self._save(rec)
            return []
        current = distribution_message(own)
        first = rec.distributed.get(sender)
        key = rec.snapshots.get(first) if first is not None else None
        dist = current if key is None or first is None else SenderKeyDistribution(
            current.distribution_id, current.chain_id, first, key, current.signing_public)
        if first is None:
            rec.distributed[sender] = current.iteration
            rec.snapshots[current.iteration] = current.chain_key
        self._save(rec)
        self._followups.append((sender, encode_control("skd", gid, dist.encode())))
        return []

    def receive_grp(self, sender: str, msg_id: bytes, body: bytes, ts: Any) -> list[IncomingMessage]:
        """Inbox entry point for a ``grp`` message: its own savepoint; a failure is a notice."""
        try:
            with self._c.db.savepoint():
                return self.on_group_message(sender, msg_id, body, ts)
        except (CryptoError, ClientError) as exc:   # one bad message must never stop the inbox
            return [self._notice(sender, f"could not process a group message from {sender}: {exc}")]

    def on_group_message(self, sender: str, msg_id: bytes, body: bytes, ts: Any, *,
                         retry: bool = False) -> list[IncomingMessage]:
        """A ``grp`` message from the relay (inside the batch transaction)."""
        c = self._c
        try:
            message = GroupMessage.decode(body)
        except CryptoError as exc:
            return [self._notice(sender, f"a malformed group message from {sender}: {exc}")]
        rec = self._by_distribution(message.distribution_id)
        if rec is None:
            return [self._notice(sender, f"a group message from {sender} for a group you are not in")]
        state = rec.current
        gid = state.group_id
        hist = history_key(gid)
        hist_id = hashlib.sha256(sender.encode() + b"\x00" + msg_id).digest()[:16]
        if c.db.has_message(hist, "in", hist_id):
            return []
        if sender not in state.members or rec.status != "member":
            return [self._notice(sender, f"refused a message in {state.name} from {sender}, who is not a "
                                         "member" if rec.status == "member" else
                                 f"a message in {state.name} arrived after you left or were removed")]
        record = self._key(gid, sender)
        try:
            if record is None:
                raise UnknownSenderKey("no sender key yet")
            known = record.state_for(message.chain_id)
            plaintext, record = group_decrypt(record, body, _ad(gid, sender))
        except UnknownSenderKey:
            return self._missing_key(rec, sender, msg_id, body, ts, message.chain_id, retry)
        except DuplicateMessage:
            return [self._notice(sender, f"a group message from {sender} in {state.name} was delivered "
                                         "twice (a replay); shown once")]
        except CryptoError as exc:
            return [self._notice(sender, f"refused a message in {state.name} from {sender}: {exc}")]
        try:
            text, sent_at, _version = decode_text(_unpad(plaintext), sender=sender, group_id=gid)
        except ClientError as exc:
            return [self._notice(sender, f"refused a message in {state.name} from {sender}: {exc}")]
        warning = None
        if known is not None and message.iteration < known.iteration:
            warning = "arrived out of order (the relay reordered or delayed it)"
        self._save_key(gid, sender, record)
        extra: dict[str, Any] = {"group": state.name, "from": sender}
        if warning:
            extra["warning"] = warning
        row = c.db.add_message(hist, "in", hist_id, text, sent_at=sent_at, received_at=now_ms(),
                               status="new", extra=extra)
        c._emit("group_decrypt", group=state.name, sender=sender, msg_id=msg_id.hex(), server_ts=ts)
        if row is None:
            return []
        return [IncomingMessage(hist_id.hex(), sender, text, sent_at, now_ms(), warning, row,
                                group=state.name)]

    def _missing_key(self, rec: GroupRecord, sender: str, msg_id: bytes, body: bytes, ts: Any,
                     chain_id: int, retry: bool) -> list[IncomingMessage]:
        if retry:
            return [self._notice(sender, f"a message in {rec.current.name} from {sender} still cannot be "
                                         "decrypted (its sender key is older than what you were given)")]
        if len(rec.pending) < MAX_PENDING_PER_GROUP:
            rec.pending.append([sender, msg_id, body, ts if isinstance(ts, int) else None])
        key = f"ask:{sender}:{chain_id}"
        if key not in rec.limits and rec.allow("ask:" + sender, RESEND_REQUESTS_PER_HOUR):
            rec.limits[key] = [now_ms()]
            self._followups.append((sender, encode_control("resend_req", rec.current.group_id, chain_id)))
        self._save(rec)
        self._c._emit("group_key_missing", group=rec.current.name, sender=sender)
        return []

    def _ask_state(self, rec: GroupRecord, sender: str) -> None:
        if rec.allow("state_req", STATE_REQUESTS_PER_HOUR):
            self._followups.append((sender, encode_control("state_req", rec.current.group_id,
                                                           rec.current.version)))
        self._save(rec)

    def _reissue(self, rec: GroupRecord, dropped: list[Change]) -> None:
        """Our own changes that lost to a concurrent one are issued again on the winning state."""
        for change in dropped:
            if change.signer == self._c.username:
                rec.limits.setdefault("reissue", []).append(now_ms())
                self._followups.append(("", change.encode()))

    def _after_state(self, rec: GroupRecord, old: GroupState, new: GroupState,
                     text: str) -> list[IncomingMessage]:
        me = self._c.username
        for m, identity in new.members.items():
            if m not in old.members:
                self._pin_member(m, identity)
        if rec.distributed.keys() - new.members.keys():
            rec.rotate = True   # someone holding our key is gone: fresh chain on our next send
        if me not in new.members and rec.status == "member":
            rec.status = "left" if text.startswith("you left") else "removed"
        return [self._event(rec, text)]

    def _event(self, rec: GroupRecord, text: str) -> IncomingMessage:
        state = rec.current
        event_id = hashlib.sha256(state.hash() + text.encode()).digest()[:16]
        row = self._c.db.add_message(history_key(state.group_id), "event", event_id, text, sent_at=None,
                                     received_at=now_ms(), status="new",
                                     extra={"group": state.name, "from": ""})
        return IncomingMessage(event_id.hex(), "", text, None, now_ms(), None, row, group=state.name)

    def _notice(self, sender: str, text: str) -> IncomingMessage:
        notice_id = os.urandom(16)
        row = self._c.db.add_message(sender, "event", notice_id, text, sent_at=None, received_at=now_ms(),
                                     status="new", extra={"warning": "group"})
        return IncomingMessage(notice_id.hex(), sender, text, None, now_ms(), "group", row)

    async def after_batch(self) -> None:
        """Send what the committed batch decided (state answers, sender keys, resend requests, our
        re-issued changes)."""
        followups, self._followups = self._followups, []
        if not followups or not self._c.connected:
            return
        reissue = [Change.decode(body) for to, body in followups if to == ""]
        async with self._c._state_lock:
            for to, body in followups:
                if to:
                    await self._queue_pairwise(to, body)
        for change in reissue:
            rec = self._load(change.group_id)
            if rec is not None and rec.status == "member":
                try:
                    await self._change(rec, change.op, change.args,
                                       welcome=[a[0] for a in change.args] if change.op == "add" else None)
                except ClientError as exc:
                    self._c._emit("group_reissue_failed", reason=str(exc))
        with _suppress_client_errors():
            await self.flush()


_CONTROL: Final = {
    "change": Groups._on_change, "welcome": Groups._on_log, "state": Groups._on_log,
    "state_req": Groups._on_state_req, "skd": Groups._on_skd, "resend_req": Groups._on_resend_req,
}


class _suppress_client_errors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        return kind is not None and issubclass(kind, ClientError)


def _names(members: Iterable[str], me: str) -> list[str]:
    out = []
    for m in members:
        name = normalize_username(m)
        if name == me:
            raise ClientError("you are always a member of your own groups; name the others")
        if name not in out:
            out.append(name)
    return out


def _own_text(op: str, args: Any) -> str:
    if op == "add":
        return f"you added {', '.join(a[0] for a in args)}"
    if op == "remove":
        return f"you removed {', '.join(args)}"
    return "you left the group"


def _describe(change: Change, old: GroupState) -> str:
    if change.op == "add":
        return f"{change.signer} added {', '.join(a[0] for a in change.args)} to {old.name}"
    if change.op == "remove":
        return f"{change.signer} removed {', '.join(change.args)} from {old.name}"
    if change.op == "leave":
        return f"{change.signer} left {old.name}"
    return f"{change.signer} changed {old.name}"


def _ad(group_id: bytes, sender: str) -> bytes:
    return pack([group_id, sender])


def _pad(data: bytes, block: int = 160) -> bytes:
    return data + b"\x80" + bytes(-(len(data) + 1) % block)


def _unpad(data: bytes) -> bytes:
    end = len(data.rstrip(b"\x00"))
    if end == 0 or data[end - 1] != 0x80:
        raise ClientError("group message padding is malformed")
    return data[: end - 1]
