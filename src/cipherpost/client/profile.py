"""The client's local database: contacts, sessions, history and outbox, in one SQLite file.

Message bodies, session states and the prekey store are encrypted with the profile's record key
(:class:`cipherpost.crypto.records.RecordCipher`), each bound to its row by associated data so rows
cannot be swapped. Contact names, message ids and timestamps are stored in the clear (see
docs/at-rest.md). Every multi-step change (decrypt -> store message + new ratchet state) happens in
one transaction, so a crash leaves either the old or the new state, never half of each.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..crypto.encoding import pack, unpack
from ..crypto.errors import CryptoError
from ..crypto.records import RecordCipher
from .errors import ClientError, ProfileError
from .plaintext import pad, unpad

SCHEMA_VERSION = 1
SESSIONS_KEPT_PER_CONTACT = 5
# Message records: RECORD_V2 + pad(msgpack [text, extra]), padded like the wire (plaintext.PAD_BLOCK)
# so a record's length shows a bucket, not the text's exact length. Records written before
# (a bare msgpack map, first byte 0x8N) are still read.
MESSAGE_RECORD_V2 = 0x02
MAX_MESSAGE_RECORD = 4 << 20


def encode_message_record(text: str, extra: dict[str, Any]) -> bytes:
    return bytes([MESSAGE_RECORD_V2]) + pad(pack([text, extra]))


def decode_message_record(plain: bytes) -> tuple[str, dict[str, Any]]:
    text: Any = None
    extra: Any = None
    try:
        if plain[:1] == bytes([MESSAGE_RECORD_V2]):
            a = unpack(unpad(plain[1:]), what="message record", max_size=MAX_MESSAGE_RECORD)
            if isinstance(a, list) and len(a) == 2:
                text, extra = a
        else:   # written before padding (the first slice's format)
            m = unpack(plain, what="message record", max_size=MAX_MESSAGE_RECORD)
            if isinstance(m, dict):
                text, extra = m.get("text"), m.get("extra", {})
    except (CryptoError, ClientError) as exc:
        raise ProfileError(f"a message record is damaged ({exc})") from None
    if not isinstance(text, str) or not isinstance(extra, dict):
        raise ProfileError("a message record is damaged")
    return text, extra

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS contacts(
    name TEXT PRIMARY KEY,
    trust BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions(
    session_id BLOB PRIMARY KEY,
    contact TEXT NOT NULL,
    identity BLOB NOT NULL,
    state BLOB NOT NULL,
    with_psk INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_contact ON sessions(contact, updated_at);
CREATE TABLE IF NOT EXISTS messages(
    id INTEGER PRIMARY KEY,
    contact TEXT NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out', 'event')),
    msg_id BLOB NOT NULL,
    body BLOB NOT NULL,
    sent_at INTEGER,
    received_at INTEGER,
    status TEXT NOT NULL,
    UNIQUE(contact, direction, msg_id)
);
CREATE TABLE IF NOT EXISTS accepted_sessions(
    session_id BLOB PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox(
    seq INTEGER PRIMARY KEY,
    msg_id BLOB NOT NULL UNIQUE,
    contact TEXT NOT NULL,
    kind TEXT NOT NULL,
    envelope BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Contact:
    """What we trust about a contact. Stored encrypted and bound to the name, so editing the
    database file cannot swap a pinned key or forge a "verified" mark (docs/at-rest.md)."""

    name: str
    identity: bytes
    verified: bool
    pending_identity: bytes | None
    added_at: int
    verified_at: int | None
    blocked: str | None = None   # why sending is blocked (a failed verification), if it is
    psk: bytes | None = field(default=None, repr=False)   # from a password verification

    def encode(self) -> bytes:
        return pack([1, self.identity, self.verified, self.pending_identity, self.added_at,
                     self.verified_at, self.blocked, self.psk])


@dataclass(frozen=True)
class StoredMessage:
    row: int
    contact: str
    direction: str
    msg_id: bytes
    text: str
    sent_at: int | None
    received_at: int | None
    status: str
    extra: dict[str, Any]


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    msg_id: bytes
    contact: str
    kind: str
    envelope: bytes


class ProfileDB:
    def __init__(self, path: Path, cipher: RecordCipher):
        self._cipher = cipher
        new = not path.exists()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            if new:
                path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Freed space (a replaced ratchet state, a used prekey) is overwritten with zeros, and
            # superseded page versions leave the WAL at the next scrub (see _scrub).
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise ProfileError(f"{path}: unsupported profile schema version {row[0]!r}")
            self._scrub()   # states superseded before a crash leave the WAL now
        except sqlite3.DatabaseError as exc:
            raise ProfileError(f"{path}: profile database is damaged or unreadable ({exc})") from None
        self._depth = 0
        self._superseded = False

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._scrub()
        self._db.close()

    def _scrub(self) -> None:
        """Copy the WAL into the database and truncate it to zero bytes.

        In WAL mode every commit appends the new version of each page it changed; the versions
        it replaced stay in ``profile.db-wal`` until a checkpoint, each one a readable old ratchet
        state for whoever has the passphrase (forward secrecy on the device lost). A TRUNCATE
        checkpoint writes the newest versions into ``profile.db`` (where ``secure_delete`` has
        zeroed freed space) and empties the WAL file. It runs after each commit that replaced
        secret state (a ratchet state, the prekey store, a contact's record), once per commit, so a
        batch of messages in one transaction pays it once. Blocks the filesystem or SSD freed are
        out of scope (docs/at-rest.md).
        """
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _open(self, blob: bytes, *, aad: bytes) -> bytes:
        """Decrypt a record; a failure means the file was damaged or edited behind our back."""
        try:
            return self._cipher.decrypt(blob, aad=aad)
        except CryptoError:
            what = aad.split(b":")[0].decode("ascii", "replace")
            raise ProfileError(f"a {what} record in the profile database is damaged or was tampered "
                               "with; refusing to use it") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; nested uses join the outer transaction."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
            if self._superseded:
                self._superseded = False
                self._scrub()
        finally:
            self._depth = 0
            self._superseded = False

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested step inside :meth:`transaction`: on an exception only this step is undone."""
        self._db.execute("SAVEPOINT step")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO step")
            self._db.execute("RELEASE step")
            raise
        else:
            self._db.execute("RELEASE step")

    # -- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else unpack(row[0], what=f"meta {key}")

    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, pack(value)))

    def get_secret_meta(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        return self._open(row[0], aad=b"meta:" + key.encode())

    def set_secret_meta(self, key: str, value: bytes) -> None:
        self._superseded = True
        blob = self._cipher.encrypt(value, aad=b"meta:" + key.encode())
        self._db.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, blob))

    # -- contacts ---------------------------------------------------------------------------
    def _contact(self, name: str, blob: bytes) -> Contact:
        a = unpack(self._open(blob, aad=b"contact:" + name.encode()), what="contact")
        if not isinstance(a, list) or len(a) != 8 or a[0] != 1:
            raise ProfileError(f"contact record for {name!r} is damaged")
        return Contact(name, a[1], bool(a[2]), a[3], a[4], a[5], a[6], a[7])

    def _put_contact(self, contact: Contact) -> None:
        self._superseded = True
        blob = self._cipher.encrypt(contact.encode(), aad=b"contact:" + contact.name.encode())
        self._db.execute("INSERT OR REPLACE INTO contacts(name, trust) VALUES(?, ?)", (contact.name, blob))

    def get_contact(self, name: str) -> Contact | None:
        row = self._db.execute("SELECT trust FROM contacts WHERE name=?", (name,)).fetchone()
        return None if row is None else self._contact(name, row[0])

    def list_contacts(self) -> list[Contact]:
        rows = self._db.execute("SELECT name, trust FROM contacts ORDER BY name").fetchall()
        return [self._contact(r[0], r[1]) for r in rows]

    def contact_names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM contacts ORDER BY name")]

    def add_contact(self, name: str, identity: bytes, now: int) -> None:
        if self.get_contact(name) is not None:
            raise ProfileError(f"contact {name!r} exists already")
        self._put_contact(Contact(name, identity, False, None, now, None))

    def _require(self, name: str) -> Contact:
        contact = self.get_contact(name)
        if contact is None:
            raise ProfileError(f"no contact {name!r}")
        return contact

    def set_pending_identity(self, name: str, identity: bytes | None) -> None:
        self._put_contact(replace(self._require(name), pending_identity=identity))

    def set_blocked(self, name: str, reason: str | None) -> None:
        self._put_contact(replace(self._require(name), blocked=reason))

    def replace_identity(self, name: str, identity: bytes, *, verified: bool, now: int,
                         psk: bytes | None = None) -> None:
        """Pin ``identity`` for ``name``; clears a pending change and a block. A PSK is kept only
        for the same key (it was verified for that key) or replaced by a new one."""
        old = self._require(name)
        keep_psk = psk if psk is not None else (old.psk if identity == old.identity else None)
        self._put_contact(replace(old, identity=identity, pending_identity=None, verified=verified,
                                  verified_at=now if verified else None, blocked=None, psk=keep_psk))
        self.drop_sessions_except(name, [identity])

    # -- sessions ---------------------------------------------------------------------------
    @staticmethod
    def _session_aad(session_id: bytes, contact: str, identity: bytes, with_psk: bool) -> bytes:
        # The clear columns are bound into the record's tag: editing the file cannot move a
        # session to another contact or key, or pretend it mixed in a verification PSK.
        return b"session:" + pack([session_id, contact, identity, with_psk])

    def _session_row(self, row: tuple[Any, ...]) -> tuple[str, bytes, bytes, bool]:
        session_id, contact, identity, blob, with_psk = row
        state = self._open(blob, aad=self._session_aad(session_id, contact, identity, bool(with_psk)))
        return contact, identity, state, bool(with_psk)

    def get_session(self, session_id: bytes) -> tuple[str, bytes, bytes, bool] | None:
        """``(contact, peer identity, decrypted state, with_psk)`` of a stored session."""
        row = self._db.execute(
            "SELECT session_id, contact, identity, state, with_psk FROM sessions WHERE session_id=?",
            (session_id,)).fetchone()
        return None if row is None else self._session_row(row)

    def latest_session(self, contact: str, identity: bytes, *, with_psk: bool = False
                       ) -> tuple[bytes, bytes] | None:
        """``(session_id, state)`` of the most recently used session with this identity.

        ``with_psk`` restricts the choice to sessions whose PQXDH secret mixed in the contact's
        verification key (used once a contact is verified by password).
        """
        row = self._db.execute(
            "SELECT session_id, contact, identity, state, with_psk FROM sessions"
            " WHERE contact=? AND identity=? AND with_psk>=?"
            " ORDER BY updated_at DESC, rowid DESC LIMIT 1", (contact, identity, int(with_psk))).fetchone()
        return None if row is None else (row[0], self._session_row(row)[2])

    def save_session(self, session_id: bytes, contact: str, identity: bytes, state: bytes,
                     now: int, *, with_psk: bool = False) -> None:
        self._superseded = True
        existing = self._db.execute("SELECT contact, identity, with_psk FROM sessions WHERE session_id=?",
                                    (session_id,)).fetchone()
        if existing is not None:
            if existing[0] != contact or existing[1] != identity:
                raise ProfileError("a session record does not belong to this contact; refusing it")
            with_psk = bool(existing[2])   # fixed when the session was created
        blob = self._cipher.encrypt(state, aad=self._session_aad(session_id, contact, identity, with_psk))
        self._db.execute(
            "INSERT INTO sessions(session_id, contact, identity, state, with_psk, updated_at)"
            " VALUES(?,?,?,?,?,?) ON CONFLICT(session_id) DO UPDATE SET state=excluded.state,"
            " updated_at=excluded.updated_at",
            (session_id, contact, identity, blob, int(with_psk), now))
        # Keep a few older sessions per key: a peer may still be sending on one (simultaneous
        # initiation). Counted per identity, so sessions injected under other keys cannot evict
        # the genuine ones.
        self._db.execute(
            "DELETE FROM sessions WHERE contact=? AND identity=? AND session_id NOT IN (SELECT session_id"
            " FROM sessions WHERE contact=? AND identity=? ORDER BY updated_at DESC, rowid DESC LIMIT ?)",
            (contact, identity, contact, identity, SESSIONS_KEPT_PER_CONTACT))

    def drop_sessions_except(self, contact: str, identities: list[bytes]) -> None:
        """Forget sessions with keys that are neither pinned nor pending for ``contact``."""
        self._superseded = True
        marks = ",".join("?" * len(identities))
        self._db.execute(f"DELETE FROM sessions WHERE contact=? AND identity NOT IN ({marks})",  # noqa: S608
                         (contact, *identities))

    def delete_session(self, session_id: bytes, contact: str) -> None:
        self._db.execute("DELETE FROM sessions WHERE session_id=? AND contact=?", (session_id, contact))

    def session_was_accepted(self, session_id: bytes) -> bool:
        """Whether an initial message with this session id was ever accepted (kept after the
        session itself is pruned: a replayed initial message that used only the last-resort KEM key
        and no one-time prekey would otherwise start the session again; PQXDH spec section 4.2)."""
        return self._db.execute("SELECT 1 FROM accepted_sessions WHERE session_id=?",
                                (session_id,)).fetchone() is not None

    def mark_session_accepted(self, session_id: bytes) -> None:
        self._db.execute("INSERT OR IGNORE INTO accepted_sessions VALUES(?)", (session_id,))

    # -- messages ---------------------------------------------------------------------------
    def add_message(self, contact: str, direction: str, msg_id: bytes, text: str, *,
                    sent_at: int | None, received_at: int | None, status: str,
                    extra: dict[str, Any] | None = None) -> int | None:
        """Store a message; ``None`` if (contact, direction, msg_id) is already stored (a duplicate)."""
        plain = encode_message_record(text, extra or {})
        aad = b"message:" + direction.encode() + b":" + contact.encode() + b":" + msg_id
        cur = self._db.execute(
            "INSERT OR IGNORE INTO messages(contact, direction, msg_id, body, sent_at, received_at, status)"
            " VALUES(?,?,?,?,?,?,?)",
            (contact, direction, msg_id, self._cipher.encrypt(plain, aad=aad), sent_at, received_at,
             status))
        return cur.lastrowid if cur.rowcount == 1 else None

    def has_unshown(self) -> bool:
        return self._db.execute("SELECT 1 FROM messages WHERE status IN ('new', 'request') LIMIT 1"
                                ).fetchone() is not None

    def has_message(self, contact: str, direction: str, msg_id: bytes) -> bool:
        return self._db.execute(
            "SELECT 1 FROM messages WHERE contact=? AND direction=? AND msg_id=?",
            (contact, direction, msg_id)).fetchone() is not None

    def set_status(self, rows: list[int], status: str) -> None:
        self._db.executemany("UPDATE messages SET status=? WHERE id=?", [(status, r) for r in rows])

    def release_held(self, contact: str, identity: bytes) -> None:
        """Show the messages held back from ``contact`` that came under ``identity``."""
        rows = self._db.execute(f"SELECT {self._COLUMNS} FROM messages WHERE contact=? AND status='held'",  # noqa: S608
                                (contact,)).fetchall()
        held = [self._message(r) for r in rows]
        self.set_status([m.row for m in held if m.extra.get("key") == identity], "new")

    def replace_text(self, row: int, text: str, extra: dict[str, Any] | None = None) -> None:
        """Rewrite the text of a stored message (a collapsed notice counting its repeats)."""
        found = self._db.execute("SELECT contact, direction, msg_id FROM messages WHERE id=?",
                                 (row,)).fetchone()
        if found is None:
            return
        contact, direction, msg_id = found
        aad = b"message:" + direction.encode() + b":" + contact.encode() + b":" + msg_id
        blob = self._cipher.encrypt(encode_message_record(text, extra or {}), aad=aad)
        self._db.execute("UPDATE messages SET body=? WHERE id=?", (blob, row))

    def messages_of(self, contact: str, statuses: tuple[str, ...]) -> list[StoredMessage]:
        marks = ",".join("?" * len(statuses))
        rows = self._db.execute(
            f"SELECT {self._COLUMNS} FROM messages WHERE contact=? AND status IN ({marks}) ORDER BY id",  # noqa: S608
            (contact, *statuses)).fetchall()
        return [self._message(r) for r in rows]

    def message(self, contact: str, direction: str, msg_id: bytes) -> StoredMessage | None:
        row = self._db.execute(
            f"SELECT {self._COLUMNS} FROM messages WHERE contact=? AND direction=? AND msg_id=?",  # noqa: S608
            (contact, direction, msg_id)).fetchone()
        return None if row is None else self._message(row)

    def set_status_by_id(self, msg_id: bytes, direction: str, status: str) -> None:
        self._db.execute("UPDATE messages SET status=? WHERE msg_id=? AND direction=?",
                         (status, msg_id, direction))

    def mark_sent(self, outcomes: list[tuple[str, bytes, str]]) -> None:
        """For each ``(contact, msg_id, status)`` of an outgoing message: set its status and drop it
        from the outbox (client/outbox.py; the (contact, direction, msg_id) index, not a scan)."""
        self._db.executemany("UPDATE messages SET status=? WHERE contact=? AND direction='out' AND msg_id=?",
                             [(status, contact, msg_id) for contact, msg_id, status in outcomes])
        self._db.executemany("DELETE FROM outbox WHERE msg_id=?", [(msg_id,) for _, msg_id, _ in outcomes])

    def _message(self, row: tuple[Any, ...]) -> StoredMessage:
        rid, contact, direction, msg_id, body, sent_at, received_at, status = row
        aad = b"message:" + direction.encode() + b":" + contact.encode() + b":" + msg_id
        text, extra = decode_message_record(self._open(body, aad=aad))
        return StoredMessage(rid, contact, direction, msg_id, text, sent_at, received_at, status, extra)

    _COLUMNS = "id, contact, direction, msg_id, body, sent_at, received_at, status"

    def history(self, contact: str, limit: int = 50) -> list[StoredMessage]:
        rows = self._db.execute(
            f"SELECT {self._COLUMNS} FROM messages WHERE contact=? ORDER BY id DESC LIMIT ?",  # noqa: S608
            (contact, limit)).fetchall()
        return [self._message(r) for r in reversed(rows)]

    def message_by_id(self, msg_id: bytes, direction: str = "in") -> StoredMessage | None:
        row = self._db.execute(f"SELECT {self._COLUMNS} FROM messages WHERE msg_id=? AND direction=? "  # noqa: S608
                               "ORDER BY id LIMIT 1", (msg_id, direction)).fetchone()
        return None if row is None else self._message(row)

    def rows_with_status(self, status: str, *more: str) -> list[tuple[int, str]]:
        """``(row, status)`` of the messages with one of these statuses, without decrypting them."""
        marks = ",".join("?" * (1 + len(more)))
        return [(r[0], r[1]) for r in self._db.execute(
            f"SELECT id, status FROM messages WHERE status IN ({marks}) ORDER BY id", (status, *more))]  # noqa: S608

    def messages_with_status(self, status: str, *more: str) -> list[StoredMessage]:
        marks = ",".join("?" * (1 + len(more)))
        rows = self._db.execute(
            f"SELECT {self._COLUMNS} FROM messages WHERE status IN ({marks}) ORDER BY id",  # noqa: S608
            (status, *more)).fetchall()
        return [self._message(r) for r in rows]

    # -- outbox -----------------------------------------------------------------------------
    def add_outbox(self, msg_id: bytes, contact: str, kind: str, envelope: bytes, now: int) -> None:
        self._db.execute(
            "INSERT INTO outbox(msg_id, contact, kind, envelope, created_at) VALUES(?,?,?,?,?)",
            (msg_id, contact, kind, envelope, now))

    def outbox(self) -> list[OutboxItem]:
        rows = self._db.execute(
            "SELECT seq, msg_id, contact, kind, envelope FROM outbox ORDER BY seq").fetchall()
        return [OutboxItem(*r) for r in rows]

    def remove_outbox(self, msg_id: bytes) -> None:
        self._db.execute("DELETE FROM outbox WHERE msg_id=?", (msg_id,))
