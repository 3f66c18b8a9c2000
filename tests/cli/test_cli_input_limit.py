"""cli/input_limit.py:BoundedInput.bound: how key reads from the terminal are coalesced and bounded
(the pty test in tests/e2e/test_chat_pty.py shows the whole chat; this pins the rules)."""

from __future__ import annotations

from prompt_toolkit.application import Application
from prompt_toolkit.application.current import set_app
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.key_binding import KeyPress
from prompt_toolkit.keys import Keys
from prompt_toolkit.layout import BufferControl, Layout, Window

from cipherpost.cli.input_limit import BoundedInput

LIMIT = 50


def _bound(reads: list[str], buffer_text: str = "") -> tuple[list[list[KeyPress]], list[str], Buffer]:
    notes: list[str] = []
    bounded = BoundedInput.__new__(BoundedInput)      # no terminal needed for the pure part
    bounded._notify, bounded._limit, bounded._dropping = notes.append, LIMIT, False
    buffer = Buffer(document=None)
    buffer.text = buffer_text
    app: Application[None] = Application(layout=Layout(Window(BufferControl(buffer))))
    out = []
    with set_app(app):
        for read in reads:
            keys = [KeyPress(Keys.ControlM if ch == "\r" else ch) for ch in read]
            out.append(bounded.bound(keys))
    return out, notes, buffer


def test_a_run_of_characters_in_one_read_becomes_one_insertion() -> None:
    [keys], notes, _ = _bound(["hello"])
    assert [(k.key, k.data) for k in keys] == [(Keys.BracketedPaste, "hello")] and notes == []


def test_single_typed_keys_pass_through_unchanged() -> None:
    [keys], _, _ = _bound(["h"])
    assert [k.key for k in keys] == ["h"]


def test_an_over_long_stream_clears_the_line_and_is_dropped_up_to_its_enter() -> None:
    out, notes, buffer = _bound(["x" * 40, "x" * 40, "x" * 40 + "\r", "ok"], buffer_text="x" * 20)
    assert len(notes) == 1 and f"at most {LIMIT} bytes" in notes[0] and buffer.text == ""
    assert out[1] == [] and out[2] == []                       # dropped, Enter included
    assert [(k.key, k.data) for k in out[3]] == [(Keys.BracketedPaste, "ok")]


def test_a_typed_key_after_an_over_long_paste_without_newline_is_kept() -> None:
    out, notes, _ = _bound(["y" * 60, "a"])
    assert len(notes) == 1 and out[0] == []
    assert [k.key for k in out[1]] == ["a"]
