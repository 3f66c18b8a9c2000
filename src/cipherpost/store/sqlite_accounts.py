"""Accounts, names and blocks of the SQLite store (docs/contracts.md 1.2 blocks, 1.4, 1.5 epoch).

Functions of one connection, run on the store's writer thread inside its transaction
(:mod:`cipherpost.store.sqlite` submits them and drops its cached mailbox state where one changes
what a recipient accepts). Each checks before it writes, so a refusal leaves the batch intact.
Every change to an account is recorded in ``account_events`` (who, what, when, why).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ..protocol.errors import ProtocolError
from ..protocol.usernames import skeleton
from .base import (
    EPOCH_BYTES,
    MAX_BLOCKS,
    AccountDeleted,
    AccountInfo,
    AccountState,
    BlockListFull,
    InvalidInvite,
    InvalidName,
    NameConfusable,
    NameReserved,
    UnknownAccount,
    UsernameTaken,
)

ACTIVE = AccountState.ACTIVE.value
DELETED = AccountState.DELETED.value
_COLUMNS = ("username, identity, state, created_ms, recovery_public, login_counter, state_changed_ms, "
            "state_by, state_reason")


def now_ms() -> int:
    return int(time.time() * 1000)


def skeleton_of(name: str) -> str:
    """The look-alike form of a name (``protocol/usernames.py``); :class:`InvalidName` if not a name."""
    try:
        return skeleton(name)
    except ProtocolError:
        raise InvalidName(f"{name!r} is not a valid username") from None


def _event(conn: sqlite3.Connection, username: str, action: str, actor: str, reason: str) -> None:
    conn.execute("INSERT INTO account_events(ts, username, action, actor, reason) VALUES (?, ?, ?, ?, ?)",
                 (now_ms(), username, action, actor, reason))


def live_state(conn: sqlite3.Connection, username: str) -> str:
    """The account's state; :class:`UnknownAccount` when there is none, :class:`AccountDeleted`."""
    row = conn.execute("SELECT state FROM accounts WHERE username=?", (username,)).fetchone()
    if row is None:
        raise UnknownAccount(username)
    if row[0] == DELETED:
        raise AccountDeleted(username)
    return str(row[0])


def _check_name_free(conn: sqlite3.Connection, username: str, skel: str) -> None:
    row = conn.execute("SELECT state FROM accounts WHERE username=?", (username,)).fetchone()
    if row is not None:
        if row[0] == DELETED:
            raise NameReserved(f"{username!r} is reserved (a deleted account's name)")
        raise UsernameTaken(username)
    if conn.execute("SELECT 1 FROM reserved_names WHERE name=?", (username,)).fetchone():
        raise NameReserved(f"{username!r} is reserved")
    row = conn.execute("SELECT name FROM reserved_names WHERE skeleton=? ORDER BY name LIMIT 1",
                       (skel,)).fetchone()
    if row is not None:
        raise NameReserved(f"{username!r} looks like the reserved name {row[0]!r}")
    row = conn.execute("SELECT username, state FROM accounts WHERE skeleton=?", (skel,)).fetchone()
    if row is not None:
        if row[1] == DELETED:
            raise NameReserved(f"{username!r} looks like {row[0]!r}, a deleted account's reserved name")
        raise NameConfusable(username, row[0])


def create_account(conn: sqlite3.Connection, username: str, skel: str, identity: bytes, now: int,
                   invite_hash: bytes | None, recovery_public: bytes | None) -> None:
    if invite_hash is not None:
        row = conn.execute("SELECT expires_ms FROM invites WHERE token_hash=?", (invite_hash,)).fetchone()
        if row is None or row[0] < now:
            raise InvalidInvite("invite token is unknown, used or expired")
    _check_name_free(conn, username, skel)
    if invite_hash is not None:
        conn.execute("DELETE FROM invites WHERE token_hash=?", (invite_hash,))
    conn.execute("INSERT INTO accounts(username, identity, created_ms, skeleton, recovery_public) "
                 "VALUES (?, ?, ?, ?, ?)", (username, identity, now, skel, recovery_public))
    _event(conn, username, "create", "user", "")


def active_identity(conn: sqlite3.Connection, username: str) -> bytes | None:
    row = conn.execute("SELECT identity FROM accounts WHERE username=? AND state=?",
                       (username, ACTIVE)).fetchone()
    return None if row is None else bytes(row[0])


def _info(row: Sequence[Any]) -> AccountInfo:
    return AccountInfo(username=row[0], identity=bytes(row[1]), state=AccountState(row[2]),
                       created_ms=row[3], recovery_public=None if row[4] is None else bytes(row[4]),
                       login_counter=row[5], state_changed_ms=row[6], state_by=row[7], state_reason=row[8])


def get_account(conn: sqlite3.Connection, username: str) -> AccountInfo | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM accounts WHERE username=?", (username,)).fetchone()  # noqa: S608
    return None if row is None else _info(row)


def list_accounts(conn: sqlite3.Connection) -> list[AccountInfo]:
    return [_info(row) for row in conn.execute(f"SELECT {_COLUMNS} FROM accounts ORDER BY username")]  # noqa: S608


def set_state(conn: sqlite3.Connection, username: str, state: AccountState, by: str, reason: str) -> None:
    if live_state(conn, username) == state.value:
        return
    conn.execute("UPDATE accounts SET state=?, state_changed_ms=?, state_by=?, state_reason=? "
                 "WHERE username=?", (state.value, now_ms(), by, reason, username))
    _event(conn, username, state.value, by, reason)


def delete_account(conn: sqlite3.Connection, username: str, by: str, reason: str) -> bool:
    """Delete the mailbox (and shared bodies no longer referenced), prekeys, blocks both ways and the
    keys; keep the row as DELETED. False when it was deleted already."""
    try:
        live_state(conn, username)
    except AccountDeleted:
        return False
    body_ids = {r[0] for r in conn.execute("DELETE FROM messages WHERE recipient=? RETURNING body_id",
                                           (username,)).fetchall() if r[0] is not None}
    conn.executemany("DELETE FROM bodies WHERE id=? AND NOT EXISTS (SELECT 1 FROM messages WHERE body_id=?)",
                     [(body_id, body_id) for body_id in body_ids])
    conn.execute("DELETE FROM one_time_prekeys WHERE username=?", (username,))
    conn.execute("DELETE FROM blocks WHERE owner=? OR blocked=?", (username, username))
    conn.execute("UPDATE accounts SET state=?, identity=x'', signed_prekey=NULL, kem_last_resort=NULL, "
                 "recovery_public=NULL, login_counter=0, state_changed_ms=?, state_by=?, state_reason=? "
                 "WHERE username=?", (DELETED, now_ms(), by, reason, username))
    _event(conn, username, DELETED, by, reason)
    return True


def rebind_identity(conn: sqlite3.Connection, username: str, identity: bytes,
                    recovery_public: bytes | None) -> None:
    live_state(conn, username)
    conn.execute("UPDATE accounts SET identity=?, recovery_public=?, signed_prekey=NULL, "
                 "kem_last_resort=NULL, login_counter=0 WHERE username=?",
                 (identity, recovery_public, username))
    conn.execute("DELETE FROM one_time_prekeys WHERE username=?", (username,))
    _event(conn, username, "rebind", "user", "")


def set_recovery_public(conn: sqlite3.Connection, username: str, recovery_public: bytes) -> None:
    live_state(conn, username)
    conn.execute("UPDATE accounts SET recovery_public=? WHERE username=?", (recovery_public, username))
    _event(conn, username, "set_recovery", "user", "")


def bump_login(conn: sqlite3.Connection, username: str, counter: int) -> bool:
    row = conn.execute("SELECT login_counter, state FROM accounts WHERE username=?", (username,)).fetchone()
    if row is None or row[1] == DELETED:
        raise UnknownAccount(username)
    if counter < row[0]:
        return False
    if counter > row[0]:
        conn.execute("UPDATE accounts SET login_counter=? WHERE username=?", (counter, username))
    return True


def reserve(conn: sqlite3.Connection, names: Sequence[tuple[str, str]]) -> None:
    now = now_ms()
    conn.executemany("INSERT OR IGNORE INTO reserved_names(name, skeleton, created_ms) VALUES (?, ?, ?)",
                     [(name, skel, now) for name, skel in names])


def unreserve(conn: sqlite3.Connection, names: Sequence[str]) -> None:
    conn.executemany("DELETE FROM reserved_names WHERE name=?", [(name,) for name in names])


def reserved(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM reserved_names ORDER BY name")]


def set_block(conn: sqlite3.Connection, owner: str, blocked: str, blocked_on: bool) -> None:
    live_state(conn, owner)
    if conn.execute("SELECT 1 FROM accounts WHERE username=?", (blocked,)).fetchone() is None:
        raise UnknownAccount(blocked)
    if not blocked_on:
        conn.execute("DELETE FROM blocks WHERE owner=? AND blocked=?", (owner, blocked))
        return
    if conn.execute("SELECT 1 FROM blocks WHERE owner=? AND blocked=?", (owner, blocked)).fetchone():
        return
    if conn.execute("SELECT count(*) FROM blocks WHERE owner=?", (owner,)).fetchone()[0] >= MAX_BLOCKS:
        raise BlockListFull(f"an account blocks at most {MAX_BLOCKS} senders")
    conn.execute("INSERT INTO blocks(owner, blocked, created_ms) VALUES (?, ?, ?)",
                 (owner, blocked, now_ms()))


def blocked(conn: sqlite3.Connection, owner: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT blocked FROM blocks WHERE owner=? ORDER BY blocked", (owner,))]


def epoch(conn: sqlite3.Connection) -> bytes:
    return bytes(conn.execute("SELECT value FROM epoch WHERE id=1").fetchone()[0])


def renew_epoch(conn: sqlite3.Connection) -> bytes:
    value = os.urandom(EPOCH_BYTES)
    conn.execute("UPDATE epoch SET value=?, created_ms=? WHERE id=1", (value, now_ms()))
    return value
