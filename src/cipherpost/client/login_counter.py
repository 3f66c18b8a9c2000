"""One live copy of a profile: the login counter (issue 8 item 7, docs/accounts.md "Login counter").

Two copies of one profile (a copied folder, a restored backup) hold the same sending chains, so both
would encrypt new text under the same (key, nonce) pairs, and each would take the other's mail. The
profile therefore keeps a counter that only grows: it is incremented and committed *before* every
``auth``, and sent in it when the relay announces ``login_counter``. The relay keeps the highest
counter seen per account and refuses one that is not higher (``stale_profile``); a newer login
closes the older connections of the account (4001 "displaced by a newer login").

A copy that is refused marks itself stale, durably, and never tries again: otherwise it would
simply count past the relay's value on its next attempt and displace the live copy. The way out is
the newest copy of the profile, or ``cipherpost recover`` (a fresh identity, with the recovery code).
"""

from __future__ import annotations

from typing import Any

from ..crypto.identity import IdentityKeyPair
from .connection import Connection
from .errors import ServerError, StaleProfile
from .profile import ProfileDB

CAPABILITY = "login_counter"
COUNTER_KEY = "login_counter"
STALE_KEY = "stale_profile"
STALE_CODE = "stale_profile"

STALE_HELP = ("this is an old copy of the profile (copied, or restored from a backup): another copy "
              "has logged in since, and using both would reuse encryption keys. This copy is disabled; "
              "use the newest copy, or start a fresh identity with `cipherpost recover NAME` and your "
              "recovery code")


def check_not_stale(db: ProfileDB) -> None:
    """Raise :class:`StaleProfile` if this copy was refused by the relay before."""
    if db.get_meta(STALE_KEY):
        raise StaleProfile(STALE_HELP)


def next_counter(db: ProfileDB) -> int:
    """Increment the counter and commit it (before the ``auth`` that carries it is sent)."""
    with db.transaction():
        counter = int(db.get_meta(COUNTER_KEY) or 0) + 1
        db.set_meta(COUNTER_KEY, counter)
    return counter


async def authenticate(conn: Connection, db: ProfileDB, identity: IdentityKeyPair,
                       username: str) -> dict[str, Any]:
    """``auth`` with the login counter when the relay supports it; a refusal marks the copy stale."""
    check_not_stale(db)
    counter = next_counter(db) if CAPABILITY in conn.caps else None
    try:
        return await conn.authenticate(identity, username, counter)
    except ServerError as exc:
        if exc.code != STALE_CODE:
            raise
        with db.transaction():
            db.set_meta(STALE_KEY, True)
        raise StaleProfile(STALE_HELP) from None


def reset(db: ProfileDB) -> None:
    """A new identity for the account (``recover``): the relay's counter starts again from 0."""
    with db.transaction():
        db.set_meta(COUNTER_KEY, 0)
        db.set_meta(STALE_KEY, False)
