"""Password verification of a contact over the relay (issue: SPAKE2 verification).

The crypto is :class:`cipherpost.crypto.pake.PakeVerifier` (SPAKE2 + key confirmation); this module
only carries its messages through the relay as ``kind="pake"`` sends and keeps the bookkeeping:

    each side:  [1, "spake2", my_nonce, msg] -> [1, "confirm", tag, mac] -> [1, "result", tag, ok]
    withdrawn:  [1, "cancel", my_nonce, nil]   (sent by a side that stops before its "result")

where each side picks a random 16-byte nonce per attempt and ``tag = sender_nonce || recipient_nonce``.
The nonces only route messages to the right attempt (a message left over from an abandoned attempt
is ignored); the security comes from SPAKE2 and the key confirmation.

A side marks the contact verified only when its own check passed AND the peer reported success,
so a tampered confirmation fails both sides. The PSK that comes out is kept (encrypted) for the
contact and mixed into the next PQXDH session (docs/verification.md). Attempts are limited per
contact here and per pair on the server, so each attempt is one online guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..crypto.encoding import pack, unpack
from ..crypto.errors import CryptoError, VerificationFailed
from ..crypto.identity import PublicIdentity
from ..crypto.pake import PakeVerifier
from .errors import ClientError, VerificationError

if TYPE_CHECKING:
    from .client import Client

PAKE_VERSION = 1
MAX_ATTEMPTS_PER_HOUR = 3
RESULT_TIMEOUT = 15.0
CANCEL_SEND_TIMEOUT = 5.0
FAILED = ("verification FAILED: either the password differs or a key between you was substituted "
          "(deliberately not said which). Nothing was marked verified, and sending to them is blocked "
          "until a verification succeeds.")
BLOCKED = ("the last password verification failed (wrong password, or someone substituted a key); "
           "verify again with the password, or compare safety numbers")


@dataclass
class _Inbox:
    """PAKE messages received from one contact, kept briefly until a verification consumes them."""

    items: list[tuple[int, str, bytes, Any]] = field(default_factory=list)   # (server ts, step, tag, value)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class PakeMailbox:
    def __init__(self) -> None:
        self._inboxes: dict[str, _Inbox] = {}
        self._cancel_listeners: list[Callable[[str], None]] = []

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        """Called with the contact's name when they withdraw a verification they started."""
        self._cancel_listeners.append(callback)

    def _cancelled(self, inbox: _Inbox, nonce: bytes) -> bool:
        return any(kind == "cancel" and tag == nonce for _, kind, tag, _ in inbox.items)

    def put(self, sender: str, body: bytes, server_ts: int) -> str | None:
        """Buffer a PAKE message; returns its step name, or None if it is malformed."""
        try:
            msg = unpack(body, what="pake message", max_size=4096)
        except CryptoError:
            return None
        if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == PAKE_VERSION
                and msg[1] in ("spake2", "confirm", "result", "cancel") and isinstance(msg[2], bytes)):
            return None
        inbox = self._inboxes.setdefault(sender, _Inbox())
        inbox.items.append((server_ts, msg[1], msg[2], msg[3]))
        del inbox.items[:-16]   # a flood from one sender cannot grow memory
        inbox.arrived.set()
        if msg[1] == "cancel":
            for listener in self._cancel_listeners:
                listener(sender)
        return str(msg[1])

    def discard_older_than(self, sender: str, cutoff_ms: int) -> None:
        inbox = self._inboxes.get(sender)
        if inbox:
            inbox.items = [i for i in inbox.items if i[0] >= cutoff_ms]

    async def take(self, sender: str, step: str, deadline: float, tag: bytes | None = None,
                   peer_nonce: bytes | None = None) -> tuple[bytes, Any]:
        """The newest buffered ``step`` message (with ``tag``, if given): ``(tag, value)``.

        A "spake2" message whose attempt was withdrawn is skipped; once the peer's nonce is known,
        its "cancel" ends the wait with a VerificationError."""
        inbox = self._inboxes.setdefault(sender, _Inbox())
        while True:
            if peer_nonce is not None and self._cancelled(inbox, peer_nonce):
                raise VerificationError(f"{sender} cancelled the verification; nothing was marked "
                                        "verified")
            for i in range(len(inbox.items) - 1, -1, -1):
                _, kind, item_tag, value = inbox.items[i]
                if kind == step and (tag is None or item_tag == tag):
                    if step == "spake2" and self._cancelled(inbox, item_tag):
                        continue
                    del inbox.items[i]
                    return item_tag, value
            inbox.arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VerificationError(
                    f"timed out waiting for {sender} ({step} step): did they start the same "
                    f"verification within the time limit?")
            try:
                await asyncio.wait_for(inbox.arrived.wait(), timeout=remaining)
            except TimeoutError:
                continue


async def verify_with_password(client: Client, name: str, password: str, *, timeout: float) -> None:
    """Run the whole exchange; on success the contact is verified and a PSK is stored."""
    if not password:
        raise ClientError("the password must not be empty")
    await client.connect()
    contact = await client.ensure_contact(name)
    peer_identity_bytes = contact.pending_identity or contact.identity
    peer_identity = PublicIdentity.decode(peer_identity_bytes)
    client.record_pake_attempt(name, MAX_ATTEMPTS_PER_HOUR)
    # A peer may have started up to ``timeout`` before us; anything older is from another attempt.
    client.pake_mailbox.discard_older_than(name, int((time.time() - timeout) * 1000))
    deadline = time.monotonic() + timeout
    verifier = PakeVerifier(password, client.username, client.identity.public, name, peer_identity)
    my_nonce = os.urandom(16)

    async def send(step: str, tag: bytes, value: Any) -> None:
        await client.send_pake(name, pack([PAKE_VERSION, step, tag, value]))

    await send("spake2", my_nonce, verifier.start())
    ok = False
    psk = b""
    try:
        peer_nonce, peer_message = await client.pake_mailbox.take(name, "spake2", deadline)
        try:
            if not isinstance(peer_message, bytes) or len(peer_nonce) != 16:
                raise VerificationFailed("malformed")
            await send("confirm", my_nonce + peer_nonce, verifier.finish(peer_message))
            _, peer_mac = await client.pake_mailbox.take(name, "confirm", deadline, peer_nonce + my_nonce,
                                                         peer_nonce=peer_nonce)
            if not isinstance(peer_mac, bytes):
                raise VerificationFailed("malformed")
            psk = verifier.confirm(peer_mac)
            ok = True
        except VerificationFailed:
            ok = False
    except BaseException:
        # Stopped before our result (Ctrl-C, timeout, the peer withdrew): withdraw this attempt on
        # the peer's side too, so their screen and their waiting verification do not hang on it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(send("cancel", my_nonce, None), CANCEL_SEND_TIMEOUT)
        raise
    await send("result", my_nonce + peer_nonce, ok)
    if ok:
        _, peer_ok = await client.pake_mailbox.take(
            name, "result", min(deadline, time.monotonic() + RESULT_TIMEOUT), peer_nonce + my_nonce)
        ok = peer_ok is True
    if not ok:
        # Either side may be under attack: stop sending until a verification succeeds.
        client.block_contact(name, BLOCKED)
        raise VerificationError(FAILED)
    client.store_verification(name, peer_identity_bytes, psk)

