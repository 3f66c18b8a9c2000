"""``cipherpost``: the command line. Every command is a thin wrapper around :class:`cipherpost.Client`.

Exit codes: 0 success, 1 failure (one line on stderr saying why), 2 wrong usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..client.client import ONE_TIME_POOL_TARGET, Client, IncomingMessage
from ..client.connection import check_server_url, format_fingerprint, parse_fingerprint
from ..client.errors import ClientError, ConnectionFailed, ServerPinMismatch
from ..client.home import default_home, resolve_username
from ..client.passphrase import change_passphrase
from ..client.plaintext import MAX_TEXT_BYTES, EmptyMessage, MessageTooLong, check_text
from ..crypto.errors import CryptoError
from ..protocol.errors import ProtocolError
from . import file_cmd
from . import output as out
from .account_cmd import print_recovery_code
from .account_cmd import register as register_account_commands
from .admin_cmd import register as register_admin_commands
from .common import (
    EXIT_INTERRUPTED,
    Interrupted,
    PromptClosed,
    UsageError,
    contact_state,
    fmt_time,
    group_digits,
    message_lines,
    printable,
    prompt_line,
    read_passphrase,
)
from .contacts_cmd import register as register_contact_commands
from .group_cmd import register as register_group_commands
from .group_cmd import send_group
from .server_cmd import register as register_server_commands
from .verify_password import verify_with_password

DEFAULT_SERVER = "wss://127.0.0.1:8765"
USER_ENV = "CIPHERPOST_USER"
NEW_PASSPHRASE_ENV = "CIPHERPOST_NEW_PASSPHRASE"  # noqa: S105 (a variable name)
MARK_SHOWN_EVERY = 100   # recv commits "shown" in batches (one fsync each), never before the print


ENVIRONMENT = """\
environment:
  CIPHERPOST_HOME             where profiles live (as --home)
  CIPHERPOST_USER             which local profile to use (as --user)
  CIPHERPOST_PASSPHRASE       the profile's passphrase, for scripts (otherwise asked on the terminal)
  CIPHERPOST_NEW_PASSPHRASE   the new passphrase for `cipherpost passphrase`, for scripts
  CIPHERPOST_VERIFY_PASSWORD  the shared password for `verify NAME --password`, for scripts
  CIPHERPOST_RECOVERY_CODE    the recovery code for `recover NAME`, for scripts (otherwise asked)
  CIPHERPOST_OPERATOR         who acts, for the operator log of `admin` (as `admin --as`)
  CIPHERPOST_STORE            the relay's store URL (as `server --store` and `admin --store`)
  CIPHERPOST_DATA             the relay's data directory (as `server --data` and `invite --data`)
  CIPHERPOST_STORE            the relay's store (as `server --store`: postgresql://...; default SQLite)
  CIPHERPOST_BUS              the relay's wake-up bus across instances (as `server --bus redis://...`)
  CIPHERPOST_LIMITS_REDIS     the relay's shared rate-limit store (as `server --limits-redis URL`)

exit codes: 0 done, 1 failed (one line on stderr says why), 2 wrong usage, 130 interrupted
(Ctrl-C), 141 the reader of the output went away (`cipherpost recv | head -1`)"""


def _global_options(*, top: bool) -> argparse.ArgumentParser:
    """--home and --user, accepted before and after the subcommand (``contacts --user X``). On a
    subcommand their default is SUPPRESS, so one given before the subcommand is not overwritten."""
    g = argparse.ArgumentParser(add_help=False)
    default: Any = None if top else argparse.SUPPRESS
    g.add_argument("--home", type=Path, default=default,
                   help="where profiles live (default: CIPHERPOST_HOME or the platform data dir)")
    g.add_argument("--user", default=default,
                   help="which local profile to use when the home holds several (or CIPHERPOST_USER)")
    return g


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cipherpost", parents=[_global_options(top=True)],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="End-to-end encrypted messaging through a relay that cannot read your messages.",
        epilog="Start here: `cipherpost server` in one terminal, `cipherpost client` in two others.\n"
               "`cipherpost demo --explain` shows every step. `cipherpost COMMAND --help` for each "
               "command.\n\n" + ENVIRONMENT)
    parser.add_argument("--version", action="version", version=f"cipherpost {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Every client subcommand also takes --home/--user after its name; `server`/`invite` do not.
    client_parents = [_global_options(top=False)]

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        kw["description"] = textwrap.fill(kw.get("description") or kw["help"], 100)
        parser: argparse.ArgumentParser = sub.add_parser(
            name, parents=client_parents, epilog=ENVIRONMENT,
            formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        return parser

    register_server_commands(sub)  # `server` and `invite`: the relay's own flags live with it
    register_admin_commands(sub)  # `admin`: operator tools on the relay's store

    p = add("client", help="interactive chat (creates or unlocks your profile)")
    p.add_argument("--server", default=None,
                   help=f"relay address for a new profile (default {DEFAULT_SERVER})")
    p.set_defaults(func=_cmd_client)

    p = add("init", help="create an identity and register it with a relay")
    p.add_argument("name", help="your username: 3-32 of a-z 0-9 . _ -")
    p.add_argument("--server", required=True, help="relay address, e.g. wss://chat.example.org:8765")
    p.add_argument("--server-fingerprint", default=None,
                   help="pin this certificate (SHA256:... as printed by the server) instead of trusting "
                        "the first one seen")
    p.add_argument("--invite", default=None, help="invite token, if the relay requires one")
    p.set_defaults(func=_cmd_init)

    p = add("send", help="send one message",
                       description=f"Send one message of 1 to {MAX_TEXT_BYTES} bytes (UTF-8) to NAME. "
                                   "Empty or whitespace-only text is refused. With no session yet, "
                                   "this fetches NAME's keys and trusts them on first use.")
    p.add_argument("--group", default=None, metavar="GROUP",
                   help="send to the group GROUP instead (no NAME: `send --group GROUP TEXT...`)")
    p.add_argument("name", help="recipient username")
    p.add_argument("text", nargs="*",
                   help=f"message text, at most {MAX_TEXT_BYTES} bytes ('-' reads one message from "
                        "standard input)")
    p.add_argument("--stdin", action="store_true",
                   help="send each line of standard input as its own message, in order, in one process")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per message: {"id": HEX, "to": NAME, "status": "sent"|"queued"}')
    p.set_defaults(func=_cmd_send)

    p = add("recv", help="fetch and print new messages")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for a message to arrive (default: only what is queued)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: id, from, text, sent_at, received_at, warning, file")
    file_cmd.add_recv_arguments(p)
    p.set_defaults(func=_cmd_recv)

    file_cmd.register(add, _run)  # send-file, download (issue 13)

    p = add("contacts", help="list contacts and their verification state")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per contact: name, state (unverified|verified|key_changed|"
                        "blocked), display (the text shown without --json), verified, added_at")
    p.set_defaults(func=_cmd_contacts)

    p = add("fingerprint", help="your identity fingerprint, or the safety number with NAME")
    p.add_argument("name", nargs="?", help="contact: show the safety number you share with them")
    p.add_argument("--qr", action="store_true", help="also draw it as a QR code")
    p.set_defaults(func=_cmd_fingerprint)

    p = add("verify", help="verify a contact (safety number or shared password)")
    p.add_argument("name", help="the contact to verify")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--safety-number", metavar="DIGITS",
                     help="the 60 digits your contact reads to you (spaces allowed)")
    how.add_argument("--password", action="store_true",
                     help="both of you enter the same password; proves the keys through the relay (SPAKE2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the other side")
    p.set_defaults(func=_cmd_verify)

    p = add("history", help="show the conversation with NAME")
    p.add_argument("name", help="the contact")
    p.add_argument("--limit", type=int, default=50, help="show the last N messages (default 50)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per message: id, direction, text, sent_at, received_at, status")
    p.set_defaults(func=_cmd_history)

    register_contact_commands(add, _run)   # block, unblock, accept, requests
    register_group_commands(sub, _run)     # group create|add|remove|leave|list|info|history

    p = add("passphrase", help="change the passphrase of your profile",
                       description="Re-seal the key store under a new passphrase. The new file is "
                                   "written next to the old one, fsynced and renamed over it: a crash "
                                   "leaves either the old or the new passphrase working.")
    p.set_defaults(func=_cmd_passphrase)

    p = add("demo", help="a throwaway relay and two users chatting, explained")
    p.add_argument("--explain", action="store_true",
                   help="show what each side computes and exactly what the server stores")
    p.set_defaults(func=_cmd_demo)

    register_account_commands(add)  # `recover`, `recovery-key`, `delete-account`
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
    except (out.OutputClosed, BrokenPipeError):
        out.silence_stdout()   # the reader left (`| head`): end quietly, as SIGPIPE would
        return out.EXIT_PIPE_CLOSED
    except (Interrupted, KeyboardInterrupt):
        # One line, on a line of its own (the terminal echoed "^C" after the prompt).
        print("\ncipherpost: interrupted; nothing was changed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PromptClosed:
        print("\ncipherpost: no answer given (end of input); nothing was changed", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- helpers
def _home(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else default_home()


def _open(args: argparse.Namespace) -> Client:
    home = _home(args)
    username = resolve_username(home, args.user or os.environ.get(USER_ENV))
    return Client.open(home, username, read_passphrase(f"Passphrase for {username}: "))


def _run(args: argparse.Namespace, body: Callable[[Client], Awaitable[int]]) -> int:
    client = _open(args)   # the passphrase is asked before the event loop starts

    async def runner() -> int:
        try:
            return await body(client)
        finally:
            await client.close()
    return asyncio.run(runner())


def _message_json(m: IncomingMessage) -> dict[str, Any]:
    return {"id": m.id, "from": m.sender, "text": m.text, "sent_at": m.sent_at,
            "received_at": m.received_at, "warning": m.warning, "group": m.group}


# --------------------------------------------------------------------------- commands
def _cmd_client(args: argparse.Namespace) -> int:
    from .chat import run_chat
    return run_chat(_home(args), args.user or os.environ.get(USER_ENV), args.server)


def _cmd_init(args: argparse.Namespace) -> int:
    check_server_url(args.server)   # before the passphrase and before any key is made
    pin = parse_fingerprint(args.server_fingerprint) if args.server_fingerprint else None
    passphrase = read_passphrase(f"New passphrase for {args.name}: ", confirm=True)

    async def create() -> int:
        print(f"creating an identity and {2 * ONE_TIME_POOL_TARGET} one-time prekeys, registering "
              f"'{args.name}' with {args.server}...", file=sys.stderr, flush=True)
        try:
            client = await Client.create(_home(args), args.name, args.server, passphrase,
                                         server_fingerprint=pin, invite=args.invite)
        except ServerPinMismatch:
            if pin is None:
                raise
            # First contact: nothing was pinned before, so nothing "changed".
            raise ClientError(f"the relay's TLS certificate does not match the fingerprint given with "
                              f"--server-fingerprint ({format_fingerprint(pin)}); check it with the "
                              "relay's operator. Nothing was created.") from None
        try:
            out.line(f"created {client.username} on {client.server_url}")
            out.line(f"your identity fingerprint: {client.identity.public.fingerprint_text()}")
            how = "as given" if pin else "on first use - compare it with the fingerprint the server printed"
            out.line(f"server certificate pinned ({how}): {client.server_fingerprint}")
            if client.recovery_code is not None:
                print_recovery_code(client.username, client.recovery_code)
            else:
                out.line("this relay does not support recovery codes: if you lose this device or forget "
                         "the passphrase, the name cannot be recovered")
        finally:
            await client.close()
        return 0
    return asyncio.run(create())


def _send_texts(args: argparse.Namespace) -> list[str]:
    """The messages to send, each checked before the profile is unlocked or anything encrypted."""
    if args.stdin:
        if args.text:
            raise UsageError("give the text as arguments or with --stdin, not both")
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
        if not texts:
            raise UsageError("nothing to send: standard input had no non-empty line")
    elif args.text == ["-"]:
        texts = [sys.stdin.read().rstrip("\n")]
    elif args.text:
        texts = [" ".join(args.text)]
    else:
        raise UsageError("nothing to send: give the text, '-' or --stdin")
    for number, text in enumerate(texts, 1):
        where = f"line {number}: " if args.stdin else ""
        try:
            check_text(text)
        except EmptyMessage as exc:
            raise UsageError(str(exc)) from None
        except MessageTooLong as exc:   # nothing of the batch is sent
            raise MessageTooLong(f"{where}{exc}; nothing was sent (send it as a file instead: "
                                 f"cipherpost send-file {args.name} FILE)") from None
    return texts


def _cmd_send(args: argparse.Namespace) -> int:
    if args.group is not None:   # `send --group G TEXT...`: argparse took the first word as the name
        args.text = [args.name, *args.text]
        text = sys.stdin.read().rstrip("\n") if args.text == ["-"] else " ".join(args.text)
        try:
            check_text(text)
        except EmptyMessage as exc:
            raise UsageError(str(exc)) from None
        return _run(args, lambda client: send_group(client, args.group, text))
    texts = _send_texts(args)

    async def body(client: Client) -> int:
        offline: ConnectionFailed | None = None
        try:
            await client.connect()
        except ConnectionFailed as exc:
            offline = exc   # with an existing session the message can still go to the outbox
        queued = 0
        # One profile commit and, where the relay has cap batch, 16 envelopes a frame (client/outbox.py)
        for msg_id in await client.send_many([(args.name, text) for text in texts]):
            status = "queued" if client.is_queued(msg_id) else "sent"
            queued += status == "queued"
            if args.json:
                out.line(json.dumps({"id": msg_id.hex(), "to": args.name, "status": status}))
            elif status == "sent":
                out.line(f"sent {msg_id.hex()} to {args.name}")
            else:
                reason = f" ({offline})" if offline else ""
                print(f"queued {msg_id.hex()}: not yet accepted by the relay{reason}; it is kept in the "
                      "outbox and sent on the next connection (any cipherpost command)", file=sys.stderr)
        return 1 if queued else 0
    return _run(args, body)


def _cmd_recv(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        messages = await client.receive(wait=args.wait, mark_shown=False)
        printed: list[IncomingMessage] = []
        try:
            for m in messages:
                # Shown = written and flushed; a reader that went away leaves the rest for next time.
                if not args.json:
                    out.line("\n".join(message_lines(m, fmt_time)))
                saved = await file_cmd.save_attachment(client, m, args)   # an attachment (issue 13)
                if args.json:
                    out.line(json.dumps({**_message_json(m), **({"file": saved} if saved else {})}))
                printed.append(m)
                if len(printed) >= MARK_SHOWN_EVERY:
                    client.mark_shown(printed)
                    printed = []
        finally:
            client.mark_shown(printed)
        return 0
    return _run(args, body)


def _cmd_contacts(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        rows: list[dict[str, Any]] = []
        for c in client.contacts():
            state, text = contact_state(c)
            if client.is_blocked(c.name):   # blocked by the user (client/blocks.py)
                state, text = "blocked", f"BLOCKED by you (`cipherpost unblock {c.name}`)"
            rows.append({"name": c.name, "state": state, "display": text, "verified": c.verified,
                         "added_at": c.added_at})
        if args.json:
            for row in rows:
                out.line(json.dumps(row))
        elif not rows:
            out.line("no contacts yet: `cipherpost send NAME TEXT` starts a conversation")
        else:
            width = max(len(r["name"]) for r in rows)
            for row in rows:
                out.line(f"{printable(row['name']):<{width}}  {printable(row['display'])}")
        return 0
    return _run(args, body)


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    import segno  # only this command draws QR codes

    async def body(client: Client) -> int:
        if args.name is None:
            out.line(f"{client.username}: {client.identity.public.fingerprint_text()}")
            if args.qr:
                segno.make(client.identity.public.fingerprint(), error="m").terminal(compact=True)
                sys.stdout.flush()
            return 0
        number = client.safety_number(args.name)
        out.line(f"safety number with {args.name}:\n{group_digits(number.digits)}")
        if args.qr:
            segno.make(number.qr_payload(), error="m").terminal(compact=True)
            sys.stdout.flush()
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
        answer = prompt_line(f"Does {args.name} see exactly the same number? [y/N] ").strip().lower()
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
                out.line(json.dumps({"id": m.msg_id.hex(), "direction": m.direction, "text": m.text,
                                     "sent_at": m.sent_at, "received_at": m.received_at,
                                     "status": m.status}))
                continue
            who = client.username if m.direction == "out" else args.name
            mark = "" if m.status in ("sent", "shown", "new") else f"  ({m.status})"
            prefix = "!! " if m.direction == "event" else ""
            out.line(f"[{fmt_time(m.sent_at or m.received_at)}] {prefix}{who}: {printable(m.text)}{mark}")
        return 0
    return _run(args, body)


def _cmd_passphrase(args: argparse.Namespace) -> int:
    home = _home(args)
    username = resolve_username(home, args.user or os.environ.get(USER_ENV))
    old = read_passphrase(f"Current passphrase for {username}: ")
    new = os.environ.get(NEW_PASSPHRASE_ENV)
    if new is None:
        if not sys.stdin.isatty():
            raise UsageError(f"no terminal to ask for the new passphrase: set {NEW_PASSPHRASE_ENV}")
        new = prompt_line(f"New passphrase for {username}: ", secret=True)
        if prompt_line("Repeat new passphrase: ", secret=True) != new:
            raise UsageError("the two passphrases differ; nothing was changed")
    change_passphrase(home, username, old, new)
    out.line(f"the passphrase of {username} is changed")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(explain=args.explain)


if __name__ == "__main__":
    raise SystemExit(main())
