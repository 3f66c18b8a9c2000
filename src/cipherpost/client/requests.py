"""Message requests: what a stranger (someone not among the contacts) wrote, kept apart.

A stranger's messages are decrypted and stored with the status ``request`` (``request_shown`` once
printed), each remembering the identity key it came under; nothing is pinned as a contact. The user
accepts (``cipherpost accept NAME``, ``/accept NAME``): exactly the key the requests came under is
pinned, and the messages become part of the conversation. Blocking a request is one step
(``cipherpost block NAME``): the block list drops what follows and the requests are discarded.
Sending to a stranger also makes them a contact, as before (trust on first use of their bundle).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from .errors import ClientError, UnknownContact
from .names import confusable_warning
from .profile import Contact, ProfileDB

REQUEST: Final = "request"
REQUEST_SHOWN: Final = "request_shown"
REQUEST_DROPPED: Final = "request_dropped"
_PENDING = (REQUEST, REQUEST_SHOWN)


def request_warning(sender: str, confusable: str | None) -> str:
    text = (f"message request: {sender} is not among your contacts. Nothing is pinned until you accept "
            f"(`cipherpost accept {sender}`, /accept in the chat); `cipherpost block {sender}` drops "
            "them")
    return f"{text}. WARNING: {confusable}" if confusable else text


@dataclass(frozen=True)
class Request:
    name: str
    messages: int
    keys: int          # distinct identity keys the requests came under (more than 1: suspicious)
    first_at: int | None
    warning: str | None   # a look-alike of an existing contact


class Requests:
    def __init__(self, db: ProfileDB) -> None:
        self._db = db

    def pending(self) -> list[Request]:
        """Strangers who wrote, oldest first."""
        contacts = set(self._db.contact_names())
        by_name: dict[str, list[tuple[int | None, bytes]]] = {}
        for m in self._db.messages_with_status(*_PENDING):
            if m.contact in contacts:
                continue   # became a contact another way (the user wrote to them)
            key = m.extra.get("key")
            by_name.setdefault(m.contact, []).append((m.received_at, key if isinstance(key, bytes) else b""))
        names = sorted(contacts)
        return [Request(name, len(items), len({k for _, k in items}), items[0][0],
                        confusable_warning(name, names))
                for name, items in by_name.items()]

    def accept(self, name: str) -> Contact:
        """Pin the key ``name``'s requests came under and show them as ordinary messages."""
        if self._db.get_contact(name) is not None:
            raise ClientError(f"{name} is already a contact")
        rows = self._db.messages_of(name, _PENDING)
        if not rows:
            raise UnknownContact(f"no message request from {name}")
        keys = {m.extra.get("key") for m in rows}
        if len(keys) != 1 or not isinstance(next(iter(keys)), bytes):
            raise ClientError(f"the requests from {name} came under {len(keys)} different identity keys; "
                              f"not accepted (block {name}, or write to them to use the key the relay "
                              "publishes)")
        key = next(iter(keys))
        assert isinstance(key, bytes)
        with self._db.transaction():
            self._db.add_contact(name, key, int(time.time() * 1000))
            self._db.set_status([m.row for m in rows if m.status == REQUEST_SHOWN], "shown")
            self._db.set_status([m.row for m in rows if m.status == REQUEST], "new")
        contact = self._db.get_contact(name)
        assert contact is not None
        return contact

    def accept_if_pending(self, name: str) -> Contact | None:
        """Accept ``name``'s requests if there are any, under one key (the user is writing back to
        them); None otherwise, and then the caller pins the key the relay publishes, as before."""
        keys = {m.extra.get("key") for m in self._db.messages_of(name, _PENDING)}
        if len(keys) != 1 or not isinstance(next(iter(keys)), bytes):
            return None
        return self.accept(name)

    def settle(self, name: str, key: bytes) -> None:
        """``name`` became a contact pinned with ``key`` another way (a group's admin-signed state,
        client/group_store.py; inside a transaction): their requests under that key join the
        conversation, as if accepted."""
        rows = [m for m in self._db.messages_of(name, _PENDING) if m.extra.get("key") == key]
        self._db.set_status([m.row for m in rows if m.status == REQUEST_SHOWN], "shown")
        self._db.set_status([m.row for m in rows if m.status == REQUEST], "new")

    def drop(self, name: str) -> int:
        """Discard ``name``'s requests (inside a transaction). Their session is kept, unused while
        the block lasts: an accepted initial message cannot start it again (a replay guard), so
        dropping it would lose what they send after an unblock."""
        rows = self._db.messages_of(name, _PENDING)
        self._db.set_status([m.row for m in rows], REQUEST_DROPPED)
        return len(rows)
