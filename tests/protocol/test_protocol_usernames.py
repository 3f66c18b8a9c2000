"""Username normalisation shared by client and server."""

from __future__ import annotations

import pytest

from cipherpost.protocol.errors import ProtocolError
from cipherpost.protocol.usernames import normalize_username, require_normalized, skeleton


@pytest.mark.parametrize(("raw", "normal"), [
    ("alice", "alice"), ("Alice", "alice"), ("  bob.smith ", "bob.smith"),
    ("\uff21\uff2c\uff29\uff23\uff25", "alice"),
    ("a_b-c.9", "a_b-c.9"), ("7up", "7up"), ("x" * 32, "x" * 32),
])
def test_normalize(raw: str, normal: str) -> None:
    assert normalize_username(raw) == normal


@pytest.mark.parametrize("bad", ["ab", "x" * 33, "_bob", ".bob", "bo b", "bob!", "\u00e9lodie", "",
                                 "a" * 500])
def test_invalid(bad: str) -> None:
    with pytest.raises(ProtocolError) as info:
        normalize_username(bad)
    assert info.value.code == "invalid_username"


def test_require_normalized() -> None:
    assert require_normalized("alice") == "alice"
    for not_normal in ("Alice", " alice", "alice\n", "\uff21\uff2c\uff29\uff23\uff25"):
        with pytest.raises(ProtocolError) as info:
            require_normalized(not_normal)
        assert info.value.code == "invalid_username" and "normal form" in info.value.message


@pytest.mark.parametrize(("a", "b"), [
    ("bob", "b0b"), ("alice", "a1ice"), ("alice", "aIice"), ("mallory", "rnallory"), ("bob", "bob_"),
    ("bob", "bob."), ("bob", "BOB"), ("will", "wi11"), ("admin", "adrnin"), ("lily", "1i1y"),
])
def test_confusable_names_share_a_skeleton(a: str, b: str) -> None:
    assert skeleton(a) == skeleton(b)


@pytest.mark.parametrize(("a", "b"), [("bob", "rob"), ("bob.smith", "bobsmith"), ("alice", "alicia"),
                                      ("bob", "bob2")])
def test_distinct_names_have_distinct_skeletons(a: str, b: str) -> None:
    assert skeleton(a) != skeleton(b)


def test_skeleton_refuses_invalid_names() -> None:
    with pytest.raises(ProtocolError):
        skeleton("b\u043eb")  # Cyrillic o: never a valid name, so never compared
