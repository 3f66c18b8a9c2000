"""cli/common.py:printable: what others wrote is shown as written, except what could fake or
reorder the screen (issue 8 item 14)."""

from __future__ import annotations

import pytest

from cipherpost.cli.common import printable

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"     # ZWJ sequence
HEART = "\u2764\ufe0f"                                    # variation selector
FLAG = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"   # tag sequence


@pytest.mark.parametrize("text", [FAMILY, HEART, FLAG, "a\tb", "caf\u00e9", "\u65e5\u672c\u8a9e", "\u00ad"])
def test_printable_unicode_sequences_and_tabs_are_shown_as_written(text: str) -> None:
    assert printable(text) == text


@pytest.mark.parametrize(("text", "shown"), [
    ("\x1b[2J", "\\x1b[2J"),
    ("a\rb", "a\\rb"),
    ("\x07", "\\x07"),
    ("\x9b31m", "\\x9b31m"),                 # C1 CSI
    ("abc\u202edcba", "abc\\u202edcba"),      # right-to-left override
    ("\u2066x\u2069", "\\u2066x\\u2069"),     # isolates
    ("\u200fx", "\\u200fx"),                  # right-to-left mark
    ("a\u2028b", "a\\u2028b"),                # line separator
])
def test_control_and_bidi_characters_become_visible_escapes(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_each_extra_line_is_indented() -> None:
    assert printable("one\ntwo") == "one\n    two"
