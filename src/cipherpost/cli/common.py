"""Small helpers shared by the CLI commands: passphrases, output, exit codes."""

from __future__ import annotations

import getpass
import os
import sys
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..client.client import IncomingMessage

PASSPHRASE_ENV = "CIPHERPOST_PASSPHRASE"  # noqa: S105 (a variable name)


class UsageError(Exception):
    """A problem with how the command was called (exit code 2)."""


def read_passphrase(prompt: str = "Passphrase: ", *, confirm: bool = False) -> str:
    """From ``CIPHERPOST_PASSPHRASE`` (scripts, tests) or the terminal, never echoed."""
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise UsageError(f"no terminal to ask for the passphrase: set {PASSPHRASE_ENV}")
    first = getpass.getpass(prompt)
    if confirm:
        if len(first) < 8:
            raise UsageError("choose a passphrase of at least 8 characters")
        if getpass.getpass("Repeat passphrase: ") != first:
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


def printable(text: str) -> str:
    """Text from others made harmless for the terminal: control and format characters (escape
    sequences could clear the screen, fake lines or set the clipboard; bidi overrides could reorder
    what is shown) become visible escapes, and each extra line is indented so it cannot pass for
    a new message."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\n    ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def message_lines(m: IncomingMessage, when: Callable[[int | None], str]) -> list[str]:
    """How a received message (or a failure notice) is shown, with ``when`` formatting times."""
    if m.warning == "undecryptable":
        return [f"!! [{when(m.received_at)}] {printable(m.text)}"]
    lines = [f"!! WARNING: {printable(m.warning)}"] if m.warning else []
    if m.group is not None:   # a group message or event: the group, then the sender
        who = f"[{printable(m.group)}] {printable(m.sender)}: " if m.sender else f"[{printable(m.group)}] -- "
        return [*lines, f"[{when(m.sent_at or m.received_at)}] {who}{printable(m.text)}"]
    return [*lines, f"[{when(m.sent_at)}] {printable(m.sender)}: {printable(m.text)}"]
