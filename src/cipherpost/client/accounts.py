"""Accounts over their whole life, client side: recovery key, recovery, deletion (docs/accounts.md).

Each request is signed over the connection's fresh nonce and TLS channel (``Connection.bound_payload``),
under its own label, so a signature made for one request or one connection is valid for no other:

- ``register`` carries ``recovery_public`` (the relay stores it with the account, in one step);
- ``set_recovery``: identity key signs ``[nonce, channel, username, recovery_public]``, label
  ``set-recovery`` (``cipherpost recovery-key --new``: profiles made before recovery keys add one);
- ``recover``: the *recovery* key signs ``[nonce, channel, username, new_identity]`` under
  ``recover``, and the new identity key signs the same under ``recover-identity`` (it proves it holds
  the key it asks to be bound to);
- ``delete_account``: identity key signs ``[nonce, channel, username]``, label ``delete-account``.

All of them need the relay's ``accounts`` capability; without it they fail with a clear message.
"""

from __future__ import annotations

from typing import Any

from ..crypto.identity import IdentityKeyPair
from ..crypto.recovery import RecoveryKey
from .connection import Connection
from .errors import ClientError, RecoveryFailed, ServerError

CAPABILITY = "accounts"


def _require_capability(conn: Connection, what: str) -> None:
    if CAPABILITY not in conn.caps:
        raise ClientError(f"this relay does not support {what} (it announces no '{CAPABILITY}' "
                          "capability; its operator needs a newer cipherpost)")


async def register_or_recover(conn: Connection, identity: IdentityKeyPair, username: str,
                              invite: str | None, recovery: RecoveryKey | None
                              ) -> tuple[dict[str, Any], str | None]:
    """Bind ``username`` to ``identity``: a new account (with a fresh recovery key when the relay
    supports them; its code is returned, to be shown once) or, with ``recovery``, a recovered one."""
    if recovery is not None:
        return await recover(conn, identity, username, recovery), None
    if CAPABILITY not in conn.caps:
        return await conn.register(identity, username, invite), None
    key, code = RecoveryKey.generate()
    return await conn.register(identity, username, invite, key.public), code


async def set_recovery_key(conn: Connection, identity: IdentityKeyPair, username: str) -> str:
    """Give the (authenticated) account a new recovery key; returns its code, to be shown once.
    The previous code stops working when the relay has answered."""
    _require_capability(conn, "recovery keys")
    key, code = RecoveryKey.generate()
    sig = identity.sign("set-recovery", conn.bound_payload(username, key.public))
    await conn.request({"t": "set_recovery", "recovery_public": key.public, "sig": sig})
    return code


async def recover(conn: Connection, identity: IdentityKeyPair, username: str,
                  recovery: RecoveryKey) -> dict[str, Any]:
    """Rebind ``username`` to the new ``identity`` with the recovery key (unauthenticated connection;
    authenticated as ``username`` on success)."""
    _require_capability(conn, "account recovery")
    payload = conn.bound_payload(username, identity.public.encode())
    try:
        return await conn.request({"t": "recover", "username": username, "identity": identity.public.encode(),
                                   "recovery_sig": recovery.sign("recover", payload),
                                   "sig": identity.sign("recover-identity", payload)})
    except ServerError as exc:
        if exc.code in ("bad_recovery", "rate_limited", "unknown_user", "suspended"):
            raise RecoveryFailed(f"recovery refused: {exc.server_message}") from None
        raise


async def delete_account(conn: Connection, identity: IdentityKeyPair, username: str) -> None:
    """Delete the (authenticated) account on the relay: mailbox, prekeys, account; the name stays
    reserved there, so nobody else can take it and inherit the contacts' trust."""
    _require_capability(conn, "account deletion")
    await conn.request({"t": "delete_account",
                        "sig": identity.sign("delete-account", conn.bound_payload(username))})
