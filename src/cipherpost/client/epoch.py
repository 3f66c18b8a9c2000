"""The relay's store epoch (docs/contracts.md 1.5): republish prekeys after a restore or migration.

A relay restored from a backup (or moved by ``migrate-store``) holds one-time prekeys that were
already handed out. Its store then has a new epoch, which it sends in ``hello`` (cap ``epoch``).
The profile remembers the last epoch it published to, as an authenticated record (like the server
pin); when the relay's differs, the client publishes fresh prekeys with ``replace: true`` (the
relay drops the old one-time pools in the same transaction) and remembers the new epoch only once
the relay confirmed the upload. The old private prekeys stay in the prekey store (signed and
last-resort: the last two; one-time: until used or pushed out of ``MAX_POOL``), so initial messages
already in flight still decrypt.
"""

from __future__ import annotations

import hmac

from .connection import Connection
from .profile import ProfileDB

META_KEY = "relay_epoch"


def changed(db: ProfileDB, conn: Connection) -> bool:
    """True when the relay announces an epoch other than the remembered one. The first epoch seen
    is just remembered (a new profile's keys are fresh anyway)."""
    if "epoch" not in conn.caps or conn.epoch is None:
        return False
    known = db.get_secret_meta(META_KEY)
    if known is None:
        remember(db, conn)
        return False
    return not hmac.compare_digest(known, conn.epoch)


def remember(db: ProfileDB, conn: Connection) -> None:
    """Call only after the relay confirmed the republished prekeys."""
    if conn.epoch is not None:
        with db.transaction():
            db.set_secret_meta(META_KEY, conn.epoch)
