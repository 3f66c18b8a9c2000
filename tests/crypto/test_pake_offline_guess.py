"""What a relay sees of a password verification gives it no offline test of a password guess.

The relay carries both SPAKE2 messages and both confirmation MACs. An attacker holding all of them
can only check a guess by running SPAKE2 itself with that guess, which yields a key unrelated to the
honest one unless it took part in the exchange (one online guess, rate-limited). So the attacker's
check comes out the same for the right password as for any wrong one. A design that keyed the MACs
with a plain KDF of the password would make the right guess stand out here: this test would fail.
(The argument in prose: docs/verification.md.)
"""

from __future__ import annotations

import hashlib
import hmac

from cipherpost.crypto.errors import VerificationFailed
from cipherpost.crypto.identity import IdentityKeyPair
from cipherpost.crypto.pake import PakeVerifier

PASSWORD = "tangerine 1984"


def _honest_transcript() -> tuple[dict[str, bytes], IdentityKeyPair, IdentityKeyPair]:
    alice, bob = IdentityKeyPair.generate(), IdentityKeyPair.generate()
    a = PakeVerifier(PASSWORD, "alice", alice.public, "bob", bob.public)
    b = PakeVerifier(PASSWORD, "bob", bob.public, "alice", alice.public)
    msg_a, msg_b = a.start(), b.start()
    mac_a, mac_b = a.finish(msg_b), b.finish(msg_a)
    assert hmac.compare_digest(a.confirm(mac_b), b.confirm(mac_a))   # the honest run succeeds
    return {"msg_a": msg_a, "msg_b": msg_b, "mac_a": mac_a, "mac_b": mac_b}, alice, bob


def _attacker_accepts(guess: str, seen: dict[str, bytes], alice: IdentityKeyPair,
                      bob: IdentityKeyPair) -> bool:
    """The best offline check: play Bob with the guess against Alice's recorded message and see
    whether Alice's recorded MAC verifies."""
    fake_bob = PakeVerifier(guess, "bob", bob.public, "alice", alice.public)
    fake_bob.start()
    fake_bob.finish(seen["msg_a"])
    try:
        fake_bob.confirm(seen["mac_a"])
    except VerificationFailed:
        return False
    return True


def test_recorded_transcript_does_not_single_out_the_password() -> None:
    seen, alice, bob = _honest_transcript()
    guesses = [PASSWORD, "tangerine 1985", "password", ""]
    verdicts = {g: _attacker_accepts(g, seen, alice, bob) for g in guesses if g}
    assert set(verdicts.values()) == {False}, verdicts


def test_transcript_contains_no_password_derived_values() -> None:
    seen, _, _ = _honest_transcript()
    blob = b"".join(seen.values())
    pw = PASSWORD.encode()
    for derived in (pw, hashlib.sha256(pw).digest(), hashlib.sha256(pw).digest()[:16],
                    hashlib.sha512(pw).digest()[:32]):
        assert derived not in blob


def test_each_run_looks_different_even_with_the_same_password() -> None:
    first, _, _ = _honest_transcript()
    second, _, _ = _honest_transcript()
    assert first["msg_a"] != second["msg_a"] and first["mac_a"] != second["mac_a"]
