"""The Client API: everything the CLI, the chat and the demo do goes through here.

Ordering rules that make delivery exactly-once (DESIGN.md "Delivery"):
- sending: encrypt -> in one transaction store the advanced ratchet state, the history entry and
  the outbox entry -> transmit -> on "accepted" remove the outbox entry. A crash before "accepted"
  leaves the envelope in the outbox, retried with the same id (the server drops the duplicate).
- receiving: decrypt -> in one transaction store the message and the new session/prekey state ->
  only then ack. A crash before the ack means redelivery; the (sender, id) uniqueness in the
  history drops the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..crypto.encoding import expect_array, pack, unpack
from ..crypto.errors import CryptoError, WrongPassphrase
from ..crypto.identity import IdentityKeyPair, PublicIdentity
from ..crypto.keystore import RFC9106_SECOND_RECOMMENDED, Argon2Params, open_keystore, seal_keystore
from ..crypto.prekey_store import PrekeyStore
from ..crypto.prekeys import PrekeyBundle
from ..crypto.records import RecordCipher
from ..crypto.recovery import RecoveryKey
from ..crypto.safety import SafetyNumber, safety_number
from ..crypto.session import Session, encrypt, initiate_session
from ..protocol.usernames import normalize_username
from . import accounts, epoch, login_counter, outbox
from .attachments import FileOffer
from .backoff import reconnect_delay
from .blocks import BlockList
from .connection import Connection, format_fingerprint
from .decryption_errors import Retries
from .errors import (
    ClientError,
    ConnectionFailed,
    ContactBlocked,
    IdentityChanged,
    ProfileError,
    ServerError,
    StaleProfile,
    UnknownContact,
    VerificationError,
    WrongPassphraseError,
)
from .group_store import GroupInfo
from .groups import Groups
from .home import ProfileLock, ProfilePaths, private_dir, write_private_file
from .inbox import IncomingMessage, Receiver
from .plaintext import build_file_payload, build_text_payload
from .plaintext import pad as pad  # re-exported: tests and older callers import it from here
from .plaintext import unpad as unpad
from .prekeys_low import PrekeysLowGate
from .profile import Contact, ProfileDB, StoredMessage
from .requests import Request, Requests
from .verification import PakeMailbox, verify_with_password

__all__ = ["Client", "IncomingMessage", "pad"]

KEYSTORE_VERSION = 1
ONE_TIME_POOL_TARGET = 100
ONE_TIME_POOL_LOW = 25
UPLOAD_CHUNK = 50
SIGNED_PREKEY_LIFETIME_MS = 7 * 24 * 3600 * 1000

Observer = Callable[[str, dict[str, Any]], None]


def now_ms() -> int:
    return int(time.time() * 1000)


class Client:
    """An unlocked profile. Create with :meth:`create` (new identity) or :meth:`open` (existing)."""

    def __init__(self, paths: ProfilePaths, identity: IdentityKeyPair, db: ProfileDB, lock: ProfileLock,
                 observer: Observer | None):
        self.paths = paths
        self.username = paths.username
        self.identity = identity
        self.db = db
        self._lock = lock
        self._observer = observer
        self._conn: Connection | None = None
        self._state_lock = asyncio.Lock()
        self._outbox_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.pake_mailbox = PakeMailbox()
        self._pake_listeners: list[Callable[[str], None]] = []
        self.prekeys = self._load_prekeys()
        self.blocks = BlockList(db)
        self.requests = Requests(db)
        self.retries = Retries(self)
        self.receiver = Receiver(self)
        self.groups = Groups(self)   # client/groups.py; the group API below delegates to it
        self._prekeys_low = PrekeysLowGate()
        self.recovery_code: str | None = None  # shown once after create; never stored

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def create(cls, home: Path, username: str, server_url: str, passphrase: str, *,
                     server_fingerprint: bytes | None = None, invite: str | None = None,
                     kdf: Argon2Params = RFC9106_SECOND_RECOMMENDED,
                     observer: Observer | None = None, recovery: RecoveryKey | None = None) -> Client:
        """Make a new identity, register it with the relay, publish prekeys. With ``recovery``, take
        over the existing account ``username`` instead (docs/accounts.md); otherwise the new
        account's recovery code is in ``client.recovery_code``, to show once."""
        try:
            username = normalize_username(username)
        except Exception as exc:
            raise ClientError(str(exc)) from None
        if not passphrase:
            raise ClientError("an empty passphrase would leave your keys unprotected")
        paths = ProfilePaths(home, username)
        if paths.exists():
            raise ProfileError(f"profile '{username}' already exists in {home}")
        private_dir(home)
        lock = ProfileLock(paths)
        lock.acquire()
        client: Client | None = None
        try:
            identity = IdentityKeyPair.generate()
            record_key = RecordCipher.new_key()
            if observer:
                observer("identity", {"user": username, "fingerprint": identity.public.fingerprint_text()})
            db = ProfileDB(paths.database, RecordCipher(record_key))
            client = cls(paths, identity, db, lock, observer)
            with db.transaction():
                db.set_secret_meta("server_url", server_url.encode())
            conn = await Connection.open(server_url, server_fingerprint)
            try:
                reply, client.recovery_code = await accounts.register_or_recover(
                    conn, identity, username, invite, recovery)
                if reply.get("username") != username:
                    raise ClientError("the server registered a different name than asked")
                with db.transaction():  # the public key, not the certificate: renewals keep working
                    db.set_secret_meta("server_fingerprint", conn.spki)
                # The key store is written only once the name is ours, so a failed registration
                # leaves nothing behind and the same command can simply be run again.
                sign_priv, dh_priv = identity.private_bytes()
                blob = seal_keystore(passphrase, pack([KEYSTORE_VERSION, username, sign_priv, dh_priv,
                                                       record_key]), params=kdf)
                write_private_file(paths.keystore, blob)
                client._conn = conn
                await client._replenish_prekeys({"one_time": 0, "kem": 0}, replace=epoch.changed(db, conn))
            finally:
                client._conn = None
                await conn.close()
            return client
        except BaseException:
            if client is not None:
                client.db.close()
            lock.release()
            if not paths.keystore.exists():
                shutil.rmtree(paths.dir, ignore_errors=True)
            raise

    @classmethod
    def open(cls, home: Path, username: str, passphrase: str, *, observer: Observer | None = None) -> Client:
        """Unlock an existing profile (Argon2id; a wrong passphrase raises WrongPassphrase)."""
        paths = ProfilePaths(home, username)
        if not paths.exists():
            raise ProfileError(f"no profile '{username}' in {home}")
        lock = ProfileLock(paths)
        lock.acquire()
        try:
            try:
                plain = open_keystore(passphrase, paths.keystore.read_bytes())
            except WrongPassphrase:
                raise WrongPassphraseError("wrong passphrase") from None
            except CryptoError as exc:
                raise ProfileError(f"key store {paths.keystore} is damaged: {exc}") from None
            arr = expect_array(unpack(plain, what="key store"), what="key store",
                               version=KEYSTORE_VERSION, length=5)
            if arr[1] != username:
                raise ProfileError(f"the key store in {paths.dir} belongs to {arr[1]!r}, not {username!r}")
            identity = IdentityKeyPair.from_private_bytes(arr[2], arr[3])
            db = ProfileDB(paths.database, RecordCipher(arr[4]))
            return cls(paths, identity, db, lock, observer)
        except BaseException:
            lock.release()
            raise

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        self.db.close()
        self._lock.release()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def server_url(self) -> str:
        url = self.db.get_secret_meta("server_url")
        if url is None:
            raise ProfileError("this profile has no server address; create it again with init")
        return url.decode()

    @property
    def server_fingerprint(self) -> str:
        fp = self.db.get_secret_meta("server_fingerprint")
        return format_fingerprint(fp) if fp else "(not pinned)"

    def _emit(self, event: str, **details: Any) -> None:
        if self._observer is not None:
            self._observer(event, details)

    # ------------------------------------------------------------------ connection
    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed.is_set()

    async def connect(self) -> None:
        """Connect, authenticate, top up prekeys, send what waits in the outbox."""
        if self.connected:
            return
        self.receiver.drained.clear()  # set by this connection's `drained` push (cap "drained")
        # The pin is an authenticated record: editing profile.db cannot replace it unnoticed.
        pinned = self.db.get_secret_meta("server_fingerprint")
        if pinned is None:
            raise ProfileError("this profile has no pinned server certificate; create it again with init")
        conn = await Connection.open(self.server_url, pinned)
        if conn.pinned_by_certificate:  # a pin made before public-key pins: same server, now pin its key
            with self.db.transaction():
                self.db.set_secret_meta("server_fingerprint", conn.spki)
        conn.on_push(self._on_push)
        try:
            reply = await login_counter.authenticate(conn, self.db, self.identity, self.username)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        counts = reply.get("prekeys")
        await self._replenish_prekeys(counts if isinstance(counts, dict) else {},
                                      replace=epoch.changed(self.db, conn))
        # A refused outbox entry (a full mailbox, a rate limit) does not make the connection bad:
        # it stays queued (or is marked failed when retrying cannot help); `send` reports such
        # refusals to whoever is sending.
        with contextlib.suppress(ServerError):
            await self.groups.flush()   # the pairwise outbox, then the group outbox
        with contextlib.suppress(ServerError):
            await self.blocks.tell_relay(conn)

    async def new_recovery_code(self) -> str:
        """Replace the account's recovery key (docs/accounts.md); returns the new code, to show once."""
        await self.connect()
        return await accounts.set_recovery_key(self._require_conn(), self.identity, self.username)

    async def delete_account(self) -> None:
        """Delete the account on the relay; removing the local profile is the caller's next step."""
        await self.connect()
        await accounts.delete_account(self._require_conn(), self.identity, self.username)

    async def disconnect(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _require_conn(self) -> Connection:
        if self._conn is None or self._conn.closed.is_set():
            raise ConnectionFailed("not connected to the server")
        return self._conn

    async def stay_connected(self, on_status: Callable[[str], None] | None = None) -> None:
        """Keep a connection up, reconnecting with exponential backoff and full jitter (for the
        interactive chat): clients dropped together by a relay restart do not return together."""
        attempt = 0
        while True:
            delay = reconnect_delay(attempt)
            try:
                await self.connect()
                if on_status:
                    on_status("connected")
                attempt, delay = 0, reconnect_delay(0)
                assert self._conn is not None
                await self._conn.closed.wait()
                reason = self._conn.close_reason
                await self._conn.close()   # cancels its push worker: a dropped pending task is an error
                self._conn = None
                if on_status:
                    on_status(f"disconnected ({reason}); reconnecting")
            except StaleProfile as exc:   # retrying would displace the live copy: stop (docs/accounts.md)
                if on_status:
                    on_status(f"stopped: {exc}")
                return
            except (ClientError, OSError) as exc:   # never let the reconnect loop die
                if on_status:
                    on_status(f"cannot connect ({exc}); retrying in {delay:.1f}s")
            await asyncio.sleep(delay)
            attempt += 1

    # ------------------------------------------------------------------ prekeys
    def _load_prekeys(self) -> PrekeyStore:
        blob = self.db.get_secret_meta("prekeys")
        return PrekeyStore.empty() if blob is None else PrekeyStore.deserialize(blob)

    def _save_prekeys(self, store: PrekeyStore) -> None:
        self.db.set_secret_meta("prekeys", store.serialize())

    async def _replenish_prekeys(self, counts: dict[str, Any], *, replace: bool = False) -> None:
        """Top up one-time pools, rotate the signed and last-resort prekeys when due, and
        (re)publish whatever the relay has not confirmed yet (PQXDH section 3.2). With ``replace``
        (a new store epoch, client/epoch.py) all of them are new and the relay's pools are dropped."""
        conn = self._require_conn()
        async with self._state_lock:
            store = self.prekeys
            frame: dict[str, Any] = {"t": "upload_prekeys", "signed_prekey": None, "one_time": [],
                                     "kem_one_time": [], "kem_last_resort": None, "replace": replace}
            current = store.current_signed_prekey
            last_resort = self.db.get_meta("last_resort_prekey")   # public, as published
            counts = {} if replace else counts
            if replace or current is None or now_ms() - current.created_at > SIGNED_PREKEY_LIFETIME_MS:
                current, store = store.rotate_signed_prekey(self.identity, now_ms())
                last_resort = None   # rotated together with the signed prekey
            if last_resort is None:
                new_last_resort, store = store.new_last_resort_kem_prekey(self.identity)
                last_resort = new_last_resort.encode()
            published = self.db.get_meta("published_prekeys") or {}
            if published.get("signed") != current.key_id:
                frame["signed_prekey"] = current.encode()
            if published.get("last_resort") != last_resort:
                frame["kem_last_resort"] = last_resort
            one_time_have = int(counts.get("one_time", 0) or 0)
            kem_have = int(counts.get("kem", 0) or 0)
            if one_time_have < ONE_TIME_POOL_LOW:
                otpks, store = store.new_one_time_prekeys(ONE_TIME_POOL_TARGET - one_time_have)
                frame["one_time"] = [k.encode() for k in otpks]
            if kem_have < ONE_TIME_POOL_LOW:
                kems, store = store.new_kem_prekeys(self.identity, ONE_TIME_POOL_TARGET - kem_have)
                frame["kem_one_time"] = [k.encode() for k in kems]
            if not (frame["signed_prekey"] or frame["kem_last_resort"] or frame["one_time"]
                    or frame["kem_one_time"]):
                return
            if store is not self.prekeys:
                # Private halves are durable before their public halves are published.
                with self.db.transaction():
                    self._save_prekeys(store)
                    self.db.set_meta("last_resort_prekey", last_resort)
                self.prekeys = store
        self._emit("prekeys", signed=frame["signed_prekey"] is not None, one_time=len(frame["one_time"]),
                   kem=len(frame["kem_one_time"]), last_resort=frame["kem_last_resort"] is not None)
        one_time, kem = frame["one_time"], frame["kem_one_time"]
        first = True
        while first or one_time or kem:
            chunk = dict(frame, one_time=one_time[:UPLOAD_CHUNK], kem_one_time=kem[:UPLOAD_CHUNK])
            if not first:
                chunk["signed_prekey"] = chunk["kem_last_resort"] = None
                chunk["replace"] = False
            one_time, kem = one_time[UPLOAD_CHUNK:], kem[UPLOAD_CHUNK:]
            await conn.request(chunk)
            if first:
                # Only now does the relay hold them; until then every connect publishes them again.
                with self.db.transaction():
                    self.db.set_meta("published_prekeys", {"signed": current.key_id,
                                                           "last_resort": last_resort})
            first = False
        if replace:
            epoch.remember(self.db, conn)

    async def _on_push(self, frame: dict[str, Any]) -> None:
        kind = frame.get("t")
        if kind == "deliver":
            messages = frame.get("messages")
            if isinstance(messages, list):
                await self._on_deliver(messages)
        elif kind == "prekeys_low" and self._prekeys_low.start():
            # Debounced: a relay repeating the push (or lying about the counts) gets one top-up.
            self._spawn(self._prekeys_low.run(self._replenish_prekeys(frame)))
        elif kind == "drained":
            self.receiver.drained.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        """Every background task's failure is retrieved and reported (never "Task exception was
        never retrieved"): a lost connection or a refused upload is retried on the next connect."""
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            detail = str(exc) if isinstance(exc, ClientError) else type(exc).__name__
            self._emit("background_error", error=detail)

    # ------------------------------------------------------------------ contacts and trust
    def contacts(self) -> list[Contact]:
        return self.db.list_contacts()

    def contact(self, name: str) -> Contact:
        contact = self.db.get_contact(name)
        if contact is None:
            raise UnknownContact(f"'{name}' is not among your contacts (send them a message first)")
        return contact

    def safety_number(self, name: str, identity: bytes | None = None) -> SafetyNumber:
        """The safety number with ``name``'s pinned identity (or the given one)."""
        contact = self.contact(name)
        peer = PublicIdentity.decode(identity or contact.identity)
        return safety_number(self.username, self.identity.public, name, peer)

    def _identity_changed(self, contact: Contact, new_identity: bytes) -> IdentityChanged:
        old = self.safety_number(contact.name, contact.identity).digits
        new = self.safety_number(contact.name, new_identity).digits
        return IdentityChanged(contact.name, contact.verified, _grouped(old), _grouped(new))

    def identity_to_verify(self, name: str) -> bytes:
        """The key a verification of ``name`` is about: a pending (changed) one, else the pinned one."""
        contact = self.contact(name)
        return contact.pending_identity or contact.identity

    def accept_identity(self, name: str, identity: bytes, *, verified: bool) -> Contact:
        """Pin exactly ``identity`` (the key whose safety number the user compared) for ``name``.

        Refused if it is no longer the contact's pinned or pending key: otherwise a relay could
        swap in another key while the user is still comparing numbers on the screen.
        """
        contact = self.contact(name)
        if not (hmac.compare_digest(identity, contact.identity)
                or (contact.pending_identity is not None
                    and hmac.compare_digest(identity, contact.pending_identity))):
            raise VerificationError(f"{name}'s key changed while you were comparing: nothing was "
                                    "marked verified; compare the new safety number")
        with self.db.transaction():
            accepting_new_key = not hmac.compare_digest(identity, contact.identity)
            self.db.replace_identity(name, identity, verified=verified, now=now_ms())
            if accepting_new_key:
                self.db.release_held(name, identity)   # held messages under that key are shown now
        return self.contact(name)

    def verify_safety_number(self, name: str, digits: str) -> bool:
        """Compare what the contact read out; on a match pin and mark verified."""
        identity = self.identity_to_verify(name)
        if not self.safety_number(name, identity).matches_digits(digits):
            return False
        self.accept_identity(name, identity, verified=True)
        return True

    # ------------------------------------------------------------------ sending
    async def send(self, name: str, text: str, *, file: FileOffer | None = None) -> bytes:
        """Encrypt and queue ``text`` (or a ``file`` offer) for ``name``, then transmit; the message id."""
        name = normalize_username(name)
        if name == self.username:
            raise ClientError("you cannot send messages to yourself")
        extra = None if file is None else {"file": file.to_map()}
        # Refuse before encrypting: the relay would reject the envelope after the ratchet moved on.
        if file is None:
            payload = build_text_payload(text, now_ms(), self.username, name,
                                         self._conn.limits.get("max_body") if self._conn else None)
        else:   # issue 13: a file offer (a few hundred bytes), no text limit to check
            payload = build_file_payload(file.to_map(), now_ms(), self.username, name)
        async with self._state_lock:
            session, with_psk = await self._sending_session(name)
            envelope, session = encrypt(session, payload)
            msg_id = os.urandom(16)
            with self.db.transaction():
                self.db.save_session(session.session_id, name, session.peer.encode(), session.serialize(),
                                     now_ms(), with_psk=with_psk)
                self.db.add_message(name, "out", msg_id, text, sent_at=now_ms(), received_at=None,
                                    status="queued", extra=extra)
                self.db.add_outbox(msg_id, name, "msg", envelope, now_ms())
        self._emit("encrypt", to=name, msg_id=msg_id.hex(), envelope_bytes=len(envelope),
                   session=session.session_id.hex()[:8])
        await self.flush_outbox()
        return msg_id

    async def send_many(self, items: Sequence[tuple[str, str]]) -> list[bytes]:
        """Send each ``(name, text)`` in order, sharing one profile commit (client/outbox.py)."""
        return await outbox.send_many(self, items)

    async def _sending_session(self, name: str, *, group: bool = False) -> tuple[Session, bool]:
        """The session to encrypt with, and whether it mixed in the contact's verification PSK."""
        # Writing back to a stranger accepts their request: the reply uses their session.
        contact = self.db.get_contact(name) or self.requests.accept_if_pending(name)
        if contact is not None and contact.pending_identity is not None:
            raise self._identity_changed(contact, contact.pending_identity)
        if contact is not None and contact.blocked:
            raise ContactBlocked(f"messages to {name} are blocked: {contact.blocked}")
        psk = contact.psk if contact is not None else None
        if contact is not None:
            latest = self.db.latest_session(name, contact.identity, with_psk=psk is not None)
            if latest is not None:
                session = Session.deserialize(latest[1])
                if not hmac.compare_digest(session.peer.encode(), contact.identity):
                    raise ProfileError(f"a stored session with {name} is not with their pinned key")
                return session, psk is not None
        conn = self._require_conn()
        frame: dict[str, Any] = {"t": "fetch_bundle", "username": name}
        if group:
            frame["group"] = True   # group setup: the relay's separate budget (docs/groups.md)
        reply = await conn.request(frame)
        try:
            bundle = PrekeyBundle.from_parts(reply["identity"], reply["signed_prekey"], reply["kem_prekey"],
                                             reply.get("one_time_prekey"))
        except (KeyError, TypeError, CryptoError) as exc:
            raise ClientError(f"the server sent an invalid key bundle for '{name}': {exc}") from None
        fetched = bundle.identity.encode()
        self._emit("bundle", user=name, identity=bundle.identity.fingerprint_text(),
                   one_time=bundle.one_time_prekey is not None, kem_last_resort=bundle.kem_prekey.last_resort)
        if contact is None:
            with self.db.transaction():
                self.db.add_contact(name, fetched, now_ms())   # trust on first use
        elif fetched != contact.identity:
            with self.db.transaction():
                self.db.set_pending_identity(name, fetched)
            raise self._identity_changed(contact, fetched)
        session = initiate_session(self.identity, bundle, psk=psk)
        self._emit("pqxdh_initiate", user=name, session=session.session_id.hex()[:8], psk=psk is not None)
        return session, psk is not None

    async def flush_outbox(self) -> int:
        """Transmit queued envelopes in order; returns how many the server accepted."""
        if not self.connected:
            return 0
        sent = 0
        async with self._outbox_lock:
            if "batch" in self._require_conn().caps:  # several envelopes per frame (client/outbox.py)
                return await outbox.flush_batched(self)
            for item in self.db.outbox():
                conn = self._require_conn()
                try:
                    await conn.request({"t": "send", "to": item.contact, "id": item.msg_id,
                                        "kind": item.kind, "body": item.envelope})
                except ServerError as exc:
                    if exc.code in ("unknown_user", "bad_frame", "too_large", "suspended"):
                        # Permanent: retrying cannot help. Say so in the history, drop from outbox.
                        with self.db.transaction():
                            self.db.remove_outbox(item.msg_id)
                            self.db.set_status_by_id(item.msg_id, "out", f"failed: {exc.code}")
                    raise
                with self.db.transaction():
                    self.db.remove_outbox(item.msg_id)
                    self.db.set_status_by_id(item.msg_id, "out", "sent")
                self._emit("accepted", to=item.contact, msg_id=item.msg_id.hex(), bytes=len(item.envelope))
                sent += 1
        return sent

    def pending_outbox(self) -> int:
        return len(self.db.outbox())

    # ------------------------------------------------------------------ receiving (client/inbox.py)
    def add_listener(self, callback: Callable[[IncomingMessage], None]) -> None:
        self.receiver.listeners.append(callback)

    async def _on_deliver(self, messages: list[Any]) -> None:
        await self.receiver.handle_deliver(messages)

    def take_new_messages(self, *, mark: bool = True) -> list[IncomingMessage]:
        return self.receiver.take_new_messages(mark=mark)

    def mark_shown(self, messages: list[IncomingMessage]) -> None:
        self.receiver.mark_shown(messages)

    async def receive(self, *, wait: float = 0.0, settle: float = 0.5,
                      mark_shown: bool = True) -> list[IncomingMessage]:
        """Connect, take what the server holds, and wait up to ``wait`` seconds for more."""
        return await self.receiver.receive(wait=wait, settle=settle, mark_shown=mark_shown)

    def is_queued(self, msg_id: bytes) -> bool:
        return any(item.msg_id == msg_id for item in self.db.outbox())

    def history(self, name: str, limit: int = 50) -> list[StoredMessage]:
        return self.db.history(name, limit)

    # ------------------------------------------------------------------ groups (client/groups.py)
    async def create_group(self, name: str, members: list[str], admins: tuple[str, ...] = ()) -> GroupInfo:
        return await self.groups.create(name, members, admins)

    async def group_add(self, name: str, members: list[str]) -> GroupInfo:
        return await self.groups.add(name, members)

    async def group_remove(self, name: str, members: list[str]) -> GroupInfo:
        return await self.groups.remove(name, members)

    async def group_leave(self, name: str) -> GroupInfo:
        return await self.groups.leave(name)

    def group_list(self) -> list[GroupInfo]:
        return self.groups.all()

    def group_info(self, name: str) -> GroupInfo:
        return self.groups.info(name)

    async def send_group(self, name: str, text: str) -> bytes:
        return await self.groups.send(name, text)

    def group_history(self, name: str, limit: int = 50) -> list[StoredMessage]:
        return self.groups.history(name, limit)

    # ------------------------------------------------------------------ password verification
    def on_pake_request(self, callback: Callable[[str], None]) -> None:
        """Called with the contact's name when they start a password verification with us."""
        self._pake_listeners.append(callback)

    async def verify_password(self, name: str, password: str, *, timeout: float = 120.0) -> None:
        """SPAKE2 with ``name`` over the relay; raises VerificationError unless both sides succeed."""
        await verify_with_password(self, normalize_username(name), password, timeout=timeout)

    async def send_pake(self, name: str, body: bytes) -> None:
        await self._require_conn().request({"t": "send", "to": name, "id": os.urandom(16),
                                            "kind": "pake", "body": body})

    def record_pake_attempt(self, name: str, limit_per_hour: int) -> None:
        key = "pake_attempts:" + name
        recent = [t for t in (self.db.get_meta(key) or []) if now_ms() - t < 3600_000]
        if len(recent) >= limit_per_hour:
            wait_min = (3600_000 - (now_ms() - min(recent))) // 60_000 + 1
            raise ClientError(f"too many password verification attempts with {name}: each one is a "
                              f"guess an attacker could make, so at most {limit_per_hour} per hour "
                              f"(try again in {wait_min} min)")
        with self.db.transaction():
            self.db.set_meta(key, [*recent, now_ms()])

    async def ensure_contact(self, name: str) -> Contact:
        """The contact, pinning their identity from a fetched bundle (and starting a session) if new."""
        contact = self.db.get_contact(name)
        if contact is not None:
            return contact
        async with self._state_lock:
            session, with_psk = await self._sending_session(name)
            with self.db.transaction():
                self.db.save_session(session.session_id, name, session.peer.encode(), session.serialize(),
                                     now_ms(), with_psk=with_psk)
        return self.contact(name)

    def block_contact(self, name: str, reason: str) -> None:
        with self.db.transaction():
            self.db.set_blocked(name, reason)

    async def block(self, name: str) -> None:
        """Drop ``name``'s messages unseen from now on (acked, never stored); discards their pending
        requests; tells the relay when it supports blocks (client/blocks.py)."""
        name = normalize_username(name)
        if name == self.username:
            raise ClientError("you cannot block yourself")
        with self.db.transaction():
            self.blocks.set(name, True)
            self.requests.drop(name)
        if self.connected:
            await self.blocks.tell_relay(self._require_conn())

    async def unblock(self, name: str) -> None:
        name = normalize_username(name)
        if not self.blocks.is_blocked(name):
            raise ClientError(f"{name} is not blocked")
        with self.db.transaction():
            self.blocks.set(name, False)
        if self.connected:
            await self.blocks.tell_relay(self._require_conn())

    def is_blocked(self, name: str) -> bool:
        return self.blocks.is_blocked(name)

    def message_requests(self) -> list[Request]:
        return self.requests.pending()

    def accept_request(self, name: str) -> Contact:
        """Make the stranger ``name`` a contact, pinning the key their requests came under."""
        return self.requests.accept(normalize_username(name))

    def store_verification(self, name: str, identity: bytes, psk: bytes) -> None:
        """Pin ``identity`` as verified and keep the PSK for the next session (one record)."""
        with self.db.transaction():
            self.db.replace_identity(name, identity, verified=True, now=now_ms(), psk=psk)

    def _psk(self, name: str) -> bytes | None:
        contact = self.db.get_contact(name)
        return None if contact is None else contact.psk


def _grouped(digits: str) -> str:
    return " ".join(digits[i : i + 5] for i in range(0, len(digits), 5))
