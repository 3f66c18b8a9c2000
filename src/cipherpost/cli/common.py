"""Small helpers shared by the CLI commands: passphrases, output, exit codes."""

from __future__ import annotations

import getpass
import os
import signal
import sys
import threading
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..client.client import IncomingMessage
    from ..client.profile import Contact

PASSPHRASE_ENV = "CIPHERPOST_PASSPHRASE"  # noqa: S105 (a variable name)
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as shells report a command ended by Ctrl-C


class UsageError(Exception):
    """A problem with how the command was called (exit code 2)."""


class Interrupted(Exception):
    """Ctrl-C at a prompt: the command ends at once with exit code 130 and one line. An ordinary
    exception, so the command's cleanup (closing the profile) runs on the way out."""


class PromptClosed(Exception):
    """End of input (Ctrl-D) at a prompt: nothing was answered."""


def prompt_line(prompt: str, *, secret: bool = False) -> str:
    """One line from the terminal (``secret``: not echoed). Ctrl-C raises :class:`Interrupted` at
    once, also inside ``asyncio.run``: asyncio's own SIGINT handler only cancels the main task,
    which a blocking read never notices, so the first Ctrl-C used to be ignored and the next line
    typed was taken as the answer."""
    previous = signal.getsignal(signal.SIGINT)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return getpass.getpass(prompt) if secret else input(prompt)
    except KeyboardInterrupt:
        raise Interrupted from None
    except EOFError:
        raise PromptClosed from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def read_passphrase(prompt: str = "Passphrase: ", *, confirm: bool = False) -> str:
    """From ``CIPHERPOST_PASSPHRASE`` (scripts, tests) or the terminal, never echoed."""
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise UsageError(f"no terminal to ask for the passphrase: set {PASSPHRASE_ENV}")
    first = prompt_line(prompt, secret=True)
    if confirm:
        if len(first) < 8:
            raise UsageError("choose a passphrase of at least 8 characters")
        if prompt_line("Repeat passphrase: ", secret=True) != first:
            raise UsageError("the two passphrases differ")
    return first


def fmt_time(ms: int | None) -> str:
    if ms is None:
        return "--:--"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def group_digits(digits: str, per_line: int = 6) -> str:
    groups = [digits[i : i + 5] for i in range(0, len(digits), 5)]
    lines = [" ".join(groups[i : i + per_line]) for i in range(0, len(groups), per_line)]
    return "\n".join(lines)


# Bidirectional controls: they reorder what is shown (the "Trojan Source" attack, CVE-2021-42574).
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """Text from others made harmless for the terminal: control characters (escape sequences could
    clear the screen, fake lines or set the clipboard), line and paragraph separators, and bidi
    controls (they could reorder what is shown) become visible escapes, and each extra line is
    indented so it cannot pass for a new message. Everything else is shown as written: emoji built
    with a zero-width joiner or variation selectors, tag sequences (flags), tabs."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\n    ")
        elif ch == "\t":
            out.append(ch)
        elif ch in BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def contact_state(c: Contact) -> tuple[str, str]:
    """``(state, display text)``: state is one of unverified, verified, key_changed, blocked (fixed,
    for scripts: ``contacts --json``); the text is what people read (CLI and chat)."""
    if c.pending_identity:
        return "key_changed", "KEY CHANGED (" + ("was verified" if c.verified else "unverified") + ")"
    if c.blocked:
        return "blocked", "BLOCKED: " + c.blocked
    if c.verified:
        return "verified", "verified"
    return "unverified", "unverified"


def message_lines(m: IncomingMessage, when: Callable[[int | None], str]) -> list[str]:
    """How a received message (or a failure notice) is shown, with ``when`` formatting times."""
    if m.warning == "undecryptable":
        return [f"!! [{when(m.received_at)}] {printable(m.text)}"]
    lines = [f"!! WARNING: {printable(m.warning)}"] if m.warning else []
    if m.group is not None:   # a group message or event: the group, then the sender
        who = f"[{printable(m.group)}] {printable(m.sender)}: " if m.sender else f"[{printable(m.group)}] -- "
        return [*lines, f"[{when(m.sent_at or m.received_at)}] {who}{printable(m.text)}"]
    return [*lines, f"[{when(m.sent_at)}] {printable(m.sender)}: {printable(m.text)}"]
