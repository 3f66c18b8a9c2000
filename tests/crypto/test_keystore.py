"""Key store at rest: Argon2id (RFC 9106) + AES-256-GCM with the header as associated data."""

from __future__ import annotations

import unicodedata

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cipherpost.crypto.encoding import pack, unpack
from cipherpost.crypto.errors import StateCorrupt, WrongPassphrase
from cipherpost.crypto.keystore import (
    RFC9106_SECOND_RECOMMENDED,
    Argon2Params,
    derive_argon2id,
    keystore_params,
    open_keystore,
    reseal_keystore,
    seal_keystore,
)

FAST = Argon2Params(memory_kib=64, iterations=1, lanes=1)
SECRET = b"identity private keys \x00\x01\x02"


def test_rfc9106_argon2id_vector() -> None:
    """RFC 9106 section 5.3, through the same helper the key store uses."""
    tag = derive_argon2id(
        b"\x01" * 32, b"\x02" * 16, Argon2Params(memory_kib=32, iterations=3, lanes=4),
        length=32, secret=b"\x03" * 8, ad=b"\x04" * 12,
    )
    assert tag.hex() == "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"


def test_default_params_are_rfc9106_second_option() -> None:
    assert Argon2Params(memory_kib=65536, iterations=3, lanes=4) == RFC9106_SECOND_RECOMMENDED
    blob = seal_keystore("correct horse", SECRET)
    assert keystore_params(blob) == RFC9106_SECOND_RECOMMENDED
    assert open_keystore("correct horse", blob) == SECRET


def test_round_trip_and_fresh_randomness() -> None:
    a = seal_keystore("pw", SECRET, params=FAST)
    b = seal_keystore("pw", SECRET, params=FAST)
    assert a != b
    assert unpack(a, what="t")[2] != unpack(b, what="t")[2]  # fresh salt
    assert open_keystore("pw", a) == SECRET == open_keystore("pw", b)
    assert SECRET not in a
    assert open_keystore("pw", seal_keystore("pw", b"", params=FAST)) == b""


def test_format_is_as_documented() -> None:
    salt = bytes(range(16))
    blob = seal_keystore("pässword", SECRET, params=FAST, salt=salt)
    version, params, got_salt, nonce, ct = unpack(blob, what="t")
    assert (version, params, got_salt, len(nonce)) == (1, [64, 1, 1], salt, 12)
    key = derive_argon2id("pässword".encode(), salt, FAST)
    assert AESGCM(key).decrypt(nonce, ct, pack([1, [64, 1, 1], salt])) == SECRET


def test_passphrase_is_nfc_normalised() -> None:
    nfd = unicodedata.normalize("NFD", "Zoë café")
    nfc = unicodedata.normalize("NFC", "Zoë café")
    assert nfd != nfc
    assert open_keystore(nfc, seal_keystore(nfd, SECRET, params=FAST)) == SECRET


def test_wrong_passphrase() -> None:
    blob = seal_keystore("right one", SECRET, params=FAST)
    with pytest.raises(WrongPassphrase) as info:
        open_keystore("wrong one", blob)
    assert "wrong one" not in str(info.value) and "right one" not in str(info.value)
    assert "passphrase" in str(info.value)


def _rewrite(blob: bytes, index: int, value: object) -> bytes:
    arr = unpack(blob, what="t")
    arr[index] = value
    return pack(arr)


def test_parameters_cannot_be_downgraded() -> None:
    strong = Argon2Params(memory_kib=256, iterations=2, lanes=2)
    blob = seal_keystore("pw", SECRET, params=strong)
    for weaker in ([128, 2, 2], [256, 1, 2], [256, 2, 1]):
        with pytest.raises(WrongPassphrase):
            open_keystore("pw", _rewrite(blob, 1, weaker))


def test_salt_nonce_ciphertext_are_authenticated() -> None:
    blob = seal_keystore("pw", SECRET, params=FAST)
    arr = unpack(blob, what="t")
    for index in (2, 3, 4):
        field = bytearray(arr[index])
        field[0] ^= 1
        with pytest.raises(WrongPassphrase):
            open_keystore("pw", _rewrite(blob, index, bytes(field)))


@pytest.mark.parametrize(
    "params",
    [
        [1 << 40, 3, 4],  # a terabyte: refused before any allocation
        [8 * 1024 * 1024, 1, 1],  # 8 GiB: above the bound
        [65536, 0, 4],
        [65536, 1000, 4],
        [65536, 3, 0],
        [65536, 3, 1000],
        [16, 3, 4],  # m < 8p (RFC 9106 section 3.1)
        [65536, True, 4],
        [65536, 3, "4"],
        [65536, 3],
        "params",
    ],
)
def test_absurd_params_rejected(params: object) -> None:
    blob = _rewrite(seal_keystore("pw", SECRET, params=FAST), 1, params)
    with pytest.raises(StateCorrupt):
        open_keystore("pw", blob)
    with pytest.raises(StateCorrupt):
        keystore_params(blob)


@pytest.mark.parametrize(
    "blob",
    [b"", b"\xc1", pack([1]), pack([2, [64, 1, 1], bytes(16), bytes(12), bytes(32)]),
     pack([1, [64, 1, 1], bytes(15), bytes(12), bytes(32)]),
     pack([1, [64, 1, 1], bytes(16), bytes(11), bytes(32)]),
     pack([1, [64, 1, 1], bytes(16), bytes(12), bytes(15)]),
     pack({"v": 1})],
)
def test_malformed_blobs(blob: bytes) -> None:
    with pytest.raises(StateCorrupt):
        open_keystore("pw", blob)


def test_seal_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        seal_keystore("pw", SECRET, params=Argon2Params(8, 0, 1))
    with pytest.raises(ValueError):
        seal_keystore("pw", SECRET, params=FAST, salt=b"short")


def test_weaker_than() -> None:
    assert FAST.weaker_than(RFC9106_SECOND_RECOMMENDED)
    assert not RFC9106_SECOND_RECOMMENDED.weaker_than(RFC9106_SECOND_RECOMMENDED)
    assert Argon2Params(65536, 2, 4).weaker_than(RFC9106_SECOND_RECOMMENDED)


def test_reseal_changes_the_passphrase_and_never_lowers_the_cost() -> None:
    strong = Argon2Params(memory_kib=256, iterations=2, lanes=2)
    blob = seal_keystore("old one", SECRET, params=strong)
    new = reseal_keystore("old one", "new one", blob)
    assert open_keystore("new one", new) == SECRET
    with pytest.raises(WrongPassphrase):
        open_keystore("old one", new)
    assert keystore_params(new) == strong
    assert keystore_params(reseal_keystore("old one", "x", blob, params=FAST)) == strong   # not lowered
    stronger = Argon2Params(memory_kib=512, iterations=3, lanes=2)
    assert keystore_params(reseal_keystore("old one", "x", blob, params=stronger)) == stronger
    with pytest.raises(WrongPassphrase):
        reseal_keystore("not it", "x", blob)
