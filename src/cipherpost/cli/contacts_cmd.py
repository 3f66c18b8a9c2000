"""``block``, ``unblock``, ``accept`` and ``requests``: who may write to you (CLI and chat commands).

Registered by ``cli/main.py`` (``register(sub, run)``) and dispatched from the chat
(``chat_command``); both end in :class:`cipherpost.Client` methods (``client/blocks.py``,
``client/requests.py``).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Awaitable, Callable

from ..client.client import Client
from ..client.errors import ConnectionFailed
from . import output as out
from .common import fmt_time, printable

Runner = Callable[[argparse.Namespace, Callable[[Client], Awaitable[int]]], int]
CHAT_COMMANDS = ("/block", "/unblock", "/accept", "/requests")
CHAT_HELP = ("  /requests         strangers who wrote to you (not contacts yet)\n"
             "  /accept NAME      make a stranger who wrote to you a contact\n"
             "  /block NAME       drop everything NAME sends, unseen (/unblock NAME undoes it)")


def register(add: Callable[..., argparse.ArgumentParser], run: Runner) -> None:
    """``add(name, help=...)`` makes a subcommand parser (cli/main.py's, with the global options)."""
    p = add("block", help="drop everything NAME sends, unseen (and tell the relay, if it can)")
    p.add_argument("name", help="the sender to block (a contact, a stranger or a message request)")
    p.set_defaults(func=lambda args: run(args, lambda c: _block(c, args.name, True)))

    p = add("unblock", help="receive NAME's messages again")
    p.add_argument("name", help="a blocked sender")
    p.set_defaults(func=lambda args: run(args, lambda c: _block(c, args.name, False)))

    p = add("accept", help="accept a message request: make the stranger NAME a contact")
    p.add_argument("name", help="who wrote to you (see `cipherpost requests`)")
    p.set_defaults(func=lambda args: run(args, lambda c: _accept(c, args.name)))

    p = add("requests", help="strangers who wrote to you and are not contacts yet")
    p.set_defaults(func=lambda args: run(args, _requests))


async def _block(client: Client, name: str, on: bool) -> int:
    with contextlib.suppress(ConnectionFailed):
        await client.connect()   # to tell the relay now; offline, it is told on the next connect
    if on:
        await client.block(name)
        out.line(f"blocked {printable(name)}: their messages are dropped unseen (`cipherpost unblock "
              f"{printable(name)}` undoes it)")
    else:
        await client.unblock(name)
        out.line(f"unblocked {printable(name)}")
    return 0


async def _accept(client: Client, name: str) -> int:
    contact = client.accept_request(name)
    out.line(f"{printable(contact.name)} is now a contact (unverified: compare safety numbers with "
          f"`cipherpost verify {printable(contact.name)}`)")
    for line in _lookalike(client, contact.name):
        out.line(line)
    return 0


async def _requests(client: Client) -> int:
    for line in request_lines(client):
        out.line(line)
    return 0


def _lookalike(client: Client, name: str) -> list[str]:
    for r in client.message_requests():
        if r.name == name and r.warning:
            return [f"!! WARNING: {printable(r.warning)}"]
    from ..client.names import confusable_warning
    warning = confusable_warning(name, [c.name for c in client.contacts()])
    return [f"!! WARNING: {printable(warning)}"] if warning else []


def request_lines(client: Client) -> list[str]:
    requests = client.message_requests()
    if not requests:
        return ["no message requests"]
    lines = []
    for r in requests:
        name = printable(r.name)
        keys = f", under {r.keys} different keys" if r.keys > 1 else ""
        lines.append(f"{name}: {r.messages} message(s) since {fmt_time(r.first_at)}{keys} - "
                     f"`cipherpost accept {name}` or `cipherpost block {name}`")
        if r.warning:
            lines.append(f"  !! WARNING: {printable(r.warning)}")
    return lines


async def chat_command(client: Client, cmd: str, arg: str) -> None:
    """One of :data:`CHAT_COMMANDS` typed in the chat."""
    if cmd == "/requests":
        for line in request_lines(client):
            print(line)
        return
    if not arg:
        print(f"usage: {cmd} NAME")
        return
    if cmd == "/accept":
        contact = client.accept_request(arg)
        name = printable(contact.name)
        print(f"-- {name} is now a contact (unverified: /safety {name})")
        for line in _lookalike(client, contact.name):
            print(line)
    elif cmd == "/block":
        await client.block(arg)
        print(f"-- blocked {printable(arg)}: their messages are dropped unseen (/unblock {printable(arg)})")
    else:
        await client.unblock(arg)
        print(f"-- unblocked {printable(arg)}")
