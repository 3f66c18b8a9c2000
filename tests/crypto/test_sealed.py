"""HPKE sealing: round trips, authentication of info/aad, key layouts, malformed input."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from cipherpost.crypto.encoding import context, pack, unpack
from cipherpost.crypto.errors import DecryptionError, EncodingError
from cipherpost.crypto.sealed import (
    SealSuite,
    generate_seal_keypair,
    open_sealed,
    seal,
    seal_public_from_private,
)

SUITES = list(SealSuite)
KEYS = {s: generate_seal_keypair(s) for s in SUITES}


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("plaintext", [b"", b"hello", bytes(range(256)) * 40])
def test_round_trip(suite: SealSuite, plaintext: bytes) -> None:
    priv, pub = KEYS[suite]
    sealed = seal(suite, pub, plaintext, info=b"test", aad=b"row:1")
    assert open_sealed(suite, priv, sealed, info=b"test", aad=b"row:1") == plaintext


@pytest.mark.parametrize("suite", SUITES)
def test_format_and_randomised(suite: SealSuite) -> None:
    _, pub = KEYS[suite]
    a = seal(suite, pub, b"same", info=b"i")
    b = seal(suite, pub, b"same", info=b"i")
    assert a != b  # fresh KEM encapsulation every time
    arr = unpack(a, what="t")
    assert arr[0] == 1 and arr[1] == suite.value and isinstance(arr[2], bytes)
    assert b"same" not in a


@pytest.mark.parametrize("suite", SUITES)
def test_key_lengths(suite: SealSuite) -> None:
    priv, pub = KEYS[suite]
    expected = {SealSuite.X25519: (32, 32), SealSuite.MLKEM768_X25519: (64 + 32, 1184 + 32)}[suite]
    assert (len(priv), len(pub)) == expected
    assert seal_public_from_private(suite, priv) == pub


def test_hybrid_key_layout_matches_pyca_components() -> None:
    """private = ML-KEM seed || X25519 private; public = ML-KEM pub || X25519 pub."""
    kem = mlkem.MLKEM768PrivateKey.generate()
    dh = x25519.X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    priv = kem.private_bytes_raw() + dh.private_bytes(raw, serialization.PrivateFormat.Raw,
                                                      serialization.NoEncryption())
    pub = kem.public_key().public_bytes_raw() + dh.public_key().public_bytes(
        raw, serialization.PublicFormat.Raw)
    assert seal_public_from_private(SealSuite.MLKEM768_X25519, priv) == pub
    # Interop with pyca's own hybrid key objects and the documented info construction.
    suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
    ct = suite.encrypt(b"interop", hpke.MLKEM768X25519PublicKey(kem.public_key(), dh.public_key()),
                       info=context("sealed") + pack([b"i", b"a"]))
    assert open_sealed(SealSuite.MLKEM768_X25519, priv, pack([1, 2, ct]), info=b"i", aad=b"a") == b"interop"
    sealed = seal(SealSuite.MLKEM768_X25519, pub, b"back", info=b"i", aad=b"a")
    assert suite.decrypt(unpack(sealed, what="t")[2], hpke.MLKEM768X25519PrivateKey(kem, dh),
                         info=context("sealed") + pack([b"i", b"a"])) == b"back"


def test_x25519_suite_matches_pyca() -> None:
    priv, pub = KEYS[SealSuite.X25519]
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
    sealed = seal(SealSuite.X25519, pub, b"x", info=b"i")
    assert suite.decrypt(unpack(sealed, what="t")[2], x25519.X25519PrivateKey.from_private_bytes(priv),
                         info=context("sealed") + pack([b"i", b""])) == b"x"


@pytest.mark.parametrize("half", ["mlkem", "x25519"])
def test_hybrid_needs_both_halves(half: str) -> None:
    suite = SealSuite.MLKEM768_X25519
    priv, pub = KEYS[suite]
    other, _ = generate_seal_keypair(suite)
    mixed = other[:64] + priv[64:] if half == "mlkem" else priv[:64] + other[64:]
    sealed = seal(suite, pub, b"secret", info=b"i")
    with pytest.raises(DecryptionError):
        open_sealed(suite, mixed, sealed, info=b"i")


@pytest.mark.parametrize("suite", SUITES)
def test_wrong_key(suite: SealSuite) -> None:
    _, pub = KEYS[suite]
    other, _ = generate_seal_keypair(suite)
    with pytest.raises(DecryptionError):
        open_sealed(suite, other, seal(suite, pub, b"m", info=b"i"), info=b"i")


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize(
    ("info", "aad"),
    [(b"other", b"row:1"), (b"test", b"row:2"), (b"test", b""), (b"testrow:1", b""), (b"", b"testrow:1")],
)
def test_info_and_aad_are_authenticated(suite: SealSuite, info: bytes, aad: bytes) -> None:
    priv, pub = KEYS[suite]
    sealed = seal(suite, pub, b"m", info=b"test", aad=b"row:1")
    with pytest.raises(DecryptionError):
        open_sealed(suite, priv, sealed, info=info, aad=aad)


@pytest.mark.parametrize("suite", SUITES)
def test_every_ciphertext_byte_is_authenticated(suite: SealSuite) -> None:
    priv, pub = KEYS[suite]
    arr = unpack(seal(suite, pub, b"payload", info=b"i"), what="t")
    ct = arr[2]
    # Every byte of the AEAD part and a spread of the KEM encapsulation.
    positions = sorted(set(range(0, len(ct), max(1, len(ct) // 40))) | set(range(len(ct) - 23, len(ct))))
    for pos in positions:
        bad = bytearray(ct)
        bad[pos] ^= 0x01
        with pytest.raises(DecryptionError):
            open_sealed(suite, priv, pack([1, suite.value, bytes(bad)]), info=b"i")


@pytest.mark.parametrize("suite", SUITES)
def test_malformed(suite: SealSuite) -> None:
    priv, pub = KEYS[suite]
    arr = unpack(seal(suite, pub, b"m", info=b"i"), what="t")
    other_suite = SealSuite.X25519 if suite is SealSuite.MLKEM768_X25519 else SealSuite.MLKEM768_X25519
    bad_inputs = [
        b"",
        b"\xc1",
        pack([2, suite.value, arr[2]]),
        pack([1, other_suite.value, arr[2]]),
        pack([1, suite.value, arr[2][:20]]),
        pack([1, suite.value, "text"]),
        pack([1, suite.value]),
        pack([1, suite.value, arr[2], b""]),
        pack({"v": 1}),
    ]
    for blob in bad_inputs:
        with pytest.raises(EncodingError):
            open_sealed(suite, priv, blob, info=b"i")


@pytest.mark.parametrize("suite", SUITES)
def test_bad_key_bytes(suite: SealSuite) -> None:
    priv, pub = KEYS[suite]
    with pytest.raises(EncodingError):
        seal(suite, pub[:-1], b"m", info=b"i")
    with pytest.raises(EncodingError):
        open_sealed(suite, priv + b"\x00", seal(suite, pub, b"m", info=b"i"), info=b"i")


def test_small_order_x25519_public_key_rejected() -> None:
    with pytest.raises(EncodingError):
        seal(SealSuite.X25519, bytes(32), b"m", info=b"i")


def test_invalid_mlkem_public_key_rejected() -> None:
    # Coefficients >= q fail the FIPS 203 section 7.2 modulus check.
    with pytest.raises(EncodingError):
        seal(SealSuite.MLKEM768_X25519, b"\xff" * 1216, b"m", info=b"i")


@settings(max_examples=25, deadline=None)
@given(plaintext=st.binary(max_size=300), info=st.binary(max_size=40), aad=st.binary(max_size=40))
def test_property_round_trip(plaintext: bytes, info: bytes, aad: bytes) -> None:
    priv, pub = KEYS[SealSuite.X25519]
    sealed = seal(SealSuite.X25519, pub, plaintext, info=info, aad=aad)
    assert open_sealed(SealSuite.X25519, priv, sealed, info=info, aad=aad) == plaintext
