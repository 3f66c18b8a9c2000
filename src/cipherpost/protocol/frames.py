"""Wire frames of protocol v1 (docs/wire.md): typed dataclasses, ``encode_frame`` and ``decode_frame``.

Every frame is one binary WebSocket message holding a msgpack map with ``v`` (version) and ``t``
(type). Client -> server frames: :class:`Register`, :class:`Auth`, :class:`UploadPrekeys`,
:class:`FetchBundle`, :class:`Send`, :class:`Ack`, :class:`Ping`, and behind capability flags
(``hello.caps``) :class:`Block`, :class:`SendMany`, :class:`SendBatch` (a ``send`` with
``envelopes``, cap ``batch``; reply :class:`AcceptedMany`), and the blob frames of cap ``blobs``
(:class:`BlobBegin`, :class:`BlobPut`, :class:`BlobHeld`, :class:`BlobCommit`, :class:`BlobGet`,
:class:`BlobRelease`; replies :class:`BlobState`, :class:`BlobData`), and (``accounts``, docs/accounts.md)
:class:`SetRecovery`, :class:`Recover`, :class:`DeleteAccount`. Server -> client frames: :class:`Hello`,
:class:`Ok`, :class:`Bundle`, :class:`Accepted`, :class:`Pong`, :class:`Deliver` (of
:class:`DeliveredMessage`), :class:`PrekeysLow`, :class:`Error`, :class:`Results`.

Decoding is strict: every field is checked for type and size, and any failure raises
:class:`~cipherpost.protocol.errors.ProtocolError` with a wire error code (``bad_frame``,
``too_large``, ``unsupported_version``, ``unknown_type``). Unknown extra keys are ignored so that a
later minor revision can add optional fields. Sans-I/O: bytes in, frames out, and back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import msgpack

from ..crypto.encoding import is_one_msgpack_value
from .errors import (
    BAD_FRAME,
    PROTOCOL_VERSION,
    TOO_LARGE,
    UNKNOWN_TYPE,
    UNSUPPORTED_VERSION,
    ProtocolError,
)

DEFAULT_MAX_FRAME: Final = 256 * 1024
DEFAULT_MAX_BODY: Final = 64 * 1024
MESSAGE_ID_LEN: Final = 16
NONCE_LEN: Final = 32
EPOCH_LEN: Final = 16  # hello.epoch (docs/contracts.md 1.5)
SIGNATURE_LEN: Final = 64
MAX_NAME_FIELD: Final = 128  # raw username field; the username rules are checked separately
MAX_IDENTITY_LEN: Final = 512
MAX_SIGNED_PREKEY_LEN: Final = 256
MAX_ONE_TIME_PREKEY_LEN: Final = 128
MAX_KEM_PREKEY_LEN: Final = 2048
MAX_ONE_TIME_PER_UPLOAD: Final = 1000
MAX_KEM_PER_UPLOAD: Final = 150
MAX_ACK_SEQS: Final = 4096
MAX_DELIVER_MESSAGES: Final = 4096
MAX_TEXT_FIELD: Final = 1024
MAX_SEND_MANY_RECIPIENTS: Final = 1000  # = store.base.MAX_FANOUT; the relay may allow fewer
# Cap ``batch``: envelopes in one ``send`` frame. 16 takes the per-frame costs (TLS record, decode,
# dispatch, reply, event-loop wake-up) down to about a sixteenth each while a frame stays one small
# unit of work: 16 ids in the reply, 16 tokens of the connection's bucket (burst 1000), and at most
# 16 x 64 KiB bodies, which the 256 KiB frame limit bounds anyway. More buys little: past 16 the
# relay's cost per message is the store's insert, which the group commit already batches.
MAX_BATCH_ENVELOPES: Final = 16
MAX_CAPS: Final = 64
MAX_CAP_LEN: Final = 32
MAX_RID: Final = (1 << 63) - 1
# "derr": a decryption-error report, sent in the clear to the sender of a message that could not
# be decrypted (docs/protocol.md "Decryption errors"); the relay routes it like any other kind.
MESSAGE_KINDS: Final = frozenset({"msg", "pake", "derr", "grp"})   # grp: a group message (docs/groups.md)
BLOB_ID_LEN: Final = 16
MAX_BLOB_CHUNK: Final = 128 * 1024  # bytes of one blob chunk frame; well under DEFAULT_MAX_FRAME
MAX_BLOB_SIZE: Final = 1 << 40      # what the decoder accepts; the relay's --max-blob-bytes is lower
RECOVERY_PUBLIC_LEN: Final = 32


# --- client -> server -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Register:
    rid: int
    username: str
    identity: bytes
    sig: bytes
    invite: str | None = None
    recovery_public: bytes | None = None  # the account's recovery key, set with it (``accounts``)
    t: ClassVar[str] = "register"


@dataclass(frozen=True, slots=True)
class Auth:
    rid: int
    username: str
    sig: bytes
    counter: int | None = None  # login counter, sent when the relay announces ``login_counter``
    t: ClassVar[str] = "auth"


@dataclass(frozen=True, slots=True)
class UploadPrekeys:
    rid: int
    signed_prekey: bytes | None = None
    one_time: list[bytes] = field(default_factory=list)
    kem_one_time: list[bytes] = field(default_factory=list)
    kem_last_resort: bytes | None = None
    replace: bool = False  # drop the account's one-time pools first (after a store epoch change)
    t: ClassVar[str] = "upload_prekeys"


@dataclass(frozen=True, slots=True)
class FetchBundle:
    rid: int
    username: str
    group: bool = False   # group setup or rotation: its own budget (docs/groups.md, docs/server.md)
    t: ClassVar[str] = "fetch_bundle"


@dataclass(frozen=True, slots=True)
class Send:
    rid: int
    to: str
    id: bytes
    kind: str
    body: bytes
    t: ClassVar[str] = "send"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message of a :class:`SendBatch` (the fields of a plain ``send``)."""

    to: str
    id: bytes
    kind: str
    body: bytes


@dataclass(frozen=True, slots=True)
class SendBatch:
    """Cap ``batch``: a ``send`` frame carrying ``envelopes`` (1..``MAX_BATCH_ENVELOPES``), each
    stored as if sent alone, in order; one :class:`AcceptedMany` reply."""

    rid: int
    envelopes: list[Envelope]
    t: ClassVar[str] = "send"


@dataclass(frozen=True, slots=True)
class Ack:
    seqs: list[int]
    t: ClassVar[str] = "ack"


@dataclass(frozen=True, slots=True)
class Ping:
    rid: int
    t: ClassVar[str] = "ping"


@dataclass(frozen=True, slots=True)
class Block:
    """Cap ``block``: the caller blocks (``on``) or unblocks ``username``; the relay then drops that
    sender's messages to the caller (the sender reads ``accepted``)."""

    rid: int
    username: str
    on: bool
    t: ClassVar[str] = "block"


@dataclass(frozen=True, slots=True)
class SendMany:
    """Cap ``send_many``: one body for up to ``MAX_SEND_MANY_RECIPIENTS`` distinct recipients."""

    rid: int
    id: bytes
    kind: str
    body: bytes
    to: list[str]
    t: ClassVar[str] = "send_many"


@dataclass(frozen=True, slots=True)
class BlobBegin:
    """Cap ``blobs`` (docs/attachments.md): create blob ``id`` of ``size`` bytes, or resume it."""

    rid: int
    id: bytes
    size: int
    chunk_size: int
    t: ClassVar[str] = "blob_begin"


@dataclass(frozen=True, slots=True)
class BlobPut:
    rid: int
    id: bytes
    index: int
    data: bytes
    t: ClassVar[str] = "blob_put"


@dataclass(frozen=True, slots=True)
class BlobHeld:
    rid: int
    id: bytes
    t: ClassVar[str] = "blob_held"


@dataclass(frozen=True, slots=True)
class BlobCommit:
    rid: int
    id: bytes
    to: list[str]
    t: ClassVar[str] = "blob_commit"


@dataclass(frozen=True, slots=True)
class BlobGet:
    rid: int
    id: bytes
    index: int
    t: ClassVar[str] = "blob_get"


@dataclass(frozen=True, slots=True)
class BlobRelease:
    rid: int
    id: bytes
    t: ClassVar[str] = "blob_release"


@dataclass(frozen=True, slots=True)
class SetRecovery:
    """Cap ``accounts``: set (or replace) the account's recovery public key; ``sig`` by the identity."""

    rid: int
    recovery_public: bytes
    sig: bytes
    t: ClassVar[str] = "set_recovery"


@dataclass(frozen=True, slots=True)
class Recover:
    """Cap ``accounts``: rebind ``username`` to ``identity``; ``recovery_sig`` by the recovery key,
    ``sig`` by the new identity, both over the connection's nonce and channel (docs/accounts.md)."""

    rid: int
    username: str
    identity: bytes
    recovery_sig: bytes
    sig: bytes
    t: ClassVar[str] = "recover"


@dataclass(frozen=True, slots=True)
class DeleteAccount:
    """Cap ``accounts``: delete the caller's account; ``sig`` by the identity key."""

    rid: int
    sig: bytes
    t: ClassVar[str] = "delete_account"


# --- server -> client -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Limits:
    max_frame: int
    max_body: int


@dataclass(frozen=True, slots=True)
class PrekeyCounts:
    one_time: int
    kem: int


@dataclass(frozen=True, slots=True)
class Hello:
    nonce: bytes
    server: str
    limits: Limits
    caps: list[str] = field(default_factory=list)  # capabilities (docs/contracts.md 5); absent: none
    epoch: bytes | None = None  # cap "epoch": the store epoch (contracts 1.5), EPOCH_LEN bytes
    t: ClassVar[str] = "hello"


@dataclass(frozen=True, slots=True)
class Ok:
    """Success reply: ``username`` on register/auth, ``prekeys`` on auth/upload_prekeys."""

    rid: int
    username: str | None = None
    prekeys: PrekeyCounts | None = None
    t: ClassVar[str] = "ok"


@dataclass(frozen=True, slots=True)
class Bundle:
    rid: int
    username: str
    identity: bytes
    signed_prekey: bytes
    kem_prekey: bytes
    one_time_prekey: bytes | None
    t: ClassVar[str] = "bundle"


@dataclass(frozen=True, slots=True)
class Accepted:
    rid: int
    id: bytes
    t: ClassVar[str] = "accepted"


@dataclass(frozen=True, slots=True)
class AcceptedMany:
    """Reply to a :class:`SendBatch`: the envelopes' ``ids`` and one status each, in frame order
    (``accepted``, ``duplicate``, ``unknown_user``, ``suspended``, ``mailbox_full``, ``sender_cap``,
    ``quota_exceeded``, ``internal``); all those accepted are durable."""

    rid: int
    ids: list[bytes]
    status: list[str]
    t: ClassVar[str] = "accepted_many"


@dataclass(frozen=True, slots=True)
class Pong:
    rid: int
    t: ClassVar[str] = "pong"


@dataclass(frozen=True, slots=True)
class Results:
    """Reply to ``send_many``: one status per recipient, in the order of ``to`` (``accepted``,
    ``duplicate``, ``unknown_user``, ``suspended``, ``mailbox_full``, ``sender_cap``,
    ``quota_exceeded``)."""

    rid: int
    id: bytes
    status: list[str]
    t: ClassVar[str] = "results"


@dataclass(frozen=True, slots=True)
class BlobState:
    """Reply to ``blob_begin``/``blob_put``/``blob_held``/``blob_commit``: ``held`` chunks (a prefix,
    all on disk) of ``size`` bytes in chunks of ``chunk_size``."""

    rid: int
    id: bytes
    size: int
    chunk_size: int
    held: int
    committed: bool
    t: ClassVar[str] = "blob_state"


@dataclass(frozen=True, slots=True)
class BlobData:
    rid: int
    id: bytes
    index: int
    data: bytes
    t: ClassVar[str] = "blob_data"


@dataclass(frozen=True, slots=True)
class DeliveredMessage:
    seq: int
    sender: str  # "from" on the wire
    id: bytes
    kind: str
    body: bytes
    ts: int  # milliseconds since the epoch, when the server accepted it


@dataclass(frozen=True, slots=True)
class Deliver:
    messages: list[DeliveredMessage]
    t: ClassVar[str] = "deliver"


@dataclass(frozen=True, slots=True)
class PrekeysLow:
    one_time: int
    kem: int
    t: ClassVar[str] = "prekeys_low"


@dataclass(frozen=True, slots=True)
class Drained:
    """Cap ``drained``: every message queued when the connection authenticated has been pushed
    (later ones arrive live). Lets ``recv`` stop at once instead of waiting for a quiet period."""

    t: ClassVar[str] = "drained"


@dataclass(frozen=True, slots=True)
class Error:
    rid: int | None
    code: str
    message: str
    t: ClassVar[str] = "error"


ClientFrame = (Register | Auth | UploadPrekeys | FetchBundle | Send | SendBatch | Ack | Ping | Block
               | SendMany | BlobBegin | BlobPut | BlobHeld | BlobCommit | BlobGet | BlobRelease | SetRecovery
               | Recover | DeleteAccount)
ServerFrame = (Hello | Ok | Bundle | Accepted | AcceptedMany | Pong | Deliver | PrekeysLow | Drained | Error
               | Results | BlobState | BlobData)
Frame = ClientFrame | ServerFrame
CLIENT_FRAME_TYPES: Final = (Register, Auth, UploadPrekeys, FetchBundle, Send, SendBatch, Ack, Ping, Block,
                             SendMany, BlobBegin, BlobPut, BlobHeld, BlobCommit, BlobGet, BlobRelease,
                             SetRecovery, Recover, DeleteAccount)


# --- encoding ---------------------------------------------------------------------------------

def _message_map(m: DeliveredMessage) -> dict[str, Any]:
    return {"seq": m.seq, "from": m.sender, "id": m.id, "kind": m.kind, "body": m.body, "ts": m.ts}


def frame_to_map(frame: Frame) -> dict[str, Any]:
    """The msgpack map of ``frame`` (``None`` optional reply fields are left out)."""
    out: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": frame.t}
    if isinstance(frame, Deliver):
        out["messages"] = [_message_map(m) for m in frame.messages]
    elif isinstance(frame, Hello):
        out.update(nonce=frame.nonce, server=frame.server,
                   limits={"max_frame": frame.limits.max_frame, "max_body": frame.limits.max_body})
        if frame.caps:
            out["caps"] = list(frame.caps)
        if frame.epoch is not None:
            out["epoch"] = frame.epoch
    elif isinstance(frame, SendBatch):
        out["rid"] = frame.rid
        out["envelopes"] = [{"to": e.to, "id": e.id, "kind": e.kind, "body": e.body} for e in frame.envelopes]
    elif isinstance(frame, Auth):
        out.update(rid=frame.rid, username=frame.username, sig=frame.sig)
        if frame.counter is not None:
            out["counter"] = frame.counter
    elif isinstance(frame, Ok):
        out["rid"] = frame.rid
        if frame.username is not None:
            out["username"] = frame.username
        if frame.prekeys is not None:
            out["prekeys"] = {"one_time": frame.prekeys.one_time, "kem": frame.prekeys.kem}
    else:
        for name in frame.__dataclass_fields__:
            if name != "t":
                out[name] = getattr(frame, name)
    return out


def encode_frame(frame: Frame) -> bytes:
    """Encode ``frame`` as msgpack bytes (bin type for bytes, str for text)."""
    return msgpack.packb(frame_to_map(frame), use_bin_type=True)  # type: ignore[no-any-return]


def encode_accepted(rid: int, msg_id: bytes) -> bytes:
    """Fast path for ``encode_frame(Accepted(rid, msg_id))``: one per message sent."""
    return msgpack.packb(  # type: ignore[no-any-return]
        {"v": PROTOCOL_VERSION, "t": "accepted", "rid": rid, "id": msg_id}, use_bin_type=True)


def encode_deliver(messages: list[DeliveredMessage]) -> bytes:
    """Fast path for the server's hottest frame: a deliver frame of several messages."""
    return msgpack.packb(  # type: ignore[no-any-return]
        {"v": PROTOCOL_VERSION, "t": "deliver", "messages": [_message_map(m) for m in messages]},
        use_bin_type=True,
    )


# --- decoding ---------------------------------------------------------------------------------

class _Fields:
    """Typed access to the keys of one decoded frame map; failures become ``bad_frame``."""

    __slots__ = ("m", "rid", "t")

    def __init__(self, t: str, m: dict[Any, Any], rid: int | None) -> None:
        self.t = t
        self.m = m
        self.rid = rid

    def fail(self, message: str, code: str = BAD_FRAME) -> ProtocolError:
        return ProtocolError(code, f"{self.t}: {message}", rid=self.rid)

    def get(self, key: str) -> Any:
        try:
            return self.m[key]
        except KeyError:
            raise self.fail(f"missing field {key!r}") from None

    def as_int(self, key: str, *, lo: int = 0, hi: int = MAX_RID, value: Any = None,
               present: bool = False) -> int:
        v = value if present else self.get(key)
        if type(v) is not int or not lo <= v <= hi:
            raise self.fail(f"{key!r} must be an integer in [{lo}, {hi}]")
        return v

    def as_bytes(self, key: str, *, max_len: int, exact: int | None = None, value: Any = None,
              present: bool = False) -> bytes:
        v = value if present else self.get(key)
        if type(v) is not bytes:
            raise self.fail(f"{key!r} must be binary")
        if exact is not None and len(v) != exact:
            raise self.fail(f"{key!r} must be {exact} bytes")
        if len(v) > max_len:
            raise self.fail(f"{key!r} longer than {max_len} bytes", TOO_LARGE)
        return v

    def opt_bytes(self, key: str, *, max_len: int) -> bytes | None:
        v = self.m.get(key)
        return None if v is None else self.as_bytes(key, max_len=max_len, value=v, present=True)

    def as_str(self, key: str, *, max_len: int = MAX_TEXT_FIELD, value: Any = None,
               present: bool = False) -> str:
        v = value if present else self.get(key)
        if type(v) is not str:
            raise self.fail(f"{key!r} must be a string")
        if len(v) > max_len:
            raise self.fail(f"{key!r} longer than {max_len} characters", TOO_LARGE)
        return v

    def opt_str(self, key: str, *, max_len: int = MAX_TEXT_FIELD) -> str | None:
        v = self.m.get(key)
        return None if v is None else self.as_str(key, max_len=max_len, value=v, present=True)

    def as_list(self, key: str, *, max_items: int, default_empty: bool = False) -> list[Any]:
        v = self.m.get(key) if default_empty else self.get(key)
        if v is None and default_empty:
            return []
        if type(v) is not list:
            raise self.fail(f"{key!r} must be an array")
        if len(v) > max_items:
            raise self.fail(f"{key!r} has more than {max_items} items", TOO_LARGE)
        return v

    def as_map(self, key: str) -> dict[Any, Any]:
        v = self.get(key)
        if type(v) is not dict:
            raise self.fail(f"{key!r} must be a map")
        return v


def _register(f: _Fields) -> Register:
    return Register(rid=f.as_int("rid"), username=f.as_str("username", max_len=MAX_NAME_FIELD),
                    identity=f.as_bytes("identity", max_len=MAX_IDENTITY_LEN),
                    sig=f.as_bytes("sig", max_len=SIGNATURE_LEN, exact=SIGNATURE_LEN),
                    invite=f.opt_str("invite", max_len=128),
                    recovery_public=f.opt_bytes("recovery_public", max_len=RECOVERY_PUBLIC_LEN))


def _auth(f: _Fields) -> Auth:
    counter = f.m.get("counter")
    return Auth(rid=f.as_int("rid"), username=f.as_str("username", max_len=MAX_NAME_FIELD),
                sig=f.as_bytes("sig", max_len=SIGNATURE_LEN, exact=SIGNATURE_LEN),
                counter=None if counter is None else f.as_int("counter", value=counter, present=True))


def _set_recovery(f: _Fields) -> SetRecovery:
    return SetRecovery(rid=f.as_int("rid"),
                       recovery_public=f.as_bytes("recovery_public", max_len=RECOVERY_PUBLIC_LEN,
                                                  exact=RECOVERY_PUBLIC_LEN),
                       sig=f.as_bytes("sig", max_len=SIGNATURE_LEN, exact=SIGNATURE_LEN))


def _recover(f: _Fields) -> Recover:
    return Recover(rid=f.as_int("rid"), username=f.as_str("username", max_len=MAX_NAME_FIELD),
                   identity=f.as_bytes("identity", max_len=MAX_IDENTITY_LEN),
                   recovery_sig=f.as_bytes("recovery_sig", max_len=SIGNATURE_LEN, exact=SIGNATURE_LEN),
                   sig=f.as_bytes("sig", max_len=SIGNATURE_LEN, exact=SIGNATURE_LEN))


def _delete_account(f: _Fields) -> DeleteAccount:
    return DeleteAccount(rid=f.as_int("rid"),
                         sig=f.as_bytes("sig", max_len=SIGNATURE_LEN, exact=SIGNATURE_LEN))


def _upload_prekeys(f: _Fields) -> UploadPrekeys:
    one_time = [f.as_bytes("one_time[]", max_len=MAX_ONE_TIME_PREKEY_LEN, value=v, present=True)
                for v in f.as_list("one_time", max_items=MAX_ONE_TIME_PER_UPLOAD, default_empty=True)]
    kem = [f.as_bytes("kem_one_time[]", max_len=MAX_KEM_PREKEY_LEN, value=v, present=True)
           for v in f.as_list("kem_one_time", max_items=MAX_KEM_PER_UPLOAD, default_empty=True)]
    replace = f.m.get("replace", False)
    if type(replace) is not bool:
        raise f.fail("'replace' must be true or false")
    return UploadPrekeys(rid=f.as_int("rid"),
                         signed_prekey=f.opt_bytes("signed_prekey", max_len=MAX_SIGNED_PREKEY_LEN),
                         one_time=one_time, kem_one_time=kem,
                         kem_last_resort=f.opt_bytes("kem_last_resort", max_len=MAX_KEM_PREKEY_LEN),
                         replace=replace)


def _fetch_bundle(f: _Fields) -> FetchBundle:
    group = f.m.get("group")   # optional: absent in frames of clients without groups
    if group is not None and type(group) is not bool:
        raise f.fail("'group' must be true or false")
    return FetchBundle(rid=f.as_int("rid"), username=f.as_str("username", max_len=MAX_NAME_FIELD),
                       group=group is True)


def _send(f: _Fields) -> Send | SendBatch:
    if "envelopes" in f.m:
        return _send_batch(f)
    rid = f.as_int("rid")
    kind = f.as_str("kind", max_len=16)
    if kind not in MESSAGE_KINDS:
        raise f.fail("'kind' must be one of " + ", ".join(sorted(MESSAGE_KINDS)))
    return Send(rid=rid, to=f.as_str("to", max_len=MAX_NAME_FIELD),
                id=f.as_bytes("id", max_len=MESSAGE_ID_LEN, exact=MESSAGE_ID_LEN), kind=kind,
                body=f.as_bytes("body", max_len=DEFAULT_MAX_FRAME))


def _send_fast(m: dict[Any, Any]) -> Send | None:
    """The same checks as ``_send`` for a valid send frame, without per-field calls; ``None`` if any
    check fails, and then ``_send`` runs to raise the precise error. The relay's hottest decode."""
    rid, to, msg_id, kind, body = m.get("rid"), m.get("to"), m.get("id"), m.get("kind"), m.get("body")
    if (type(rid) is int and 0 <= rid <= MAX_RID and type(kind) is str and kind in MESSAGE_KINDS
            and type(to) is str and len(to) <= MAX_NAME_FIELD
            and type(msg_id) is bytes and len(msg_id) == MESSAGE_ID_LEN
            and type(body) is bytes and len(body) <= DEFAULT_MAX_FRAME):
        return Send(rid=rid, to=to, id=msg_id, kind=kind, body=body)
    return None


def _send_batch(f: _Fields) -> SendBatch:
    """Cap ``batch``: each envelope gets ``_send``'s checks, written inline (the relay's hot path
    at 16 envelopes a frame; ``_send_fast`` is the one-envelope mirror)."""
    rid = f.as_int("rid")
    items = f.as_list("envelopes", max_items=MAX_BATCH_ENVELOPES)
    if not items:
        raise f.fail("'envelopes' holds no envelope")
    out = []
    for item in items:
        if type(item) is not dict:
            raise f.fail("'envelopes' items must be maps")
        to, msg_id, kind, body = item.get("to"), item.get("id"), item.get("kind"), item.get("body")
        if type(to) is not str or len(to) > MAX_NAME_FIELD:
            raise f.fail(f"envelope 'to' must be a string of at most {MAX_NAME_FIELD} characters")
        if type(msg_id) is not bytes or len(msg_id) != MESSAGE_ID_LEN:
            raise f.fail(f"envelope 'id' must be {MESSAGE_ID_LEN} bytes")
        if type(kind) is not str or kind not in MESSAGE_KINDS:
            raise f.fail("envelope 'kind' must be 'msg' or 'pake'")
        if type(body) is not bytes:
            raise f.fail("envelope 'body' must be binary")
        if len(body) > DEFAULT_MAX_FRAME:
            raise f.fail(f"envelope 'body' longer than {DEFAULT_MAX_FRAME} bytes", TOO_LARGE)
        out.append(Envelope(to=to, id=msg_id, kind=kind, body=body))
    return SendBatch(rid=rid, envelopes=out)


def _ack(f: _Fields) -> Ack:
    seqs = f.m.get("seqs")
    if (type(seqs) is list and len(seqs) <= MAX_ACK_SEQS
            and all(type(s) is int and 0 <= s <= MAX_RID for s in seqs)):
        return Ack(seqs=seqs)  # valid: the per-item checks below would pass and copy the list
    return Ack(seqs=[f.as_int("seqs[]", value=s, present=True)
                     for s in f.as_list("seqs", max_items=MAX_ACK_SEQS)])


def _ping(f: _Fields) -> Ping:
    return Ping(rid=f.as_int("rid"))


def _hello(f: _Fields) -> Hello:
    limits = _Fields("hello.limits", f.as_map("limits"), None)
    caps = [f.as_str("caps[]", max_len=MAX_CAP_LEN, value=c, present=True)
            for c in f.as_list("caps", max_items=MAX_CAPS, default_empty=True)]
    return Hello(nonce=f.as_bytes("nonce", max_len=NONCE_LEN, exact=NONCE_LEN), server=f.as_str("server"),
                 limits=Limits(max_frame=limits.as_int("max_frame"), max_body=limits.as_int("max_body")),
                 caps=caps, epoch=_opt_exact_bytes(f, "epoch", EPOCH_LEN))


def _opt_exact_bytes(f: _Fields, key: str, length: int) -> bytes | None:
    v = f.m.get(key)
    return None if v is None else f.as_bytes(key, max_len=length, exact=length, value=v, present=True)


def _block(f: _Fields) -> Block:
    on = f.get("on")
    if type(on) is not bool:
        raise f.fail("'on' must be true or false")
    return Block(rid=f.as_int("rid"), username=f.as_str("username", max_len=MAX_NAME_FIELD), on=on)


def _send_many(f: _Fields) -> SendMany:
    rid = f.as_int("rid")
    kind = f.as_str("kind", max_len=16)
    if kind not in MESSAGE_KINDS:
        raise f.fail("'kind' must be one of " + ", ".join(sorted(MESSAGE_KINDS)))
    to = [f.as_str("to[]", max_len=MAX_NAME_FIELD, value=v, present=True)
          for v in f.as_list("to", max_items=MAX_SEND_MANY_RECIPIENTS)]
    if not to:
        raise f.fail("'to' names no recipient")
    return SendMany(rid=rid, id=f.as_bytes("id", max_len=MESSAGE_ID_LEN, exact=MESSAGE_ID_LEN), kind=kind,
                    body=f.as_bytes("body", max_len=DEFAULT_MAX_FRAME), to=to)


def _blob_id(f: _Fields) -> bytes:
    return f.as_bytes("id", max_len=BLOB_ID_LEN, exact=BLOB_ID_LEN)


def _blob_begin(f: _Fields) -> BlobBegin:
    return BlobBegin(rid=f.as_int("rid"), id=_blob_id(f), size=f.as_int("size", hi=MAX_BLOB_SIZE),
                     chunk_size=f.as_int("chunk_size", lo=1, hi=MAX_BLOB_CHUNK))


def _blob_put(f: _Fields) -> BlobPut:
    return BlobPut(rid=f.as_int("rid"), id=_blob_id(f), index=f.as_int("index", hi=MAX_BLOB_SIZE),
                   data=f.as_bytes("data", max_len=MAX_BLOB_CHUNK))


def _blob_held(f: _Fields) -> BlobHeld:
    return BlobHeld(rid=f.as_int("rid"), id=_blob_id(f))


def _blob_commit(f: _Fields) -> BlobCommit:
    to = [f.as_str("to[]", max_len=MAX_NAME_FIELD, value=v, present=True)
          for v in f.as_list("to", max_items=MAX_SEND_MANY_RECIPIENTS)]
    return BlobCommit(rid=f.as_int("rid"), id=_blob_id(f), to=to)


def _blob_get(f: _Fields) -> BlobGet:
    return BlobGet(rid=f.as_int("rid"), id=_blob_id(f), index=f.as_int("index", hi=MAX_BLOB_SIZE))


def _blob_release(f: _Fields) -> BlobRelease:
    return BlobRelease(rid=f.as_int("rid"), id=_blob_id(f))


def _blob_state(f: _Fields) -> BlobState:
    committed = f.get("committed")
    if type(committed) is not bool:
        raise f.fail("'committed' must be true or false")
    return BlobState(rid=f.as_int("rid"), id=_blob_id(f), size=f.as_int("size", hi=MAX_BLOB_SIZE),
                     chunk_size=f.as_int("chunk_size", lo=1, hi=MAX_BLOB_CHUNK),
                     held=f.as_int("held", hi=MAX_BLOB_SIZE), committed=committed)


def _blob_data(f: _Fields) -> BlobData:
    return BlobData(rid=f.as_int("rid"), id=_blob_id(f), index=f.as_int("index", hi=MAX_BLOB_SIZE),
                    data=f.as_bytes("data", max_len=MAX_BLOB_CHUNK))


def _results(f: _Fields) -> Results:
    status = [f.as_str("status[]", max_len=32, value=v, present=True)
              for v in f.as_list("status", max_items=MAX_SEND_MANY_RECIPIENTS)]
    return Results(rid=f.as_int("rid"), id=f.as_bytes("id", max_len=MESSAGE_ID_LEN, exact=MESSAGE_ID_LEN),
                   status=status)


def _counts(f: _Fields, m: dict[Any, Any]) -> PrekeyCounts:
    c = _Fields(f.t + ".prekeys", m, f.rid)
    return PrekeyCounts(one_time=c.as_int("one_time"), kem=c.as_int("kem"))


def _ok(f: _Fields) -> Ok:
    prekeys = f.m.get("prekeys")
    return Ok(rid=f.as_int("rid"), username=f.opt_str("username", max_len=MAX_NAME_FIELD),
              prekeys=None if prekeys is None else _counts(f, f.as_map("prekeys")))


def _bundle(f: _Fields) -> Bundle:
    return Bundle(rid=f.as_int("rid"), username=f.as_str("username", max_len=MAX_NAME_FIELD),
                  identity=f.as_bytes("identity", max_len=MAX_IDENTITY_LEN),
                  signed_prekey=f.as_bytes("signed_prekey", max_len=MAX_SIGNED_PREKEY_LEN),
                  kem_prekey=f.as_bytes("kem_prekey", max_len=MAX_KEM_PREKEY_LEN),
                  one_time_prekey=f.opt_bytes("one_time_prekey", max_len=MAX_ONE_TIME_PREKEY_LEN))


def _accepted(f: _Fields) -> Accepted:
    return Accepted(rid=f.as_int("rid"), id=f.as_bytes("id", max_len=MESSAGE_ID_LEN, exact=MESSAGE_ID_LEN))


def _accepted_many(f: _Fields) -> AcceptedMany:
    ids = [f.as_bytes("ids[]", max_len=MESSAGE_ID_LEN, exact=MESSAGE_ID_LEN, value=v, present=True)
           for v in f.as_list("ids", max_items=MAX_BATCH_ENVELOPES)]
    status = [f.as_str("status[]", max_len=32, value=v, present=True)
              for v in f.as_list("status", max_items=MAX_BATCH_ENVELOPES)]
    if len(ids) != len(status):
        raise f.fail("'ids' and 'status' differ in length")
    return AcceptedMany(rid=f.as_int("rid"), ids=ids, status=status)


def _pong(f: _Fields) -> Pong:
    return Pong(rid=f.as_int("rid"))


def _deliver(f: _Fields) -> Deliver:
    out = []
    for item in f.as_list("messages", max_items=MAX_DELIVER_MESSAGES):
        if type(item) is not dict:
            raise f.fail("'messages' items must be maps")
        m = _Fields("deliver.messages[]", item, None)
        out.append(DeliveredMessage(
            seq=m.as_int("seq"), sender=m.as_str("from", max_len=MAX_NAME_FIELD),
            id=m.as_bytes("id", max_len=MESSAGE_ID_LEN, exact=MESSAGE_ID_LEN),
            kind=m.as_str("kind", max_len=16), body=m.as_bytes("body", max_len=DEFAULT_MAX_FRAME),
            ts=m.as_int("ts")))
    return Deliver(messages=out)


def _prekeys_low(f: _Fields) -> PrekeysLow:
    return PrekeysLow(one_time=f.as_int("one_time"), kem=f.as_int("kem"))


def _error(f: _Fields) -> Error:
    rid = f.m.get("rid")
    return Error(rid=None if rid is None else f.as_int("rid"), code=f.as_str("code", max_len=64),
                 message=f.as_str("message"))


_DECODERS: Final[dict[str, Callable[[_Fields], Frame]]] = {
    "register": _register, "auth": _auth, "upload_prekeys": _upload_prekeys,
    "fetch_bundle": _fetch_bundle, "send": _send, "ack": _ack, "ping": _ping, "block": _block,
    "send_many": _send_many, "results": _results, "hello": _hello, "ok": _ok, "bundle": _bundle,
    "accepted": _accepted, "accepted_many": _accepted_many, "pong": _pong, "set_recovery": _set_recovery,
    "recover": _recover, "delete_account": _delete_account,
    "deliver": _deliver, "prekeys_low": _prekeys_low, "drained": lambda _: Drained(), "error": _error,
    "blob_begin": _blob_begin, "blob_put": _blob_put, "blob_held": _blob_held, "blob_commit": _blob_commit,
    "blob_get": _blob_get, "blob_release": _blob_release, "blob_state": _blob_state, "blob_data": _blob_data,
}


def decode_frame(data: bytes, *, max_size: int = DEFAULT_MAX_FRAME) -> Frame:
    """Decode and validate one frame; raise :class:`ProtocolError` on any problem.

    ``max_size`` bounds the whole frame (``too_large``). Checks run in this order: size, msgpack
    well-formedness (``bad_frame``), map with ``v`` and ``t``, version (``unsupported_version``),
    type (``unknown_type``), then every field of that type (``bad_frame`` / ``too_large``).
    """
    if type(data) is not bytes:
        raise ProtocolError(BAD_FRAME, "frames must be binary")
    if len(data) > max_size:
        raise ProtocolError(TOO_LARGE, f"frame of {len(data)} bytes exceeds the limit of {max_size}")
    if not is_one_msgpack_value(data):  # before unpackb: see is_one_msgpack_value
        raise ProtocolError(BAD_FRAME, "frame is not a single valid msgpack value")
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception:  # msgpack raises many unrelated types on bad input; none is a server fault
        raise ProtocolError(BAD_FRAME, "frame is not a single valid msgpack value") from None
    if type(m) is not dict:
        raise ProtocolError(BAD_FRAME, "frame must be a msgpack map")
    rid = m.get("rid")
    rid = rid if type(rid) is int and 0 <= rid <= MAX_RID else None
    v = m.get("v")
    if type(v) is not int:
        raise ProtocolError(BAD_FRAME, "missing or non-integer version 'v'", rid=rid)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, f"protocol version {v} is not supported (this is "
                            f"version {PROTOCOL_VERSION})", rid=rid)
    t = m.get("t")
    if type(t) is not str:
        raise ProtocolError(BAD_FRAME, "missing or non-string frame type 't'", rid=rid)
    if t == "send":
        send = _send_fast(m)
        if send is not None:
            return send
    decoder = _DECODERS.get(t)
    if decoder is None:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown frame type {t[:32]!r}", rid=rid)
    return decoder(_Fields(t, m, rid))
