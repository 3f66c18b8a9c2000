"""The user's block list: senders whose messages are acked and dropped unseen.

Kept as one sealed record (``meta: blocked``, encrypted and authenticated with the record key, so
editing profile.db cannot silently unblock someone). Each entry also remembers whether the relay
has been told: a relay that announces the ``block`` capability (docs/contracts.md section 5) gets
``block {rid, username, on}`` and may then drop the messages itself; until then, and with relays
that do not support it, the client drops them. Unblocking is told the same way.
"""

from __future__ import annotations

from typing import Final

from ..crypto.encoding import pack, unpack
from .connection import Connection
from .errors import ServerError
from .profile import ProfileDB

BLOCK_CAP: Final = "block"
_META: Final = "blocked"


class BlockList:
    def __init__(self, db: ProfileDB) -> None:
        self._db = db
        blob = db.get_secret_meta(_META)
        raw = unpack(blob, what="block list") if blob is not None else {}
        # name -> (blocked, told the relay)
        self._entries: dict[str, tuple[bool, bool]] = {
            str(k): (bool(v[0]), bool(v[1])) for k, v in (raw.items() if isinstance(raw, dict) else [])}

    def is_blocked(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry[0]

    def blocked(self) -> list[str]:
        return sorted(n for n, (on, _) in self._entries.items() if on)

    def set(self, name: str, on: bool) -> None:
        """Record a block or unblock (call inside a transaction); the relay is told later."""
        self._entries[name] = (on, False)
        self._save()

    def _save(self) -> None:
        self._db.set_secret_meta(_META, pack({n: [on, told] for n, (on, told) in self._entries.items()}))

    async def tell_relay(self, conn: Connection) -> int:
        """Send the blocks and unblocks the relay has not confirmed, if it supports them."""
        if BLOCK_CAP not in conn.caps:
            return 0
        told = 0
        for name, (on, done) in list(self._entries.items()):
            if done:
                continue
            try:
                await conn.request({"t": "block", "username": name, "on": on})
            except ServerError as exc:
                if exc.code != "unknown_user":
                    raise
            with self._db.transaction():
                if on:
                    self._entries[name] = (True, True)
                else:
                    del self._entries[name]   # unblocked and the relay knows: nothing to keep
                self._save()
            told += 1
        return told
