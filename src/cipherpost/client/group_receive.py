"""Receiving for groups (docs/groups.md): pairwise group payloads and ``grp`` messages.

Called by ``inbox.py`` inside the deliver batch's transaction. Bad input never raises out of here:
it becomes a notice row (a refused change, a message from a non-member, a replay). What needs the
network (state answers, sender keys, resend requests, our changes issued again after losing a
concurrent change) is appended to ``followups`` and sent by ``Groups.after_batch`` after the commit.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Final

from ..crypto.encoding import pack
from ..crypto.errors import CryptoError, DuplicateMessage, UnknownSenderKey
from ..crypto.sender_keys import (
    GroupMessage,
    SenderKeyDistribution,
    distribution_message,
    group_decrypt,
    process_distribution,
)
from .errors import ClientError
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
)
from .group_store import GroupRecord, GroupStore, history_key, now_ms
from .group_wire import BadGroupPayload, decode_control, decode_text, encode_control
from .inbox import IncomingMessage

if TYPE_CHECKING:
    from .client import Client

MAX_PENDING_PER_GROUP: Final = 200
RESEND_REQUESTS_PER_HOUR: Final = 5         # resend_req per (group, sender)
RESENDS_PER_MEMBER_PER_HOUR: Final = 5      # skd answers per (group, requester)
STATE_REQUESTS_PER_HOUR: Final = 10         # state_req per group
STATE_ANSWERS_PER_MEMBER_PER_HOUR: Final = 5


class GroupReceiver:
    def __init__(self, client: Client, store: GroupStore, followups: list[tuple[str, bytes]]) -> None:
        self._c = client
        self._s = store
        self.followups = followups

    def on_control(self, sender: str, peer: bytes, content: Any) -> list[IncomingMessage]:
        """A pairwise group payload from ``sender`` whose session is with identity ``peer``."""
        try:
            ctl = decode_control(content)
            handler = _CONTROL[ctl.type]
            return handler(self, sender, peer, ctl.group_id, ctl.value)
        except (GroupChangeRefused, BadGroupPayload, CryptoError) as exc:
            self._c._emit("group_refused", sender=sender, reason=str(exc))
            return [self._s.notice(sender, f"refused a group update from {sender}: {exc}")]

    def _member_check(self, rec: GroupRecord, sender: str, peer: bytes) -> None:
        identity = rec.current.members.get(sender)
        if identity is None:
            raise GroupChangeRefused(f"{sender} is not a member of {rec.current.name}")
        if identity != peer:
            raise GroupChangeRefused(f"{sender} wrote under another identity key than the group names")

    def _on_change(self, sender: str, peer: bytes, gid: bytes, value: Any) -> list[IncomingMessage]:
        rec = self._s.load(gid)
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
                self._tell_removed(rec, old, new, sender)
        except ChangeDoesNotFollow:
            self._ask_state(rec, sender)
            return []
        rec.state = new
        shown = self._s.after_state(rec, old, new, _describe(change, old))
        self._s.save(rec)
        return shown

    def _on_log(self, sender: str, peer: bytes, gid: bytes, value: Any) -> list[IncomingMessage]:
        log = decode_log(value)
        if any(c.group_id != gid for c in log):
            raise GroupChangeRefused("a group log mixes groups")
        rec = self._s.load(gid)
        if rec is None:
            state = replay(log)
            if self._c.username not in state.members:
                raise GroupChangeRefused("a group log that does not name you as a member")
            rec = GroupRecord(log, state=state)
            self._member_check(rec, sender, peer)
            for m, identity in state.members.items():
                self._s.pin_member(m, identity)
            self._s.save(rec)
            admins = ", ".join(sorted(state.admins))
            return [self._s.event(rec, f"{sender} added you to the group {state.name} (admins: {admins}; "
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
        self._tell_removed(rec, old, new, sender)
        shown = self._s.after_state(rec, old, new, f"the group {new.name} caught up to version {new.version}")
        self._s.save(rec)
        return shown

    def _on_state_req(self, sender: str, peer: bytes, gid: bytes, value: Any) -> list[IncomingMessage]:
        rec = self._s.load(gid)
        if rec is None:
            return []
        self._member_check(rec, sender, peer)
        if rec.allow("state:" + sender, STATE_ANSWERS_PER_MEMBER_PER_HOUR):
            self.followups.append((sender, encode_control("state", gid, [c.encode() for c in rec.log])))
        self._s.save(rec)
        return []

    def _on_skd(self, sender: str, peer: bytes, gid: bytes, value: Any) -> list[IncomingMessage]:
        rec = self._s.load(gid)
        if rec is None or not isinstance(value, bytes):
            return []
        self._member_check(rec, sender, peer)
        dist = SenderKeyDistribution.decode(value)
        if dist.distribution_id != distribution_id(gid):
            raise GroupChangeRefused("a sender key for another group")
        self._s.save_key(gid, sender, process_distribution(self._s.key(gid, sender), dist))
        self._c._emit("group_sender_key", group=rec.current.name, sender=sender, chain=dist.chain_id)
        shown: list[IncomingMessage] = []
        waiting = [p for p in rec.pending if p[0] == sender]
        if waiting:
            rec.pending = [p for p in rec.pending if p[0] != sender]
            self._s.save(rec)
            for p in waiting:
                shown.extend(self.on_group_message(p[0], p[1], p[2], p[3], retry=True))
        return shown

    def _on_resend_req(self, sender: str, peer: bytes, gid: bytes, value: Any) -> list[IncomingMessage]:
        rec = self._s.load(gid)
        own = None if rec is None else self._s.key(gid, self._c.username)
        if rec is None or own is None or rec.status != "member":
            return []
        self._member_check(rec, sender, peer)
        if not rec.allow("resend:" + sender, RESENDS_PER_MEMBER_PER_HOUR):
            self._s.save(rec)
            return []
        current = distribution_message(own)
        first = rec.distributed.get(sender)
        key = rec.snapshots.get(first) if first is not None else None
        dist = current if key is None or first is None else SenderKeyDistribution(
            current.distribution_id, current.chain_id, first, key, current.signing_public)
        if first is None:
            rec.distributed[sender] = current.iteration
            rec.snapshots[current.iteration] = current.chain_key
        self._s.save(rec)
        self.followups.append((sender, encode_control("skd", gid, dist.encode())))
        return []

    def receive_grp(self, sender: str, msg_id: bytes, body: bytes, ts: Any) -> list[IncomingMessage]:
        """Inbox entry point for a ``grp`` message: its own savepoint; a failure is a notice."""
        try:
            with self._c.db.savepoint():
                return self.on_group_message(sender, msg_id, body, ts)
        except (CryptoError, ClientError) as exc:   # one bad message must never stop the inbox
            return [self._s.notice(sender, f"could not process a group message from {sender}: {exc}")]

    def on_group_message(self, sender: str, msg_id: bytes, body: bytes, ts: Any, *,
                         retry: bool = False) -> list[IncomingMessage]:
        """A ``grp`` message from the relay (inside the batch transaction)."""
        c = self._c
        try:
            message = GroupMessage.decode(body)
        except CryptoError as exc:
            return [self._s.notice(sender, f"a malformed group message from {sender}: {exc}")]
        rec = self._s.by_distribution(message.distribution_id)
        if rec is None:
            return [self._s.notice(sender, f"a group message from {sender} for a group you are not in")]
        state = rec.current
        gid = state.group_id
        hist = history_key(gid)
        hist_id = hashlib.sha256(sender.encode() + b"\x00" + msg_id).digest()[:16]
        if c.db.has_message(hist, "in", hist_id):
            return []
        if sender not in state.members or rec.status != "member":
            return [self._s.notice(sender, f"refused a message in {state.name} from {sender}, who is not a "
                                         "member" if rec.status == "member" else
                                 f"a message in {state.name} arrived after you left or were removed")]
        record = self._s.key(gid, sender)
        try:
            if record is None:
                raise UnknownSenderKey("no sender key yet")
            known = record.state_for(message.chain_id)
            plaintext, record = group_decrypt(record, body, _ad(gid, sender))
        except UnknownSenderKey:
            return self._missing_key(rec, sender, msg_id, body, ts, message.chain_id, retry)
        except DuplicateMessage:
            return [self._s.notice(sender, f"a group message from {sender} in {state.name} was delivered "
                                         "twice (a replay); shown once")]
        except CryptoError as exc:
            return [self._s.notice(sender, f"refused a message in {state.name} from {sender}: {exc}")]
        try:
            text, sent_at, version = decode_text(_unpad(plaintext), sender=sender, group_id=gid)
        except ClientError as exc:
            return [self._s.notice(sender, f"refused a message in {state.name} from {sender}: {exc}")]
        if version > state.version:
            self._ask_state(rec, sender)   # the sender knows a newer state: we missed a change
        warning = None
        if known is not None and message.iteration < known.iteration:
            warning = "arrived out of order (the relay reordered or delayed it)"
        self._s.save_key(gid, sender, record)
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
        key = f"ask:{sender}:{chain_id}"
        if retry and key in rec.limits:
            # Asked for this very chain already and what came does not open it: give up on it.
            return [self._s.notice(sender, f"a message in {rec.current.name} from {sender} still cannot be "
                                         "decrypted (its sender key is older than what you were given)")]
        # First time, or a key for another chain came (the sender rotated meanwhile): ask for this one.
        if len(rec.pending) < MAX_PENDING_PER_GROUP:
            rec.pending.append([sender, msg_id, body, ts if isinstance(ts, int) else None])
        if key not in rec.limits and rec.allow("ask:" + sender, RESEND_REQUESTS_PER_HOUR):
            rec.limits[key] = [now_ms()]
            self.followups.append((sender, encode_control("resend_req", rec.current.group_id, chain_id)))
        self._s.save(rec)
        self._c._emit("group_key_missing", group=rec.current.name, sender=sender)
        return []

    def _ask_state(self, rec: GroupRecord, sender: str) -> None:
        if rec.allow("state_req", STATE_REQUESTS_PER_HOUR):
            self.followups.append((sender, encode_control("state_req", rec.current.group_id,
                                                           rec.current.version)))
        self._s.save(rec)

    def _tell_removed(self, rec: GroupRecord, old: GroupState, new: GroupState, sender: str) -> None:
        """After switching branches: members the winning branch removed may never have been told
        (their admin could not reach them); the signed log tells them (they check every step)."""
        log = [c.encode() for c in rec.log]
        for name in sorted(old.members.keys() - new.members.keys() - {self._c.username, sender}):
            self.followups.append((name, encode_control("state", new.group_id, log)))

    def _reissue(self, rec: GroupRecord, dropped: list[Change]) -> None:
        """Our own changes that lost to a concurrent one are issued again on the winning state."""
        for change in dropped:
            if change.signer == self._c.username:
                rec.limits.setdefault("reissue", []).append(now_ms())
                self.followups.append(("", change.encode()))



_CONTROL: Final = {
    "change": GroupReceiver._on_change, "welcome": GroupReceiver._on_log, "state": GroupReceiver._on_log,
    "state_req": GroupReceiver._on_state_req, "skd": GroupReceiver._on_skd,
    "resend_req": GroupReceiver._on_resend_req,
}



def _ad(group_id: bytes, sender: str) -> bytes:
    """The associated data of a group message: the group and the sender (docs/groups.md section 3)."""
    return pack([group_id, sender])


def _unpad(data: bytes) -> bytes:
    end = len(data.rstrip(b"\x00"))
    if end == 0 or data[end - 1] != 0x80:
        raise ClientError("group message padding is malformed")
    return data[: end - 1]


def _describe(change: Change, old: GroupState) -> str:
    if change.op == "add":
        return f"{change.signer} added {', '.join(a[0] for a in change.args)} to {old.name}"
    if change.op == "remove":
        return f"{change.signer} removed {', '.join(change.args)} from {old.name}"
    if change.op == "leave":
        return f"{change.signer} left {old.name}"
    return f"{change.signer} changed {old.name}"
