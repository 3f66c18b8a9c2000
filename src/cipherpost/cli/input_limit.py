"""Bounded chat input: the line being typed or pasted never grows past one message.

Pasting 100 KB into the chat used to freeze it for a minute and grow the process to gigabytes
before the send was refused. Two prompt_toolkit costs did it: every key press goes through the
key-binding lookup (~0.3 ms each, so 100,000 keys took ~40 s), and its self-insert saved the whole
growing line to the undo stack before each key (its merged bindings never count a key as a
repeat), keeping 100,000 copies of the line. Here:

- :class:`BoundedInput` turns each run of plain characters that arrives in one read (a paste, or
  keys typed faster than they are read) into one insertion, and once such a run would take the
  line past :data:`~cipherpost.client.plaintext.MAX_TEXT_BYTES` characters, clears the line, says
  so with the limit named, and drops the rest of that stream up to and including its Enter before
  any key lookup: nothing of it is sent, and the cost is a string join per read.
- :func:`limited_input_bindings` refuses a bracketed paste that would not fit (whole: nothing of
  it is inserted), and inserts typed characters without an undo copy of the line each time.

(The exact limit is in UTF-8 bytes; ``Client.send`` checks it, so a line of multi-byte characters
under this bound can still be refused there, with the same limit named.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from prompt_toolkit.application.current import get_app
from prompt_toolkit.filters import Condition, emacs_insert_mode, vi_insert_mode
from prompt_toolkit.input.vt100 import Vt100Input
from prompt_toolkit.key_binding import KeyBindings, KeyPress, KeyPressEvent
from prompt_toolkit.keys import Keys

from ..client.plaintext import MAX_TEXT_BYTES

Notify = Callable[[str], None]


def refusal(limit: int = MAX_TEXT_BYTES, *, outcome: str = "the line was cleared, NOT sent") -> str:
    return (f"!! input refused: a message is at most {limit} bytes; {outcome} (send a long text "
            "as a file: /file PATH)")


def _plain(key_press: KeyPress) -> bool:
    return not isinstance(key_press.key, Keys) and key_press.key.isprintable()


class BoundedInput(Vt100Input):
    """Standard input for the chat line; see the module docstring."""

    def __init__(self, notify: Notify, limit: int = MAX_TEXT_BYTES) -> None:
        super().__init__(sys.stdin)
        self._notify = notify
        self._limit = limit
        self._dropping = False   # inside an over-long stream: drop up to its Enter

    def read_keys(self) -> list[KeyPress]:
        return self.bound(super().read_keys())

    def bound(self, keys: list[KeyPress]) -> list[KeyPress]:
        out: list[KeyPress] = []
        run: list[str] = []

        def flush_run() -> None:
            if not run:
                return
            text = "".join(run)
            run.clear()
            if self._dropping and len(text) > 1:
                return   # more of the over-long stream
            # One key in a read is a person typing, not a paste: the over-long stream is over
            # (a paste without a final newline must not swallow what is typed next).
            self._dropping = False
            if len(text) == 1:
                out.append(KeyPress(text))   # one typed key: ordinary key handling (vi commands too)
                return
            buffer = get_app().current_buffer
            if len(buffer.text) + len(text) > self._limit:
                buffer.reset()
                self._dropping = True
                self._notify(refusal(self._limit))
                return
            out.append(KeyPress(Keys.BracketedPaste, text))

        for key_press in keys:
            if _plain(key_press):
                run.append(key_press.data)
                continue
            flush_run()
            if self._dropping and key_press.key in (Keys.ControlM, Keys.ControlJ):
                self._dropping = False   # the over-long line ends here, unsent
                continue
            if self._dropping and key_press.key not in (Keys.ControlC, Keys.ControlD):
                continue
            out.append(key_press)
        flush_run()
        return out


def limited_input_bindings(notify: Notify, limit: int = MAX_TEXT_BYTES) -> KeyBindings:
    """Bracketed pastes that would take the line past ``limit`` are refused whole; typed characters
    are inserted without an undo copy of the whole line each time."""
    kb = KeyBindings()
    insert_mode = vi_insert_mode | emacs_insert_mode

    def full() -> bool:
        return len(get_app().current_buffer.text) >= limit

    @kb.add(Keys.Any, filter=Condition(full))
    def _drop(event: KeyPressEvent) -> None:
        notify(refusal(limit, outcome="that key was not added"))

    @kb.add(Keys.Any, filter=insert_mode & ~Condition(full), save_before=lambda _event: False)
    def _insert(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text(event.data * event.arg)

    @kb.add(Keys.BracketedPaste)
    def _paste(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        data = event.data.replace("\r\n", "\n").replace("\r", "\n")
        if len(buffer.text) + len(data) > limit:
            notify(refusal(limit, outcome="nothing of the paste was inserted"))   # refused whole
            return
        buffer.insert_text(data)

    return kb
