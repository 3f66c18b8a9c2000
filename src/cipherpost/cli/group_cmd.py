"""``group create|add|remove|leave|list|info`` and ``send --group``: group chats on the command line
and in the chat (``/group NAME``, ``/groups``). Everything ends in :class:`cipherpost.Client` methods
(``client/groups.py``); docs/groups.md is the protocol.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ..client.client import Client
from ..client.errors import ConnectionFailed
from ..client.group_store import GroupInfo
from .common import fmt_time, printable

Runner = Callable[[argparse.Namespace, Callable[[Client], Awaitable[int]]], int]
CHAT_HELP = ("  /groups           your groups\n"
             "  /group NAME       write to the group NAME (/to NAME goes back to one person)")


def register(sub: Any, run: Runner) -> None:
    p = sub.add_parser("group", help="group chats: create, add, remove, leave, list, info")
    gsub = p.add_subparsers(dest="group_command", metavar="ACTION", required=True)
    q = gsub.add_parser("create", help="create the group NAME with MEMBER... (you are its admin)")
    q.add_argument("name", help="the group's name (yours alone: the relay never sees it)")
    q.add_argument("members", nargs="+", help="usernames of the other members")
    q.add_argument("--admin", action="append", default=[], metavar="MEMBER",
                   help="make MEMBER an admin too (repeatable)")
    q.set_defaults(func=lambda a: run(a, lambda c: _change(c, "create", a.name, a.members, a.admin)))
    for action, text in (("add", "add MEMBER... (admins only)"),
                         ("remove", "remove MEMBER... (admins only)")):
        q = gsub.add_parser(action, help=text)
        q.add_argument("name", help="the group")
        q.add_argument("members", nargs="+", help="usernames")
        q.set_defaults(func=lambda a, action=action: run(a, lambda c: _change(c, action, a.name, a.members)))
    q = gsub.add_parser("leave", help="leave the group NAME")
    q.add_argument("name", help="the group")
    q.set_defaults(func=lambda a: run(a, lambda c: _change(c, "leave", a.name, [])))
    q = gsub.add_parser("list", help="your groups")
    q.add_argument("--json", action="store_true",
                   help="one JSON object per group: name, id, version, status, members, admins, verified, "
                        "key_changed")
    q.set_defaults(func=lambda a: run(a, lambda c: _list(c, a.json)))
    q = gsub.add_parser("history", help="the group's conversation, from the local encrypted history")
    q.add_argument("name", help="the group")
    q.add_argument("--limit", type=int, default=50, help="show the last N entries (default 50)")
    q.add_argument("--json", action="store_true",
                   help="one JSON object per entry: id, direction, from, text, sent_at, received_at, status, "
                        "warning")
    q.set_defaults(func=lambda a: run(a, lambda c: _history(c, a.name, a.limit, a.json)))
    q = gsub.add_parser("info", help="members, admins and each member's verification state")
    q.add_argument("name", help="the group")
    q.add_argument("--json", action="store_true", help="one JSON object, as one line of `group list --json`")
    q.set_defaults(func=lambda a: run(a, lambda c: _info(c, a.name, a.json)))


async def _connect(client: Client) -> None:
    try:
        await client.connect()
    except ConnectionFailed as exc:
        print(f"cipherpost: not connected ({exc}); changes are queued", file=sys.stderr)


async def _change(client: Client, action: str, name: str, members: list[str],
                  admins: list[str] | None = None) -> int:
    await _connect(client)
    # Apply what others changed first (a change must follow the latest state); shown by the next recv.
    await client.receive(mark_shown=False)
    if action == "create":
        info = await client.create_group(name, members, tuple(admins or ()))
    elif action == "add":
        info = await client.group_add(name, members)
    elif action == "remove":
        info = await client.group_remove(name, members)
    else:
        info = await client.group_leave(name)
    names = ", ".join(m.name for m in info.members)
    print(f"{printable(info.name)}: version {info.version}, members {printable(names)}")
    return 0


async def _list(client: Client, as_json: bool) -> int:
    for info in client.group_list():
        if as_json:
            print(json.dumps(info.to_json()))
        else:
            print(f"{printable(info.name)}  {len(info.members)} members  ({info.status})")
    return 0


async def _info(client: Client, name: str, as_json: bool) -> int:
    info = client.group_info(name)
    if as_json:
        print(json.dumps(info.to_json()))
        return 0
    print(_describe(info))
    return 0


async def _history(client: Client, name: str, limit: int, as_json: bool) -> int:
    for m in client.group_history(name, limit):
        sender = client.username if m.direction == "out" else str(m.extra.get("from", ""))
        if as_json:
            print(json.dumps({"id": m.msg_id.hex(), "direction": m.direction, "from": sender, "text": m.text,
                              "sent_at": m.sent_at, "received_at": m.received_at, "status": m.status,
                              "warning": m.extra.get("warning")}))
            continue
        mark = "" if m.status in ("sent", "shown", "new") else f"  ({m.status})"
        who = f"{printable(sender)}: " if sender else "-- "
        print(f"[{fmt_time(m.sent_at or m.received_at)}] {who}{printable(m.text)}{mark}")
    return 0


def _describe(info: GroupInfo) -> str:
    lines = [f"{printable(info.name)} (version {info.version}, {info.status})"]
    for m in info.members:
        flags = [f for f, on in (("admin", m.admin), ("verified", m.verified),
                                 ("KEY CHANGED: verify", m.key_changed)) if on]
        lines.append(f"  {printable(m.name)}{'  [' + ', '.join(flags) + ']' if flags else ''}")
    return "\n".join(lines)


async def send_group(client: Client, group: str, text: str) -> int:
    """``send --group NAME TEXT``."""
    await _connect(client)
    await client.receive(mark_shown=False)   # a removal seen now rotates our key before this message
    msg_id = await client.send_group(group, text)
    print(f"sent {msg_id.hex()} to the group {printable(group)}")
    return 0


async def chat_command(client: Client, cmd: str, arg: str) -> str | None:
    """``/groups`` prints the list; ``/group NAME`` returns the group to write to."""
    if cmd == "/groups":
        for info in client.group_list():
            print(f"{printable(info.name)}  {len(info.members)} members  ({info.status})")
        return None
    client.group_info(arg)   # raises for an unknown group
    print(f"writing to the group {printable(arg)}")
    return arg
