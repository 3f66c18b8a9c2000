"""Accounts over their whole life, relay side (docs/accounts.md, docs/wire.md "Accounts").

Handlers wired into ``server/connection.py``'s ``_HANDLERS``: ``set_recovery``, ``recover`` (allowed
before authentication) and ``delete_account``; plus the checks every login goes through
(:func:`login_identity`: account state; :func:`check_counter`: one live copy of a profile;
:func:`displace_older`: a newer login closes the older connections of the account).

Every request is signed over ``pack([nonce, channel, ...])``: the connection's fresh nonce and the
SHA-256 of the relay's TLS certificate, as ``auth`` is (docs/wire.md "Connection start"), each under
its own label, so a signature is valid for one request on one connection only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives.asymmetric import ed25519

from ...crypto.encoding import pack
from ...crypto.errors import CryptoError, InvalidSignature
from ...crypto.identity import PublicIdentity
from ...crypto.recovery import verify_recovery
from ...protocol import errors as E
from ...protocol.errors import ProtocolError
from ...protocol.frames import DeleteAccount, Ok, Recover, SetRecovery, encode_frame
from ...protocol.usernames import require_normalized
from ...store.base import (
    AccountDeleted,
    AccountInfo,
    AccountState,
    InvalidInvite,
    NameConfusable,
    NameReserved,
    UnknownAccount,
    UsernameTaken,
)
from ..limits import retry_text

if TYPE_CHECKING:
    from ..app import RelayServer
    from ..connection import Connection

log = logging.getLogger("cipherpost.server")

CAPS: Final = ("accounts", "login_counter")  # announced in hello (docs/contracts.md section 5)
CLOSE_DISPLACED: Final = 4001   # WebSocket close codes (private use range, RFC 6455 section 7.4.2)
CLOSE_RECOVERED: Final = 4002
CLOSE_ACCOUNT_GONE: Final = 4003  # deleted or suspended (by its owner or the operator)
_ENDINGS: Final = {"recovered": (CLOSE_RECOVERED, "the account was recovered on another device"),
                   "deleted": (CLOSE_ACCOUNT_GONE, "account deleted")}
_DISPLACED: Final = "displaced="  # + the newer login's counter (bus control messages)


def _payload(conn: Connection, *items: bytes | str) -> bytes:
    return pack([conn.nonce, conn.server.channel_binding, *items])


def _network(conn: Connection) -> str:
    """`` prefix=...`` for logs, only when the operator logs addresses (docs/server.md "Logs")."""
    return f" prefix={conn.prefix}" if conn.config.log_peer_addresses else ""


def check_recovery_public(public: bytes | None) -> None:
    """A recovery public key must be a valid Ed25519 public key (32 bytes)."""
    if public is None:
        return
    try:
        if len(public) != 32:
            raise ValueError
        ed25519.Ed25519PublicKey.from_public_bytes(public)
    except ValueError:
        raise ProtocolError(E.BAD_FRAME, "recovery_public is not an Ed25519 public key") from None


def _state_error(username: str, info: AccountInfo | None) -> ProtocolError | None:
    if info is None:
        return ProtocolError(E.UNKNOWN_USER, f"no account named {username!r} on this server")
    if info.state is AccountState.DELETED:
        return ProtocolError(E.UNKNOWN_USER, f"the account {username!r} was deleted")
    if info.state is AccountState.SUSPENDED:
        return ProtocolError(E.SUSPENDED, f"the account {username!r} is suspended by the relay's operator")
    return None


async def not_active(conn: Connection, username: str) -> ProtocolError:
    """The error for a request about an account the store says is not ACTIVE (a sender's first
    contact with a suspended account is told so, not "no account")."""
    info = await conn.store.get_account(username)
    return _state_error(username, info) or ProtocolError(E.UNKNOWN_USER, f"no account named {username!r}")


# --- login: state, one live copy -----------------------------------------------------------------

async def login_identity(conn: Connection, username: str) -> tuple[PublicIdentity, AccountInfo]:
    """The account's current identity for ``auth``, read fresh from the store: a suspension or a
    deletion by the operator, or a recovery through another relay instance, counts at once."""
    info = await conn.store.get_account(username)
    error = _state_error(username, info)
    if error is not None:
        if error.code == E.UNKNOWN_USER:  # like a bad proof: probing names costs the same
            raise await conn.count_auth_failure(error.message, E.UNKNOWN_USER)
        raise error
    assert info is not None
    identity = await conn.server.identity_of(username)
    if identity is None or identity.encode() != info.identity:
        try:
            identity = PublicIdentity.decode(info.identity)
        except CryptoError:
            log.error("event=stored_identity_invalid user=%s", username)
            raise ProtocolError(E.INTERNAL, "the stored identity of this account is damaged") from None
        conn.server.remember_identity(username, identity)
    return identity, info


async def check_counter(conn: Connection, username: str, info: AccountInfo, counter: int | None) -> None:
    """Refuse a login whose counter is not above the highest seen (``stale_profile``), after the
    proof was checked: nobody but the key holder can move the counter."""
    if counter is None:
        if info.login_counter > 0:  # the account's profile counts logins; this one does not
            raise ProtocolError(E.STALE_PROFILE, "this account logs in with a login counter and this "
                                "login has none: an old cipherpost version, or an old copy of the profile")
        return
    if counter <= info.login_counter or not await conn.store.bump_login(username, counter):
        log.warning("event=stale_profile user=%s peer=%s counter=%d", username, conn.peer, counter)
        raise ProtocolError(E.STALE_PROFILE, "this is an old copy of the profile: a newer copy has logged "
                            "in since, and using both would reuse encryption keys")


def displace_older(conn: Connection, username: str, counter: int | None) -> None:
    """A login with a counter closes every other connection of the account (one live copy), here
    and, through the bus, on the other relay instances (``on_control``)."""
    if counter is None:
        return
    conn.login_counter = counter
    for other in conn.server.connections_of(username):
        if other is not conn and not other.closed:
            log.info("event=displaced user=%s peer=%s by=%s", username, other.peer, conn.peer)
            other.close_now(CLOSE_DISPLACED, "displaced by a newer login")
    conn.server.bus.control(f"{_DISPLACED}{counter}", username)


def close_account_connections(conn: Connection, username: str, what: str) -> None:
    """Close the account's other connections, on every instance (``what``: recovered, deleted)."""
    code, reason = _ENDINGS[what]
    for other in conn.server.connections_of(username):
        if other is not conn and not other.closed:
            other.close_now(code, reason)
    conn.server.identity_changed(username)  # forget the cached identity here and on the others
    conn.server.bus.control(what, username)


def on_control(server: RelayServer, what: str, username: str) -> None:
    """Another instance displaced, recovered or deleted ``username``: close its connections here."""
    ending = _ENDINGS.get(what)
    newer: int | None = None
    if what.startswith(_DISPLACED):
        try:
            newer = int(what.removeprefix(_DISPLACED))
        except ValueError:
            return
        ending = (CLOSE_DISPLACED, "displaced by a newer login")
    if ending is None:
        return
    for conn in server.connections_of(username):
        if conn.closed:
            continue
        if newer is not None and conn.login_counter is not None and conn.login_counter >= newer:
            continue  # a login newer than the one announced (the messages crossed)
        conn.close_now(*ending)


async def create_account(conn: Connection, username: str, identity: bytes, now_ms: int,
                         invite_hash: bytes | None, recovery_public: bytes | None) -> None:
    """``register``'s store step, with a clear error for each refusal (docs/accounts.md "Names")."""
    try:
        await conn.store.create_account(username, identity, now_ms, invite_hash, recovery_public)
    except NameConfusable as exc:
        raise ProtocolError(E.NAME_CONFUSABLE, f"{username!r} is too easily confused with the existing "
                            f"name {exc.similar_to!r}; choose another") from None
    except NameReserved:
        raise ProtocolError(E.NAME_RESERVED, f"{username!r} (or a name that looks like it) is reserved "
                            "on this server; choose another") from None
    except UsernameTaken:
        raise ProtocolError(E.USERNAME_TAKEN, f"username {username!r} is taken") from None
    except InvalidInvite:
        raise ProtocolError(E.BAD_INVITE, "invite token is unknown, already used or expired") from None


# --- handlers ------------------------------------------------------------------------------------

async def set_recovery(conn: Connection, frame: SetRecovery) -> None:
    assert conn.username is not None
    username = conn.username
    check_recovery_public(frame.recovery_public)
    identity = await conn.server.identity_of(username)
    assert identity is not None
    try:
        identity.verify("set-recovery", _payload(conn, username, frame.recovery_public), frame.sig)
    except CryptoError:
        raise ProtocolError(E.BAD_SIGNATURE, "set_recovery: signature does not verify for this "
                                             "account, nonce and server certificate") from None
    await conn.store.set_recovery_public(username, frame.recovery_public)
    log.info("event=recovery_key_set user=%s peer=%s", username, conn.peer)
    conn.push_frame(encode_frame(Ok(rid=frame.rid)))


async def recover(conn: Connection, frame: Recover) -> None:
    """Rebind a name to a new identity with the recovery key (docs/accounts.md "Recovery")."""
    if conn.username is not None:
        raise ProtocolError(E.ALREADY_AUTHENTICATED, f"already authenticated as {conn.username}")
    username = require_normalized(frame.username)
    try:
        identity = PublicIdentity.decode(frame.identity)
    except InvalidSignature:
        raise ProtocolError(E.BAD_SIGNATURE, "identity binding signature does not verify") from None
    except CryptoError as exc:
        raise ProtocolError(E.BAD_FRAME, f"recover: bad identity ({exc})") from None
    prefix = conn.prefix
    info = await conn.store.get_account(username)
    error = _state_error(username, info)
    if error is not None:
        raise error
    assert info is not None
    if info.recovery_public is None:
        raise ProtocolError(E.BAD_RECOVERY, f"the account {username!r} has no recovery key")
    # A recovery key is a password-equivalent: every attempt spends a unit per account and per
    # network, before the signature is even looked at (docs/server.md "Recovery attempts").
    limits = conn.server.limiters
    for limiter, key, where in ((limits.recovery_prefix, prefix, "from your network"),
                                (limits.recovery_account, username, "for this account")):
        decision = await limiter.peek(key)
        if not decision.allowed:
            log.warning("event=recovery_limited user=%s peer=%s%s", username, conn.peer, _network(conn))
            raise ProtocolError(E.RATE_LIMITED, f"too many recovery attempts {where} ({limiter.limit} per "
                                                f"hour); {retry_text(decision)}")
    await limits.recovery_prefix.hit(prefix)
    await limits.recovery_account.hit(username)
    payload = _payload(conn, username, frame.identity)
    try:
        verify_recovery(info.recovery_public, "recover", payload, frame.recovery_sig)
    except CryptoError:
        log.warning("event=recovery_failed user=%s peer=%s%s", username, conn.peer, _network(conn))
        await conn.count_auth_failure("recovery key does not verify")
        raise ProtocolError(E.BAD_RECOVERY, "the recovery code does not match this account") from None
    try:
        identity.verify("recover-identity", payload, frame.sig)
    except CryptoError:
        raise ProtocolError(E.BAD_SIGNATURE, "recover: the new identity's proof of possession does not "
                                             "verify") from None
    try:
        await conn.store.rebind_identity(username, frame.identity, info.recovery_public)
    except AccountDeleted:
        raise ProtocolError(E.UNKNOWN_USER, f"the account {username!r} was deleted") from None
    except UnknownAccount:
        raise ProtocolError(E.UNKNOWN_USER, f"no account named {username!r} on this server") from None
    close_account_connections(conn, username, "recovered")
    conn.server.remember_identity(username, identity)
    log.warning("event=account_recovered user=%s identity=%s peer=%s%s", username, identity.short_id(),
                conn.peer, _network(conn))
    conn.push_frame(encode_frame(Ok(rid=frame.rid, username=username)))
    conn.authenticated_as(username)


async def delete_account(conn: Connection, frame: DeleteAccount) -> None:
    assert conn.username is not None
    username = conn.username
    identity = await conn.server.identity_of(username)
    assert identity is not None
    try:
        identity.verify("delete-account", _payload(conn, username), frame.sig)
    except CryptoError:
        raise ProtocolError(E.BAD_SIGNATURE, "delete_account: signature does not verify for this "
                                             "account, nonce and server certificate") from None
    await conn.store.delete_account(username, "user", "deleted by its owner")
    log.warning("event=account_deleted user=%s by=user peer=%s", username, conn.peer)
    conn.push_frame(encode_frame(Ok(rid=frame.rid)))
    close_account_connections(conn, username, "deleted")
    conn.close_after_flush(CLOSE_ACCOUNT_GONE, "account deleted")
