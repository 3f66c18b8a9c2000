"""What a member keeps about its groups (docs/groups.md; docs/at-rest.md), in the encrypted profile
meta: ``groups`` the index, ``group:<id>`` one :class:`GroupRecord` per group (the signed log, flags,
who holds our sender key from which iteration, messages waiting for a key, bounded request
counters), ``gkey:<id>:<member>`` a ``SenderKeyRecord`` per member (ours included), ``gout`` the
group outbox. Also the rows a group change or refusal writes into the history.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from ..crypto.encoding import pack, unpack
from ..crypto.sender_keys import SenderKeyRecord
from .errors import ProfileError, UnknownContact
from .group_state import Change, GroupState, decode_log, distribution_id, replay
from .inbox import IncomingMessage

if TYPE_CHECKING:
    from .client import Client

HOUR_MS: Final = 3600 * 1000


def now_ms() -> int:
    return int(time.time() * 1000)


def history_key(group_id: bytes) -> str:
    """The history "contact" of a group: '#' never starts a username, so no 1:1 chat collides."""
    return "#" + group_id.hex()


@dataclass(repr=False)
class GroupRecord:
    """One group as this member holds it (stored encrypted; see the module docstring). It holds
    chain keys (``snapshots``) and waiting ciphertexts: ``repr`` hides them."""

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
        # The state the log leads to is stored too: the record is sealed and authenticated
        # (docs/at-rest.md), so loading it need not verify every signed change again per message.
        state = self.current
        return pack([1, [c.encode() for c in self.log], self.status, self.rotate,
                     list(self.distributed.items()), list(self.snapshots.items()), self.pending,
                     list(self.limits.items()),
                     [state.name, [[n, k] for n, k in state.members.items()], sorted(state.admins),
                      state.version]])

    @classmethod
    def decode(cls, data: bytes) -> GroupRecord:
        a = unpack(data, what="group record")
        log = decode_log(a[1])
        name, members, admins, version = a[8]
        state = GroupState(log[0].group_id, name, MappingProxyType({n: k for n, k in members}),
                           frozenset(admins), version)
        if version != log[-1].version:
            raise ProfileError("a group record's state does not match its log")
        return cls(log, a[2], a[3], dict(a[4]), dict(a[5]), a[6], dict(a[7]), state)

    def __repr__(self) -> str:
        return (f"GroupRecord(id={self.log[0].group_id.hex()[:8]}, version={len(self.log)}, "
                f"status={self.status}, keys=<hidden>)")

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


class GroupStore:
    """Storage and history rows of the groups of one client (callers hold its state lock and open
    the transaction where one is needed)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def ids(self) -> list[bytes]:
        blob = self._c.db.get_secret_meta("groups")
        return [] if blob is None else list(unpack(blob, what="group index"))

    def load(self, gid: bytes) -> GroupRecord | None:
        blob = self._c.db.get_secret_meta("group:" + gid.hex())
        return None if blob is None else GroupRecord.decode(blob)

    def save(self, rec: GroupRecord) -> None:
        gid = rec.log[0].group_id
        ids = self.ids()
        if gid not in ids:
            self._c.db.set_secret_meta("groups", pack([*ids, gid]))
        self._c.db.set_secret_meta("group:" + gid.hex(), rec.encode())

    def key(self, gid: bytes, member: str) -> SenderKeyRecord | None:
        blob = self._c.db.get_secret_meta(f"gkey:{gid.hex()}:{member}")
        return None if blob is None else SenderKeyRecord.deserialize(blob)

    def save_key(self, gid: bytes, member: str, record: SenderKeyRecord) -> None:
        self._c.db.set_secret_meta(f"gkey:{gid.hex()}:{member}", record.serialize())

    def by_name(self, name: str) -> GroupRecord:
        for gid in self.ids():
            rec = self.load(gid)
            if rec is not None and rec.current.name == name:
                return rec
        raise UnknownContact(f"no group named {name!r}")

    def by_distribution(self, dist: bytes) -> GroupRecord | None:
        for gid in self.ids():
            if distribution_id(gid) == dist:
                return self.load(gid)
        return None

    def outbox(self) -> list[list[Any]]:
        blob = self._c.db.get_secret_meta("gout")
        return [] if blob is None else list(unpack(blob, what="group outbox"))

    def info(self, rec: GroupRecord) -> GroupInfo:
        state = rec.current
        members = []
        for name, identity in sorted(state.members.items()):
            contact = self._c.db.get_contact(name) if name != self._c.username else None
            same = contact is not None and contact.identity == identity
            verified = name == self._c.username or (same and contact is not None and contact.verified)
            changed = contact is not None and (not same or contact.pending_identity is not None)
            members.append(MemberInfo(name, name in state.admins, verified, changed))
        return GroupInfo(state.name, state.group_id.hex(), state.version, rec.status, members)

    def pin_member(self, name: str, identity: bytes) -> None:
        """Pin a member we have no contact for with the key the admin signed (inside a transaction);
        a contact pinned with another key gets that key as pending (an identity change)."""
        if name == self._c.username:
            return
        contact = self._c.db.get_contact(name)
        if contact is None:
            self._c.db.add_contact(name, identity, now_ms())
            self._c.requests.settle(name, identity)   # what they wrote before is no request now
        elif contact.identity != identity and contact.pending_identity != identity:
            self._c.db.set_pending_identity(name, identity)

    def after_state(self, rec: GroupRecord, old: GroupState, new: GroupState,
                     text: str) -> list[IncomingMessage]:
        me = self._c.username
        for m, identity in new.members.items():
            if m not in old.members:
                self.pin_member(m, identity)
        if rec.distributed.keys() - new.members.keys():
            rec.rotate = True   # someone holding our key is gone: fresh chain on our next send
        if me not in new.members and rec.status == "member":
            rec.status = "left" if text.startswith("you left") else "removed"
        return [self.event(rec, text)]

    def event(self, rec: GroupRecord, text: str) -> IncomingMessage:
        state = rec.current
        event_id = hashlib.sha256(state.hash() + text.encode()).digest()[:16]
        row = self._c.db.add_message(history_key(state.group_id), "event", event_id, text, sent_at=None,
                                     received_at=now_ms(), status="new",
                                     extra={"group": state.name, "from": ""})
        return IncomingMessage(event_id.hex(), "", text, None, now_ms(), None, row, group=state.name)

    def notice(self, sender: str, text: str) -> IncomingMessage:
        notice_id = os.urandom(16)
        row = self._c.db.add_message(sender, "event", notice_id, text, sent_at=None, received_at=now_ms(),
                                     status="new", extra={"warning": "group"})
        return IncomingMessage(notice_id.hex(), sender, text, None, now_ms(), "group", row)


    def set_outbox(self, outbox: list[list[Any]]) -> None:
        self._c.db.set_secret_meta("gout", pack(outbox))
