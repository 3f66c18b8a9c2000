"""``cipherpost demo [--explain]``: a throwaway relay and two users, every step shown.

Everything is real: a TLS relay on 127.0.0.1 with its SQLite store in a temporary directory, two
profiles with their own keys, PQXDH and the Double Ratchet. With ``--explain`` each side narrates
what it computes, and the demo prints exactly what the relay holds for the recipient. Secrets are
never printed; public values are shown as short prefixes.
"""

from __future__ import annotations

import asyncio
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from ..client.client import Client, IncomingMessage
from ..client.connection import parse_fingerprint
from ..crypto.encoding import unpack
from ..crypto.pqxdh import InitialMessage
from ..crypto.ratchet import Header
from ..crypto.session import inspect_envelope
from ..server.app import RelayServer
from ..server.config import ServerConfig
from .common import fmt_time, group_digits, printable

PASSPHRASE = "demo passphrase, not secret"  # noqa: S105 (throwaway profiles in a temp dir)
SHARED_PASSWORD = "blue canoe at dawn"  # noqa: S105 (what Alice and Bob agree on in the demo)
WIDTH = 100

EXPLAIN = {
    "identity": "{who}: new identity = an Ed25519 signing key + an X25519 key signed by it. "
                "Identity fingerprint {fingerprint}",
    "prekeys": "{who}: publishes prekeys to the relay (public halves only): a new signed X25519 prekey: "
               "{signed}; {one_time} one-time X25519 prekeys; {kem} signed one-time ML-KEM-768 "
               "prekeys; a new last-resort ML-KEM-768 prekey: {last_resort}. The private halves stay "
               "in {who}'s encrypted store.",
    "bundle": "{who}: fetched {user}'s prekey bundle and verified every signature against identity "
              "{identity} (a one-time prekey was left: {one_time}; the ML-KEM key is the last-resort "
              "one: {kem_last_resort}).",
    "pqxdh_initiate": "{who}: PQXDH with {user} (spec section 3.3): DH1 = DH(IK_A, SPK_B), "
                      "DH2 = DH(EK_A, IK_B), DH3 = DH(EK_A, SPK_B), DH4 = DH(EK_A, OPK_B), and "
                      "SS = an ML-KEM-768 encapsulation to PQPK_B. SK = HKDF(F || DH1 || DH2 || DH3 || "
                      "DH4 || SS), where F is 32 bytes of 0xFF (it keeps the KDF input from ever "
                      "looking like a plain X25519 output) and SK, the 32-byte shared secret, is the "
                      "root key the Double Ratchet starts from. Session {session}.",
    "encrypt": "{who}: AES-256-GCM with that message key, the header as associated data -> a "
               "{envelope_bytes}-byte envelope {msg_id:.8}..., written to the outbox before it is sent.",
    "accepted": "{who}: the relay committed envelope {msg_id:.8}... to disk and said 'accepted'; the "
                "outbox entry is removed.",
    "pqxdh_respond": "{who}: initial message from {sender}: recomputed the same DHs with its private "
                     "prekeys, decapsulated SS, derived the same SK. A one-time prekey was used: "
                     "{one_time} (now deleted, so this message cannot start a session twice).",
    "decrypt": "{who}: decrypted {msg_id:.8}... from {sender}; stored the message and the new ratchet "
               "state in one transaction, then acked (the relay deletes it).",
    "decrypt_failed": "{who}: could not decrypt a message from {sender}: {reason}",
}


def say(text: str, *, indent: str = "   ", bullet: str = "") -> None:
    """Print ``text`` wrapped at :data:`WIDTH` columns."""
    print(textwrap.fill(text, WIDTH, initial_indent=indent + bullet,
                        subsequent_indent=indent + " " * len(bullet), break_on_hyphens=False))


def _plain(value: Any) -> Any:
    """Values as prose: yes/no instead of True/False, none instead of None."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "none" if value is None else value


class RatchetNarrator:
    """Reads the header of each envelope a side sends (its ratchet public key and counters) and
    says when the keys changed and why (Double Ratchet spec sections 2.2-2.4, 3.1)."""

    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.last_key: dict[str, bytes] = {}
        self.initiators: set[str] = set()

    def on_encrypt(self, who: str, details: dict[str, Any]) -> None:
        client = self.clients.get(who)
        if client is None:
            return
        envelope = next((i.envelope for i in client.db.outbox() if i.msg_id.hex() == details["msg_id"]),
                        None)
        if envelope is None:
            return
        header = Header.decode(unpack(envelope, what="envelope")[3])
        key = header.dh.hex()[:12]
        previous = self.last_key.get(who)
        self.last_key[who] = header.dh
        if previous is None and who in self.initiators:
            why = (f"{who}'s first ratchet key pair (public {key}...): the first sending chain comes "
                   "from the root key SK and DH(this key pair, the peer's signed prekey) "
                   "(RatchetInitAlice, spec section 3.3)")
        elif previous is None:
            why = (f"{who}'s first own ratchet key pair (public {key}...), made when the peer's first "
                   f"message arrived: a DH ratchet step derived {who}'s receiving chain from DH({who}'s "
                   "signed prekey, the peer's ratchet key), then this key pair and the sending chain "
                   "from DH(this key pair, the peer's ratchet key)")
        elif previous != header.dh:
            why = (f"NEW ratchet key pair (public {key}..., was {previous.hex()[:12]}...): the peer's "
                   f"reply carried a new ratchet key, so {who} did a DH ratchet step: a new root key and "
                   "a fresh sending chain from DH(new key pair, peer's key). A key stolen before this "
                   "point no longer opens what follows (post-compromise security)")
        else:
            why = (f"same ratchet key ({key}...), no reply in between: a symmetric step, the chain key "
                   "is advanced with HMAC-SHA256 and the old one erased (forward secrecy)")
        say(f"{who}: Double Ratchet, message number n={header.n} in this sending chain (the previous "
            f"chain had pn={header.pn} messages); {why}. Message key = HMAC-SHA256(chain key, 0x01), "
            "next chain key = HMAC-SHA256(chain key, 0x02).", bullet="· ")


def _observer(who: str, explain: bool, narrator: RatchetNarrator) -> Any:
    def observe(event: str, details: dict[str, Any]) -> None:
        if not explain or event not in EXPLAIN:
            return
        if event == "pqxdh_initiate":
            narrator.initiators.add(who)
        if event == "encrypt":
            narrator.on_encrypt(who, details)
        say(EXPLAIN[event].format(who=who, **{k: _plain(v) for k, v in details.items()}), bullet="· ")
    return observe


def _describe_stored(body: bytes, plaintext: str) -> list[str]:
    info = inspect_envelope(body)
    lines = [f"{len(body)} bytes; starts {body[:24].hex()}...",
             f"session id {info.session_id.hex()[:16]}... (random-looking, public)"]
    if info.initial is not None:
        init: InitialMessage = info.initial
        sender = init.identity.fingerprint_text()
        lines.append(f"carries the PQXDH initial message: sender identity {sender}, "
                     f"ephemeral key {init.ephemeral.hex()[:16]}..., prekey ids spk={init.signed_prekey_id} "
                     f"opk={init.one_time_prekey_id} kem={init.kem_prekey_id}, ML-KEM ciphertext "
                     f"{len(init.kem_ciphertext)} bytes")
    readable = plaintext.encode() in body
    lines.append("the text appears in it: " + ("YES (this would be a bug!)" if readable else
                 "no - without Bob's private keys these bytes are noise"))
    return lines


async def _demo(explain: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="cipherpost-demo-") as tmp:
        root = Path(tmp)
        server = RelayServer(ServerConfig(data_dir=root / "relay", host="127.0.0.1", port=0))
        await server.start()
        narrator = RatchetNarrator()
        try:
            print(f"1. A relay runs at {server.url}, data in {root / 'relay'}")
            say(f"its TLS certificate fingerprint is {server.cert_fingerprint}")
            pin = parse_fingerprint(server.cert_fingerprint or "")
            print("2. Alice and Bob create identities and register (each pins that fingerprint):")
            alice = await Client.create(root / "alice", "alice", server.url, PASSPHRASE,
                                        server_fingerprint=pin,
                                        observer=_observer("alice", explain, narrator))
            bob = await Client.create(root / "bob", "bob", server.url, PASSPHRASE, server_fingerprint=pin,
                                      observer=_observer("bob", explain, narrator))
            narrator.clients.update(alice=alice, bob=bob)
            try:
                return await _conversation(server, alice, bob)
            finally:
                await alice.close()
                await bob.close()
        finally:
            await server.stop()


async def _conversation(server: RelayServer, alice: Client, bob: Client) -> int:
    arrived: dict[str, asyncio.Queue[IncomingMessage]] = {"alice": asyncio.Queue(), "bob": asyncio.Queue()}
    alice.add_listener(arrived["alice"].put_nowait)
    bob.add_listener(arrived["bob"].put_nowait)

    async def expect(who: Client) -> None:
        m = await asyncio.wait_for(arrived[who.username].get(), timeout=10)
        print(f"   {who.username} reads: {m.sender}: '{printable(m.text)}'")

    first = "Hi Bob! Only you can read this."
    print("3. Bob is offline. Alice sends him a message:")
    await alice.connect()
    await alice.send("bob", first)
    print("4. What the relay stores for Bob right now (all of it):")
    for stored in await server.store.pending("bob", 0, 10):
        say(f"seq {stored.seq}: from {stored.sender} to {stored.recipient}, id {stored.msg_id.hex()[:8]}..., "
            f"kind {stored.kind}, received {fmt_time(stored.ts)}")
        for line in _describe_stored(stored.body, first):
            say(line, indent="     ")
    print("   The relay knows who wrote to whom, when, and how many bytes. Not the words.")
    print("5. Bob comes online; the relay pushes the envelope:")
    await bob.connect()
    await expect(bob)
    print("6. Bob replies; his reply starts a new DH ratchet step (fresh X25519 keys):")
    await bob.send("alice", "Hello Alice, received loud and clear.")
    await expect(alice)
    print("7. A few more turns; every message has its own key, erased after use:")
    for sender, receiver, text in ((alice, bob, "Forward secrecy: old keys are gone."),
                                   (alice, bob, "Two in a row use the same chain."),
                                   (bob, alice, "And my answer ratchets again.")):
        await sender.send(receiver.username, text)
        await expect(receiver)
    left = await server.store.pending("bob", 0, 10) + await server.store.pending("alice", 0, 10)
    print(f"8. Messages left on the relay after the acks: {len(left)}")
    a_num = alice.safety_number("bob").digits
    b_num = bob.safety_number("alice").digits
    print("9. Safety numbers (compare them in person or on a call to rule out a man in the middle):")
    print("   alice sees:\n" + "\n".join("     " + line for line in group_digits(a_num).splitlines()))
    print("   bob sees the same: " + ("yes" if a_num == b_num else "NO"))
    print("10. Or, at a distance, a password they agreed on in person (SPAKE2 through the relay):")
    say(f"both enter {SHARED_PASSWORD!r}. Each side proves it knows the password AND sees the other's "
        "real identity key; the relay only carries the messages and learns nothing it could test "
        "guesses against offline. A wrong guess costs one online attempt (at most 3 per hour).")
    await asyncio.gather(alice.verify_password("bob", SHARED_PASSWORD, timeout=30),
                         bob.verify_password("alice", SHARED_PASSWORD, timeout=30))
    verified = alice.contact("bob").verified and bob.contact("alice").verified
    say("result: " + ("both sides now show the other as verified; the verification key is mixed into "
                      "their next session (PQXDH with a pre-shared key)" if verified else "NOT verified"))
    print("Done. Everything was in a temporary directory and is now deleted.")
    return 0 if a_num == b_num and not left and verified else 1


def run_demo(*, explain: bool) -> int:
    return asyncio.run(_demo(explain))
