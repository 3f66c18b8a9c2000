"""Names from the network (client/names.py) and relay text in errors (client/errors.py)."""

from __future__ import annotations

import pytest

from cipherpost.client.errors import ServerError
from cipherpost.client.names import InvalidSenderName, check_sender, confusable_with, shown_name


@pytest.mark.parametrize("bad", ["Bob", "bob\u200b", "b\u043eb", "bo\x1b[2Jb", " bob", "bob ",
                                 "\uff42\uff4f\uff42", "bo", "x" * 33, "_bob", "", "b\u202eob", None, 7])
def test_names_the_relay_would_not_accept_are_refused(bad: object) -> None:
    with pytest.raises(InvalidSenderName) as info:
        check_sender(bad, "alice")
    assert "\x1b" not in str(info.value) and "\u202e" not in str(info.value)


def test_own_name_is_refused_and_valid_names_pass() -> None:
    with pytest.raises(InvalidSenderName, match="your own name"):
        check_sender("alice", "alice")
    for good in ("bob", "bob.smith", "b0b", "7up", "a_b-c"):
        assert check_sender(good, "alice") == good


def test_shown_name_is_ascii_and_bounded() -> None:
    shown = shown_name("\x1b]52;c;" + "x" * 200)
    assert shown.isascii() and "\x1b" not in shown and len(shown) < 60


@pytest.mark.parametrize(("new", "existing"), [("b0b", "bob"), ("bob_", "bob"), ("rnallory", "mallory"),
                                               ("1ily", "lily"), ("bob.", "bob"), ("i1l", "lil")])
def test_lookalikes_name_the_existing_contact(new: str, existing: str) -> None:
    assert confusable_with(new, ["carol", existing]) == existing


def test_different_names_and_the_name_itself_are_not_lookalikes() -> None:
    assert confusable_with("bob", ["bob", "carol"]) is None
    assert confusable_with("bobsmith", ["bob.smith"]) is None


def test_relay_error_text_is_printable() -> None:
    err = ServerError("bad\x1b[2J", "line\nfake\u202e" + "y" * 1000)
    text = str(err)
    assert "\x1b" not in text and "\n" not in text and "\u202e" not in text and len(text) < 700
    assert err.code == "bad\\x1b[2J"
