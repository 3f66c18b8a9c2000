"""Benchmark of the session layer against the raw pyca/cryptography floor (run by hand).

    python bench/crypto.py

For each operation it prints microseconds per call and the ratio to the "floor": the same pyca
primitive calls the step needs, done back to back in this run with no protocol code around them.
Targets: ratchet message encrypt+decrypt within 3x of its HMAC+HKDF+AES-GCM floor; full PQXDH
initiate+respond within 2x of its X25519+ML-KEM+Ed25519 (+HKDF) floor.
"""

from __future__ import annotations

import os
import timeit
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cipherpost.crypto import pqxdh
from cipherpost.crypto import session as sessions
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.prekey_store import PrekeyStore
from cipherpost.crypto.prekeys import PrekeyBundle
from cipherpost.crypto.ratchet import init_receiver, init_sender, ratchet_decrypt, ratchet_encrypt

RAW = serialization.Encoding.Raw
RAW_PUB = serialization.PublicFormat.Raw
SHA256 = hashes.SHA256()


def per_call_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def report(name: str, op_us: float, floor_us: float, target: float | None) -> None:
    ratio = op_us / floor_us
    verdict = "" if target is None else ("  ok" if ratio <= target else f"  ABOVE target {target}x")
    print(f"{name:<38} {op_us:9.1f} us   floor {floor_us:8.1f} us   ratio {ratio:4.2f}x{verdict}")


def bench_message() -> None:
    sk = os.urandom(32)
    bob_key = X25519PrivateKey.generate()
    bob_pub = bob_key.public_key().public_bytes(RAW, RAW_PUB)
    bob_priv = bob_key.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    alice = init_sender(sk, bob_pub)
    bob = init_receiver(sk, bob_priv)
    ad = os.urandom(300)            # the PQXDH AD is two encoded identities (~260 bytes)
    plaintext = os.urandom(100)
    h, ct, alice = ratchet_encrypt(alice, plaintext, ad)
    _, bob = ratchet_decrypt(bob, h, ct, ad)          # Bob is now on Alice's chain
    h, ct, alice_next = ratchet_encrypt(alice, plaintext, ad)

    def op() -> None:
        # Same chain, no DH step: KDF_CK + message keys + AEAD on both sides.
        ratchet_encrypt(alice, plaintext, ad)
        ratchet_decrypt(bob, h, ct, ad)

    ck = os.urandom(32)
    full_ad = ad + h.encode()
    info = b"cipherpost/v1/message-keys\x00"

    def floor() -> None:
        for decrypt in (False, True):
            m = HMAC(ck, SHA256)
            m2 = m.copy()
            m.update(b"\x01")
            m2.update(b"\x02")
            mk = m.finalize()
            m2.finalize()
            km = HKDF(SHA256, 44, salt=bytes(32), info=info).derive(mk)
            aead = AESGCM(km[:32])
            if decrypt:
                aead.decrypt(km[32:], ct_floor, full_ad)
            else:
                aead.encrypt(km[32:], plaintext, full_ad)

    mk0 = HMAC(ck, SHA256)
    mk0.update(b"\x01")
    km0 = HKDF(SHA256, 44, salt=bytes(32), info=info).derive(mk0.finalize())
    ct_floor = AESGCM(km0[:32]).encrypt(km0[32:], plaintext, full_ad)
    report("ratchet encrypt+decrypt (100 B)", per_call_us(op, 3000), per_call_us(floor, 3000), 3.0)
    del alice_next


def bench_dh_step() -> None:
    sk = os.urandom(32)
    bob_key = X25519PrivateKey.generate()
    alice = init_sender(sk, bob_key.public_key().public_bytes(RAW, RAW_PUB))
    bob = init_receiver(sk, bob_key.private_bytes(RAW, serialization.PrivateFormat.Raw,
                                                  serialization.NoEncryption()))
    ad = os.urandom(300)
    h, ct, alice = ratchet_encrypt(alice, b"x" * 100, ad)

    def op() -> None:
        # Bob's first receipt on a new chain: DH ratchet step (spec 3.5) + one message.
        ratchet_decrypt(bob, h, ct, ad)

    peer = X25519PublicKey.from_public_bytes(h.dh)
    rk = os.urandom(32)
    root_info = b"cipherpost/v1/ratchet-root\x00"

    msg_info = b"cipherpost/v1/message-keys\x00"
    full_ad = ad + h.encode()

    def floor() -> None:
        own = X25519PrivateKey.generate()
        own.public_key().public_bytes(RAW, RAW_PUB)
        HKDF(SHA256, 64, salt=rk, info=root_info).derive(bob_key.exchange(peer))
        out = HKDF(SHA256, 64, salt=rk, info=root_info).derive(own.exchange(peer))
        # ... and the one message on the new chain (KDF_CK, message keys, AEAD)
        m = HMAC(out[32:], SHA256)
        m2 = m.copy()
        m.update(b"\x01")
        m2.update(b"\x02")
        m2.finalize()
        km = HKDF(SHA256, 44, salt=bytes(32), info=msg_info).derive(m.finalize())
        AESGCM(km[:32]).encrypt(km[32:], b"x" * 100, full_ad)

    report("DH ratchet step (incl. 1 message)", per_call_us(op, 500), per_call_us(floor, 500), None)


def bench_pqxdh() -> None:
    alice = IdentityKeyPair.generate()
    bob = IdentityKeyPair.generate()
    store = PrekeyStore.empty()
    spk, store = store.rotate_signed_prekey(bob, 1)
    opks, store = store.new_one_time_prekeys(1)
    kems, store = store.new_kem_prekeys(bob, 1)
    bundle = PrekeyBundle(bob.public, spk, kems[0], opks[0])

    def op() -> None:
        _, _, msg = pqxdh.initiate(alice, bundle)
        pqxdh.respond(bob, store, msg)

    # The floor: the Ed25519, X25519, ML-KEM and HKDF calls of both sides, back to back.
    ik_a = X25519PrivateKey.generate()
    ik_b = X25519PrivateKey.generate()
    spk_priv = store.signed_prekey_private(spk.key_id)
    seed = os.urandom(64)
    kem_pub_bytes = MLKEM768PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()
    sign_key = ed25519.Ed25519PrivateKey.generate()
    sig1, sig2 = sign_key.sign(b"a" * 60), sign_key.sign(b"b" * 1220)
    sign_pub = sign_key.public_key().public_bytes(RAW, RAW_PUB)
    spk_pub, opk_pub = spk.public, opks[0].public
    opk_priv_bytes = os.urandom(32)
    ik_a_pub = ik_a.public_key().public_bytes(RAW, RAW_PUB)
    ik_b_pub = ik_b.public_key().public_bytes(RAW, RAW_PUB)

    def floor() -> None:
        # Alice
        vk = ed25519.Ed25519PublicKey.from_public_bytes(sign_pub)
        vk.verify(sig1, b"a" * 60)
        vk.verify(sig2, b"b" * 1220)
        spk_b = X25519PublicKey.from_public_bytes(spk_pub)
        ik_bp = X25519PublicKey.from_public_bytes(ik_b_pub)
        opk_b = X25519PublicKey.from_public_bytes(opk_pub)
        kem_b = MLKEM768PublicKey.from_public_bytes(kem_pub_bytes)
        ek = X25519PrivateKey.generate()
        km = ik_a.exchange(spk_b) + ek.exchange(ik_bp) + ek.exchange(spk_b) + ek.exchange(opk_b)
        ss, ct = kem_b.encapsulate()
        HKDF(SHA256, 32, salt=bytes(32), info=pqxdh.INFO).derive(b"\xff" * 32 + km + ss)
        ek_pub = ek.public_key().public_bytes(RAW, RAW_PUB)
        # Bob
        opk = X25519PrivateKey.from_private_bytes(opk_priv_bytes)
        dk = MLKEM768PrivateKey.from_seed_bytes(seed)
        ekp = X25519PublicKey.from_public_bytes(ek_pub)
        km = (spk_priv.exchange(X25519PublicKey.from_public_bytes(ik_a_pub)) + ik_b.exchange(ekp)
              + spk_priv.exchange(ekp) + opk.exchange(ekp))
        ss = dk.decapsulate(ct)
        HKDF(SHA256, 32, salt=bytes(32), info=pqxdh.INFO).derive(b"\xff" * 32 + km + ss)

    report("PQXDH initiate+respond", per_call_us(op, 200), per_call_us(floor, 200), 2.0)


def bench_session_extras() -> None:
    alice_id, bob_id = IdentityKeyPair.generate(), IdentityKeyPair.generate()
    store = PrekeyStore.empty()
    spk, store = store.rotate_signed_prekey(bob_id, 1)
    kems, store = store.new_kem_prekeys(bob_id, 1)
    a = sessions.initiate_session(alice_id, PrekeyBundle(bob_id.public, spk, kems[0], None))
    env, a = sessions.encrypt(a, b"x" * 100)
    _, b, _ = sessions.accept_session(bob_id, store, env)
    reply, b = sessions.encrypt(b, b"y" * 100)
    _, a = sessions.decrypt(a, reply)
    env, a = sessions.encrypt(a, b"z" * 100)
    _, b = sessions.decrypt(b, env)               # Bob is now on Alice's current chain
    env, a2 = sessions.encrypt(a, b"z" * 100)     # so this one needs no DH step
    blob = b.serialize()
    print(f"{'session encrypt+decrypt (100 B, envelope)':<38} "
          f"{per_call_us(lambda: (sessions.encrypt(a, b'z' * 100), sessions.decrypt(b, env)), 2000):9.1f} us")
    print(f"{'session serialize+deserialize':<38} "
          f"{per_call_us(lambda: sessions.Session.deserialize(b.serialize()), 500):9.1f} us  ({len(blob)} B)")
    del a2


def main() -> None:
    bench_message()
    bench_dh_step()
    bench_pqxdh()
    bench_session_extras()


if __name__ == "__main__":
    main()
