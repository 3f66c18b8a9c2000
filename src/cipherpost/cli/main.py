"""``cipherpost``: the command line. Every command is a thin wrapper around :class:`cipherpost.Client`.

Exit codes: 0 success, 1 failure (one line on stderr saying why), 2 wrong usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..client.client import ONE_TIME_POOL_TARGET, Client, IncomingMessage
from ..client.connection import parse_fingerprint
from ..client.errors import ClientError, ConnectionFailed
from ..client.home import default_home, resolve_username
from ..crypto.errors import CryptoError
from ..protocol.errors import ProtocolError
from .common import UsageError, fmt_time, group_digits, message_lines, printable, read_passphrase
from .contacts_cmd import register as register_contact_commands
from .group_cmd import register as register_group_commands
from .group_cmd import send_group
from .server_cmd import register as register_server_commands
from .verify_password import verify_with_password

DEFAULT_SERVER = "wss://127.0.0.1:8765"
USER_ENV = "CIPHERPOST_USER"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cipherpost",
        description="End-to-end encrypted messaging through a relay that cannot read your messages.",
        epilog="Start here: `cipherpost server` in one terminal, `cipherpost client` in two others. "
               "`cipherpost demo --explain` shows every step. Passphrases come from the terminal or "
               "CIPHERPOST_PASSPHRASE.")
    parser.add_argument("--version", action="version", version=f"cipherpost {__version__}")
    parser.add_argument("--home", type=Path, default=None,
                        help="where profiles live (default: CIPHERPOST_HOME or the platform data dir)")
    parser.add_argument("--user", default=None,
                        help="which local profile to use when the home holds several (or CIPHERPOST_USER)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    register_server_commands(sub)  # `server` and `invite`: the relay's own flags live with it

    p = sub.add_parser("client", help="interactive chat (creates or unlocks your profile)")
    p.add_argument("--server", default=None,
                   help=f"relay address for a new profile (default {DEFAULT_SERVER})")
    p.set_defaults(func=_cmd_client)

    p = sub.add_parser("init", help="create an identity and register it with a relay")
    p.add_argument("name", help="your username: 3-32 of a-z 0-9 . _ -")
    p.add_argument("--server", required=True, help="relay address, e.g. wss://chat.example.org:8765")
    p.add_argument("--server-fingerprint", default=None,
                   help="pin this certificate (SHA256:... as printed by the server) instead of trusting "
                        "the first one seen")
    p.add_argument("--invite", default=None, help="invite token, if the relay requires one")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("send", help="send one message")
    p.add_argument("--group", default=None, metavar="GROUP", help="send to the group GROUP (no NAME)")
    p.add_argument("name", help="recipient username")
    p.add_argument("text", nargs="*", help="message text ('-' reads it from standard input)")
    p.set_defaults(func=_cmd_send)

    p = sub.add_parser("recv", help="fetch and print new messages")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for a message to arrive (default: only what is queued)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: id, from, text, sent_at, received_at, warning")
    p.set_defaults(func=_cmd_recv)

    p = sub.add_parser("contacts", help="list contacts and their verification state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_contacts)

    p = sub.add_parser("fingerprint", help="your identity fingerprint, or the safety number with NAME")
    p.add_argument("name", nargs="?", help="contact: show the safety number you share with them")
    p.add_argument("--qr", action="store_true", help="also draw it as a QR code")
    p.set_defaults(func=_cmd_fingerprint)

    p = sub.add_parser("verify", help="verify a contact (safety number or shared password)")
    p.add_argument("name")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--safety-number", metavar="DIGITS",
                     help="the 60 digits your contact reads to you (spaces allowed)")
    how.add_argument("--password", action="store_true",
                     help="both of you enter the same password; proves the keys through the relay (SPAKE2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the other side")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("history", help="show the conversation with NAME")
    p.add_argument("name")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_history)

    register_contact_commands(sub, _run)   # block, unblock, accept, requests
    register_group_commands(sub, _run)     # group create|add|remove|leave|list|info

    p = sub.add_parser("demo", help="a throwaway relay and two users chatting, explained")
    p.add_argument("--explain", action="store_true",
                   help="show what each side computes and exactly what the server stores")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except UsageError as exc:
        print(f"cipherpost: {exc}", file=sys.stderr)
        return 2
    except (ClientError, CryptoError, ProtocolError, ValueError) as exc:
        print(f"cipherpost: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- helpers
def _home(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else default_home()


def _open(args: argparse.Namespace) -> Client:
    home = _home(args)
    username = resolve_username(home, args.user or os.environ.get(USER_ENV))
    return Client.open(home, username, read_passphrase(f"Passphrase for {username}: "))


def _run(args: argparse.Namespace, body: Callable[[Client], Awaitable[int]]) -> int:
    async def runner() -> int:
        client = _open(args)
        try:
            return await body(client)
        finally:
            await client.close()
    return asyncio.run(runner())


def _message_json(m: IncomingMessage) -> dict[str, Any]:
    return {"id": m.id, "from": m.sender, "text": m.text, "sent_at": m.sent_at,
            "received_at": m.received_at, "warning": m.warning, "group": m.group}


def print_message(m: IncomingMessage) -> None:
    print("\n".join(message_lines(m, fmt_time)))


# --------------------------------------------------------------------------- commands
def _cmd_client(args: argparse.Namespace) -> int:
    from .chat import run_chat
    return run_chat(_home(args), args.user or os.environ.get(USER_ENV), args.server)


def _cmd_init(args: argparse.Namespace) -> int:
    pin = parse_fingerprint(args.server_fingerprint) if args.server_fingerprint else None
    passphrase = read_passphrase(f"New passphrase for {args.name}: ", confirm=True)

    async def create() -> int:
        print(f"creating an identity and {2 * ONE_TIME_POOL_TARGET} one-time prekeys, registering "
              f"'{args.name}' with {args.server}...", file=sys.stderr, flush=True)
        client = await Client.create(_home(args), args.name, args.server, passphrase,
                                     server_fingerprint=pin, invite=args.invite)
        try:
            print(f"created {client.username} on {client.server_url}")
            print(f"your identity fingerprint: {client.identity.public.fingerprint_text()}")
            how = "as given" if pin else "on first use - compare it with the fingerprint the server printed"
            print(f"server certificate pinned ({how}): {client.server_fingerprint}")
        finally:
            await client.close()
        return 0
    return asyncio.run(create())


def _cmd_send(args: argparse.Namespace) -> int:
    if args.group is not None:   # `send --group G TEXT...`: argparse took the first word as the name
        args.text = [args.name, *args.text]
    text = sys.stdin.read().rstrip("\n") if args.text == ["-"] else " ".join(args.text)
    if not text:
        raise UsageError("nothing to send")
    if args.group is not None:
        return _run(args, lambda client: send_group(client, args.group, text))

    async def body(client: Client) -> int:
        offline: ConnectionFailed | None = None
        try:
            await client.connect()
        except ConnectionFailed as exc:
            offline = exc   # with an existing session the message can still go to the outbox
        msg_id = await client.send(args.name, text)
        if client.pending_outbox():
            reason = f" ({offline})" if offline else ""
            print(f"queued {msg_id.hex()}: not yet accepted by the relay{reason}; it is kept in the "
                  "outbox and sent on the next connection (any cipherpost command)", file=sys.stderr)
            return 1
        print(f"sent {msg_id.hex()} to {args.name}")
        return 0
    return _run(args, body)


def _cmd_recv(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        for m in await client.receive(wait=args.wait):
            if args.json:
                print(json.dumps(_message_json(m)), flush=True)
            else:
                print_message(m)
        return 0
    return _run(args, body)


def _cmd_contacts(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        rows: list[dict[str, Any]] = []
        for c in client.contacts():
            state = "verified" if c.verified else "unverified"
            if c.blocked:
                state = "BLOCKED: verification failed"
            if c.pending_identity:
                state = "KEY CHANGED (" + ("was verified" if c.verified else "unverified") + ")"
            rows.append({"name": c.name, "state": state, "added_at": c.added_at})
        if args.json:
            for row in rows:
                print(json.dumps(row))
        elif not rows:
            print("no contacts yet: `cipherpost send NAME TEXT` starts a conversation")
        else:
            width = max(len(printable(r["name"])) for r in rows)
            for row in rows:
                print(f"{printable(row['name']):<{width}}  {row['state']}")
        return 0
    return _run(args, body)


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    import segno  # only this command draws QR codes

    async def body(client: Client) -> int:
        if args.name is None:
            print(f"{client.username}: {client.identity.public.fingerprint_text()}")
            if args.qr:
                segno.make(client.identity.public.fingerprint(), error="m").terminal(compact=True)
            return 0
        number = client.safety_number(args.name)
        print(f"safety number with {args.name}:\n{group_digits(number.digits)}")
        if args.qr:
            segno.make(number.qr_payload(), error="m").terminal(compact=True)
        return 0
    return _run(args, body)


def _cmd_verify(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        if args.password:   # also works for someone not yet a contact: their key is fetched first
            return await verify_with_password(client, args.name, timeout=args.timeout)
        contact = client.contact(args.name)
        candidate = contact.pending_identity or contact.identity
        if contact.pending_identity:
            print(f"!! {args.name}'s identity key CHANGED.")
            print(f"old safety number:\n{group_digits(client.safety_number(args.name).digits)}")
        number = client.safety_number(args.name, candidate)
        if args.safety_number is not None:
            if client.verify_safety_number(args.name, args.safety_number):
                print(f"{args.name} is verified: the safety numbers match.")
                return 0
            print(f"cipherpost: error: the safety number does NOT match; {args.name} stays unverified",
                  file=sys.stderr)
            return 1
        print(f"safety number with {args.name}:\n{group_digits(number.digits)}")
        if not sys.stdin.isatty():
            raise UsageError("compare interactively in a terminal, or pass --safety-number DIGITS")
        answer = input(f"Does {args.name} see exactly the same number? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print(f"not verified. If the numbers differ, someone may be between you and {args.name}.")
            return 1
        client.accept_identity(args.name, candidate, verified=True)   # exactly the key shown
        print(f"{args.name} is verified.")
        return 0
    return _run(args, body)


def _cmd_history(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        client.contact(args.name)
        for m in client.history(args.name, args.limit):
            if args.json:
                print(json.dumps({"id": m.msg_id.hex(), "direction": m.direction, "text": m.text,
                                  "sent_at": m.sent_at, "received_at": m.received_at, "status": m.status}))
                continue
            who = client.username if m.direction == "out" else args.name
            mark = "" if m.status in ("sent", "shown", "new") else f"  ({m.status})"
            prefix = "!! " if m.direction == "event" else ""
            print(f"[{fmt_time(m.sent_at or m.received_at)}] {prefix}{who}: {printable(m.text)}{mark}")
        return 0
    return _run(args, body)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(explain=args.explain)


if __name__ == "__main__":
    raise SystemExit(main())
