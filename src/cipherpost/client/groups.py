"""Group chats: the orchestrator around ``group_state`` (membership) and ``crypto/sender_keys``.

docs/groups.md is the specification. The pieces, one job each: ``group_state.py`` (pure: state,
signed changes, the concurrent-change rule), ``group_wire.py`` (pure: payloads),
``group_store.py`` (what is kept, encrypted), ``group_receive.py`` (everything that arrives), and
this module (everything a member sends):
- create/add/remove/leave: sign a change (``group_state.sign_change``), apply it, store the log and
  queue it to the members over the pairwise sessions (``_queue_pairwise``: an ordinary 1:1 message
  whose plaintext kind is ``"group"``), the whole log (``welcome``) to new members.
- send: rotate our sender key if a member we gave it to is gone (lazy rotation), give the current
  key to members who lack it (pinned from the signed state first, so a substituted bundle is
  refused), encrypt once, store the advanced key, the history row and the group outbox entry in one
  transaction, then transmit: ``send_many`` where announced, and only refused recipients again.
- after_batch: what the receive side decided needs the network, sent once the batch committed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from ..crypto.encoding import pack
from ..crypto.sender_keys import (
    create_sender_key,
    distribution_message,
    group_encrypt,
    rotate_sender_key,
)
from ..crypto.session import encrypt
from ..protocol.frames import DEFAULT_MAX_BODY
from ..protocol.usernames import normalize_username
from .errors import ClientError, ServerError
from .group_receive import GroupReceiver, _ad
from .group_state import (
    Change,
    apply_change,
    distribution_id,
    sign_change,
)
from .group_store import GroupInfo, GroupRecord, GroupStore, history_key, now_ms
from .group_wire import encode_control, encode_text
from .inbox import IncomingMessage

if TYPE_CHECKING:
    from .client import Client

PLAINTEXT_VERSION: Final = 1
ENVELOPE_OVERHEAD: Final = 2048   # as client.py: initial message, header and tag, rounded up
MAX_PENDING_PER_GROUP: Final = 200
RESEND_REQUESTS_PER_HOUR: Final = 5         # resend_req per (group, sender)
RESENDS_PER_MEMBER_PER_HOUR: Final = 5      # skd answers per (group, requester)
STATE_REQUESTS_PER_HOUR: Final = 10         # state_req per group
STATE_ANSWERS_PER_MEMBER_PER_HOUR: Final = 5
FINAL_STATUSES: Final = frozenset({"accepted", "duplicate", "unknown_user", "suspended"})
PERMANENT_ERRORS: Final = frozenset({"unknown_user", "suspended", "bad_frame", "too_large"})
HOUR_MS: Final = 3600 * 1000


class Groups:
    """The groups of one :class:`Client` (which owns the state lock, the database and the link)."""

    def __init__(self, client: Client) -> None:
        self._c = client
        self._followups: list[tuple[str, bytes]] = []   # (member, pairwise group payload)
        self._flush_lock = asyncio.Lock()
        self.store = GroupStore(client)
        self.receiver = GroupReceiver(client, self.store, self._followups)

    def all(self) -> list[GroupInfo]:
        return [self.store.info(rec) for gid in self.store.ids() if (rec := self.store.load(gid)) is not None]

    def info(self, name: str) -> GroupInfo:
        return self.store.info(self.store.by_name(name))

    def history(self, name: str, limit: int = 50) -> list[Any]:
        return self._c.db.history(history_key(self.store.by_name(name).log[0].group_id), limit)

    async def create(self, name: str, members: Iterable[str], admins: Iterable[str] = ()) -> GroupInfo:
        c = self._c
        names = _names(members, c.username)
        co_admins = _names(admins, c.username)
        if not set(co_admins) <= set(names):
            raise ClientError("every admin must also be named as a member")
        if not names or not 0 < len(name) <= 64:
            raise ClientError("a group needs a name (at most 64 characters) and at least one other member")
        if any(g.name == name for g in self.all()):
            raise ClientError(f"you already have a group named {name!r}")
        identities = [[c.username, c.identity.public.encode()]]
        for m in names:
            identities.append([m, await self._member_identity(m)])
        gid = os.urandom(32)
        change = sign_change(c.identity, c.username, None, gid, "create",
                             [name, identities, [c.username, *co_admins]])
        self._check_fits([change])
        async with c._state_lock:
            rec = GroupRecord([change], state=apply_change(None, change))
            with c.db.transaction():
                self.store.save(rec)
                self.store.event(rec, f"you created the group {name} with {', '.join(names)}")
            for m in names:
                await self._queue_pairwise(m, encode_control("welcome", gid, [change.encode()]))
        await self.flush()
        c._emit("group_created", group=name, members=len(names) + 1)
        return self.info(name)

    async def add(self, name: str, members: Iterable[str]) -> GroupInfo:
        c = self._c
        rec = self.store.by_name(name)
        names = _names(members, c.username)
        new = [[m, await self._member_identity(m)] for m in names]
        return await self._change(rec, "add", new, welcome=names)

    async def remove(self, name: str, members: Iterable[str]) -> GroupInfo:
        return await self._change(self.store.by_name(name), "remove", _names(members, self._c.username))

    async def leave(self, name: str) -> GroupInfo:
        return await self._change(self.store.by_name(name), "leave", [])

    async def _change(self, rec: GroupRecord, op: str, args: Any,
                      welcome: list[str] | None = None) -> GroupInfo:
        c = self._c
        async with c._state_lock:
            rec = self.store.load(rec.log[0].group_id) or rec
            old = rec.current
            if rec.status != "member":
                raise ClientError(f"you are no longer a member of {old.name}")
            change = sign_change(c.identity, c.username, old, old.group_id, op, args)
            new = apply_change(old, change)   # raises (nothing stored) if we may not do this
            self._check_fits([*rec.log, change] if welcome else [change])
            rec.log.append(change)
            rec.state = new
            with c.db.transaction():
                self.store.after_state(rec, old, new, _own_text(op, args))
                self.store.save(rec)
            for m in sorted(old.members):
                if m != c.username:
                    await self._queue_pairwise(m, encode_control("change", old.group_id, change.encode()))
            log = [x.encode() for x in rec.log]
            for m in welcome or []:
                await self._queue_pairwise(m, encode_control("welcome", old.group_id, log))
        await self.flush()
        c._emit("group_changed", group=old.name, op=op, version=new.version)
        return self.store.info(rec)

    def _check_fits(self, log: list[Change]) -> None:
        """Refuse a change whose message (the whole log, for a welcome) would not fit in one message
        on this relay, before anything is stored: the log travels in one pairwise message."""
        conn = self._c._conn
        limit = (conn.limits.get("max_body") if conn else None) or DEFAULT_MAX_BODY
        size = sum(len(c.encode()) + 3 for c in log) + 64 + 160   # control frame, plaintext header, pad
        if size + ENVELOPE_OVERHEAD > limit:
            raise ClientError(f"this group change does not fit in one message on this relay ({size} bytes "
                              f"of signed group log; about {max(limit - ENVELOPE_OVERHEAD, 0)} fit): "
                              "nothing was changed")

    async def _member_identity(self, name: str) -> bytes:
        """The key a new member is written into the state with: the pinned one (fetching and pinning
        a bundle for a new contact); a pending key change must be resolved first."""
        contact = await self._c.ensure_contact(name)
        if contact.pending_identity is not None:
            raise ClientError(f"{name}'s identity key changed; verify {name} before adding them to a group")
        return contact.identity

    async def send(self, name: str, text: str) -> bytes:
        c = self._c
        async with c._state_lock:
            rec = self.store.by_name(name)
            state = rec.current
            gid = state.group_id
            if rec.status != "member":
                raise ClientError(f"you are no longer a member of {name}")
            own = self.store.key(gid, c.username) or create_sender_key(distribution_id(gid))
            if rec.rotate:   # lazy rotation (docs/groups.md section 4)
                own = rotate_sender_key(own)
                rec.rotate, rec.distributed, rec.snapshots = False, {}, {}
                c._emit("group_rotated", group=name)
            others = sorted(m for m in state.members if m != c.username)
            need = [m for m in others if m not in rec.distributed]
            if need:
                dist = distribution_message(own)
                with c.db.transaction():
                    self.store.save_key(gid, c.username, own)   # the key is durable before it is handed out
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
                self.store.save_key(gid, c.username, own)
                self.store.save(rec)
                c.db.add_message(history_key(gid), "out", msg_id, text, sent_at=sent_at, received_at=None,
                                 status="queued", extra={"group": name, "from": c.username})
                outbox = self.store.outbox()
                outbox.append([msg_id, body, others, history_key(gid)])
                c.db.set_secret_meta("gout", pack(outbox))
        c._emit("group_encrypt", group=name, msg_id=msg_id.hex(), body_bytes=len(body),
                recipients=len(others))
        await self.flush()
        return msg_id

    async def flush(self) -> int:
        """The pairwise outbox first (sender keys before the messages that need them), then each
        group message once: ``send_many`` where announced; only refused recipients are retried."""
        c = self._c
        if not c.connected:
            return 0
        await c.flush_outbox()
        delivered = 0
        async with self._flush_lock:
            for msg_id, body, recipients, _hist in self.store.outbox():
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
                    outbox = self.store.outbox()
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

    async def after_batch(self) -> None:
        """Send what the committed batch decided (state answers, sender keys, resend requests, our
        re-issued changes)."""
        followups = list(self._followups)
        self._followups.clear()
        if not followups or not self._c.connected:
            return
        reissue = [Change.decode(body) for to, body in followups if to == ""]
        async with self._c._state_lock:
            for to, body in followups:
                if to:
                    await self._queue_pairwise(to, body)
        for change in reissue:
            rec = self.store.load(change.group_id)
            if rec is not None and rec.status == "member":
                try:
                    await self._change(rec, change.op, change.args,
                                       welcome=[a[0] for a in change.args] if change.op == "add" else None)
                except ClientError as exc:
                    self._c._emit("group_reissue_failed", reason=str(exc))
        with _suppress_client_errors():
            await self.flush()

    # ------------------------------------------------------------------ receiving (group_receive.py)
    def on_control(self, sender: str, peer: bytes, content: Any) -> list[IncomingMessage]:
        return self.receiver.on_control(sender, peer, content)

    def receive_grp(self, sender: str, msg_id: bytes, body: bytes, ts: Any) -> list[IncomingMessage]:
        return self.receiver.receive_grp(sender, msg_id, body, ts)


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


def _pad(data: bytes, block: int = 160) -> bytes:
    return data + b"\x80" + bytes(-(len(data) + 1) % block)
