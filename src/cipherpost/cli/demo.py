"""``cipherpost demo [--explain]``: a throwaway relay and two users, every step shown.

Everything is real: a TLS relay on 127.0.0.1 with its SQLite store in a temporary directory, two
profiles with their own keys, PQXDH and the Double Ratchet. With ``--explain`` each side narrates
what it computes, and the demo prints exactly what the relay holds for the recipient. Secrets are
never printed; public values are shown as short prefixes.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from ..client.client import Client, IncomingMessage
from ..client.connection import parse_fingerprint
from ..crypto.pqxdh import InitialMessage
from ..crypto.session import inspect_envelope
from ..server.app import RelayServer
from ..server.config import ServerConfig
from .common import group_digits

PASSPHRASE = "demo passphrase, not secret"  # noqa: S105 (throwaway profiles in a temp dir)

EXPLAIN = {
    "identity": "{who}: new identity = Ed25519 signing key + X25519 key signed by it. "
                "Fingerprint {fingerprint}",
    "prekeys": "{who}: publishes prekeys to the relay (public halves only): signed X25519 prekey={signed}, "
               "{one_time} one-time X25519 prekeys, {kem} signed one-time ML-KEM-768 prekeys, "
               "last-resort ML-KEM-768 prekey={last_resort}. Private halves stay in {who}'s encrypted store.",
    "bundle": "{who}: fetched {user}'s prekey bundle and verified every signature against identity "
              "{identity} (one-time prekey included: {one_time}; KEM key is last-resort: {kem_last_resort}).",
    "pqxdh_initiate": "{who}: PQXDH with {user}: DH1=DH(IK_A,SPK_B), DH2=DH(EK_A,IK_B), DH3=DH(EK_A,SPK_B), "
                      "DH4=DH(EK_A,OPK_B), SS=ML-KEM-768 encapsulation to PQPK_B; SK=HKDF(F||DH1..DH4||SS). "
                      "The ratchet starts from SK. session {session}",
    "encrypt": "{who}: Double Ratchet: message key from the sending chain (HMAC-SHA256), "
               "AES-256-GCM over the text with the header as associated data -> {envelope_bytes}-byte "
               "envelope {msg_id:.8}... written to the outbox before sending.",
    "accepted": "{who}: relay committed envelope {msg_id:.8}... to disk and said 'accepted'; "
                "outbox entry removed.",
    "pqxdh_respond": "{who}: initial message from {sender}: recomputed the same DHs with its private "
                     "prekeys, decapsulated SS, derived the same SK; one-time prekey used: {one_time} "
                     "(now deleted, so this message cannot start a session twice).",
    "decrypt": "{who}: decrypted {msg_id:.8}... from {sender}; stored message + new ratchet state in one "
               "transaction, then acked (the relay deletes it).",
    "decrypt_failed": "{who}: could not decrypt a message from {sender}: {reason}",
}


def _observer(who: str, explain: bool) -> Any:
    def observe(event: str, details: dict[str, Any]) -> None:
        if explain and event in EXPLAIN:
            print("   · " + EXPLAIN[event].format(who=who, **details))
    return observe


def _describe_stored(body: bytes, plaintext: str) -> list[str]:
    info = inspect_envelope(body)
    lines = [f"{len(body)} bytes; starts {body[:24].hex()}...",
             f"session id {info.session_id.hex()[:16]}... (random-looking, public)"]
    if info.initial is not None:
        init: InitialMessage = info.initial
        lines.append(f"carries the PQXDH initial message: sender identity {init.identity.short_id()}, "
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
        try:
            print(f"1. A relay runs at {server.url}, data in {root / 'relay'}")
            print(f"   its TLS certificate fingerprint is {server.cert_fingerprint}")
            pin = parse_fingerprint(server.cert_fingerprint or "")
            print("2. Alice and Bob create identities and register (each pins that fingerprint):")
            alice = await Client.create(root / "alice", "alice", server.url, PASSPHRASE,
                                        server_fingerprint=pin, observer=_observer("alice", explain))
            bob = await Client.create(root / "bob", "bob", server.url, PASSPHRASE,
                                      server_fingerprint=pin, observer=_observer("bob", explain))
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
        print(f"   {who.username} reads: {m.sender}: {m.text!r}")

    first = "Hi Bob! Only you can read this."
    print("3. Bob is offline. Alice sends him a message:")
    await alice.connect()
    await alice.send("bob", first)
    print("4. What the relay stores for Bob right now (all of it):")
    for stored in await server.store.pending("bob", 0, 10):
        print(f"   seq {stored.seq}: from={stored.sender} to={stored.recipient} "
              f"id={stored.msg_id.hex()[:8]}... kind={stored.kind} ts={stored.ts}")
        for line in _describe_stored(stored.body, first):
            print(f"     {line}")
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
    print("Done. Everything was in a temporary directory and is now deleted.")
    return 0 if a_num == b_num and not left else 1


def run_demo(*, explain: bool) -> int:
    return asyncio.run(_demo(explain))
