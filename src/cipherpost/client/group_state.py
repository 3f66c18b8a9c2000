"""Group state and admin-signed changes (docs/groups.md sections 1 and 1.x): pure, no I/O.

A :class:`GroupState` is only built by applying a signed :class:`Change` to the state it names
(``base_hash``). ``apply_change`` raises before returning, so a refused change leaves the caller's
state as it was. ``merge_logs`` is the rule for two admins changing the group at once: at each
version the change whose encoding has the lower SHA-256 wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from ..crypto.encoding import context, expect_array, expect_bytes, expect_int, pack, unpack
from ..crypto.errors import CryptoError
from ..crypto.identity import IdentityKeyPair, PublicIdentity
from .errors import ClientError

CHANGE_VERSION: Final = 1
GROUP_ID_LEN: Final = 32
MAX_MEMBERS: Final = 1000
MAX_LOG_CHANGES: Final = 1000
MAX_GROUP_NAME: Final = 64
MAX_CHANGE_BYTES: Final = 256 * 1024
ZERO_HASH: Final = b"\x00" * 32
CHANGE_LABEL: Final = "group-change"
OPS: Final = frozenset({"create", "add", "remove", "leave"})
_STATE_LABEL: Final = context("group-state")
_DISTRIBUTION_LABEL: Final = context("group-distribution-id")


class GroupChangeRefused(ClientError):
    """A change that is malformed, unsigned by a current admin, or does not follow the state."""


class ChangeDoesNotFollow(GroupChangeRefused):
    """The change names another base state or version: the member may have missed a change."""


def distribution_id(group_id: bytes) -> bytes:
    """The sender-key distribution id of a group (the same for every sender, as in Signal)."""
    return hashlib.sha256(_DISTRIBUTION_LABEL + group_id).digest()[:16]


@dataclass(frozen=True, slots=True)
class GroupState:
    group_id: bytes
    name: str
    members: Mapping[str, bytes]     # name -> encoded PublicIdentity
    admins: frozenset[str]
    version: int

    def hash(self) -> bytes:
        body = pack([self.group_id, self.name, sorted([n, k] for n, k in self.members.items()),
                     sorted(self.admins), self.version])
        return hashlib.sha256(_STATE_LABEL + body).digest()

    def __repr__(self) -> str:
        return (f"GroupState(id={self.group_id.hex()[:8]}, version={self.version}, "
                f"members={len(self.members)})")


@dataclass(frozen=True, slots=True)
class Change:
    group_id: bytes
    version: int
    base_hash: bytes
    op: str
    args: Any
    signer: str
    signature: bytes

    def signed_part(self) -> bytes:
        return pack([CHANGE_VERSION, self.group_id, self.version, self.base_hash, self.op, self.args,
                     self.signer])

    def encode(self) -> bytes:
        return pack([CHANGE_VERSION, self.group_id, self.version, self.base_hash, self.op, self.args,
                     self.signer, self.signature])

    def digest(self) -> bytes:
        """What the concurrent-change rule compares: SHA-256 of the whole encoding."""
        return hashlib.sha256(self.encode()).digest()

    @classmethod
    def decode(cls, data: bytes) -> Change:
        try:
            a = expect_array(unpack(data, what="group change", max_size=MAX_CHANGE_BYTES),
                             what="group change", version=CHANGE_VERSION, length=8)
            op = a[4]
            if op not in OPS or not isinstance(a[6], str):
                raise GroupChangeRefused("group change: unknown operation or signer")
            return cls(expect_bytes(a[1], what="group id", length=GROUP_ID_LEN),
                       expect_int(a[2], what="group version", lo=1, hi=1 << 31),
                       expect_bytes(a[3], what="base hash", length=32), op, a[5], a[6],
                       expect_bytes(a[7], what="change signature", length=64))
        except CryptoError as exc:
            raise GroupChangeRefused(f"malformed group change: {exc}") from None


def sign_change(identity: IdentityKeyPair, signer: str, base: GroupState | None, group_id: bytes,
                op: str, args: Any) -> Change:
    version = 1 if base is None else base.version + 1
    base_hash = ZERO_HASH if base is None else base.hash()
    unsigned = Change(group_id, version, base_hash, op, args, signer, b"")
    return Change(group_id, version, base_hash, op, args, signer,
                  identity.sign(CHANGE_LABEL, unsigned.signed_part()))


def _member_list(args: Any) -> dict[str, bytes]:
    if not isinstance(args, list) or not 0 < len(args) <= MAX_MEMBERS:
        raise GroupChangeRefused("group change: bad member list")
    out: dict[str, bytes] = {}
    for item in args:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], bytes) or item[0] in out):
            raise GroupChangeRefused("group change: bad member entry")
        try:
            PublicIdentity.decode(item[1])
        except CryptoError:
            raise GroupChangeRefused(f"group change: {item[0]}'s identity key is invalid") from None
        out[item[0]] = item[1]
    return out


def apply_change(state: GroupState | None, change: Change) -> GroupState:
    """The state after ``change``; raises (leaving ``state`` as it was) unless the change is signed
    by a current admin (or the leaving member), names ``state``'s hash and the next version."""
    if state is None:
        if change.op != "create" or change.version != 1 or change.base_hash != ZERO_HASH:
            raise ChangeDoesNotFollow("the first change of a group must create it")
        args = change.args
        if not isinstance(args, list) or len(args) != 3 or not isinstance(args[0], str) \
                or not 0 < len(args[0]) <= MAX_GROUP_NAME or not isinstance(args[2], list):
            raise GroupChangeRefused("group change: bad create arguments")
        members = _member_list(args[1])
        first = frozenset(a for a in args[2] if isinstance(a, str))
        if len(first) != len(args[2]) or not first or not first <= members.keys() \
                or change.signer not in first:
            raise GroupChangeRefused("group change: the creator must be an admin and the admins members")
        _verify(members, change)
        return GroupState(change.group_id, args[0], MappingProxyType(members), first, 1)
    if change.group_id != state.group_id:
        raise GroupChangeRefused("group change for another group")
    if change.version != state.version + 1 or change.base_hash != state.hash():
        raise ChangeDoesNotFollow(f"group change to version {change.version} does not follow "
                                  f"version {state.version}")
    if change.op == "leave":
        if change.signer not in state.members or change.args != []:
            raise GroupChangeRefused("group change: only a member can leave")
        removed = {change.signer}
    elif change.signer not in state.admins:
        raise GroupChangeRefused(f"group change signed by {change.signer!r}, who is not an admin")
    members = dict(state.members)
    admins = set(state.admins)
    if change.op == "add":
        new = _member_list(change.args)
        if new.keys() & members.keys() or len(members) + len(new) > MAX_MEMBERS:
            raise GroupChangeRefused("group change adds a member twice or too many members")
        _verify(state.members, change)
        members.update(new)
        return GroupState(state.group_id, state.name, MappingProxyType(members), frozenset(admins),
                          change.version)
    if change.op == "remove":
        if not isinstance(change.args, list) or not change.args \
                or not all(isinstance(n, str) and n in members for n in change.args):
            raise GroupChangeRefused("group change removes someone who is not a member")
        removed = set(change.args)
    elif change.op != "leave":
        raise GroupChangeRefused(f"group change: {change.op} is only for a new group")
    _verify(state.members, change)
    for name in removed:
        members.pop(name, None)
        admins.discard(name)
    if not admins and members:
        if change.op != "leave":
            raise GroupChangeRefused("group change would leave the group without an admin")
        admins.add(min(members))   # the last admin left: the first remaining name by order takes over
    return GroupState(state.group_id, state.name, MappingProxyType(members), frozenset(admins),
                      change.version)


def _verify(members: Mapping[str, bytes], change: Change) -> None:
    key = members.get(change.signer)
    if key is None:
        raise GroupChangeRefused(f"group change signed by {change.signer!r}, who is not a member")
    try:
        PublicIdentity.decode(key).verify(CHANGE_LABEL, change.signed_part(), change.signature)
    except CryptoError:
        raise GroupChangeRefused(f"group change: {change.signer}'s signature does not verify") from None


def replay(log: Sequence[Change]) -> GroupState:
    """The state a log of changes leads to; raises GroupChangeRefused on any bad step."""
    if not log or len(log) > MAX_LOG_CHANGES:
        raise GroupChangeRefused("empty or too long group log")
    state: GroupState | None = None
    for change in log:
        state = apply_change(state, change)
    assert state is not None
    return state


def merge_logs(mine: Sequence[Change], theirs: Sequence[Change]) -> list[Change]:
    """The concurrent-change rule (docs/groups.md): walk both logs; where they diverge the change
    with the lower digest wins, and the branch continues with that log. Every change of the result
    is checked; their changes that do not apply are dropped (the caller may re-issue its own)."""
    result: list[Change] = []
    state: GroupState | None = None
    i = 0
    source = mine
    while i < max(len(mine), len(theirs)):
        a = mine[i] if i < len(mine) and source is mine else None
        b = theirs[i] if i < len(theirs) else None
        if source is theirs:
            a = None
        candidates = [c for c in (a, b) if c is not None]
        if a is not None and b is not None and a.digest() == b.digest():
            candidates = [a]
        chosen: Change | None = None
        for c in sorted(candidates, key=lambda c: c.digest()):
            try:
                new = apply_change(state, c)
            except GroupChangeRefused:
                continue
            chosen, state = c, new
            break
        if chosen is None:
            break
        if b is not None and chosen is b and (a is None or a.digest() != b.digest()):
            source = theirs
        result.append(chosen)
        i += 1
    if not result:
        raise GroupChangeRefused("no valid group log")
    return result


def decode_log(items: Any) -> list[Change]:
    if not isinstance(items, list) or not 0 < len(items) <= MAX_LOG_CHANGES:
        raise GroupChangeRefused("bad group log")
    return [Change.decode(expect_bytes(x, what="group change", max_len=MAX_CHANGE_BYTES)) for x in items]
