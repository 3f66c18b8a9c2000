"""``cipherpost recover``, ``recovery-key`` and ``delete-account``: an account over its whole life.

``register(subparsers)`` adds the three commands to the main CLI (docs/accounts.md explains the
design; README lists the commands). The recovery code is read from ``CIPHERPOST_RECOVERY_CODE`` or
the terminal (not echoed); it is never written anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from ..client.client import Client
from ..client.connection import parse_fingerprint
from ..client.home import ProfilePaths, default_home, resolve_username
from ..crypto.recovery import RecoveryKey
from . import output as out
from .common import PromptClosed, UsageError, prompt_line, read_passphrase

RECOVERY_CODE_ENV = "CIPHERPOST_RECOVERY_CODE"
USER_ENV = "CIPHERPOST_USER"


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the commands with ``add(name, help=..., description=...)`` (cli/main.py's, which gives
    every client command --home/--user after its name and the environment epilog)."""
    p = add(
        "recover", help="take your account back on a new device with its recovery code",
        description="Make a new identity for NAME and rebind the account to it with the recovery code "
                    "shown at `init`. Your contacts see a key change (verified ones hold your messages "
                    f"back until they verify you again). The code comes from {RECOVERY_CODE_ENV} or "
                    "the terminal.")
    p.add_argument("name", help="the account to recover")
    p.add_argument("--server", required=True, help="the relay of the account, e.g. wss://chat.example.org:8765")
    p.add_argument("--server-fingerprint", default=None,
                   help="pin this certificate (SHA256:...) instead of trusting the first one seen")
    p.set_defaults(func=_cmd_recover)

    p = add(
        "recovery-key", help="make a new recovery code for your account (the old one stops working)",
        description="Profiles made before recovery codes existed, or whose code was lost or seen by "
                    "someone else, get a new one here. It is shown once and never stored.")
    p.add_argument("--new", action="store_true", required=True,
                   help="make a new recovery key (the old code cannot be shown: it was never stored)")
    p.set_defaults(func=_cmd_recovery_key)

    p = add(
        "delete-account", help="delete your account on the relay and this profile (type the name to confirm)",
        description="Deletes the account on the relay (queued messages, prekeys, the account; the name "
                    "stays reserved so nobody can take it over) and then the local profile (keys, "
                    "contacts, history). Cannot be undone. Confirm by typing the account name.")
    p.set_defaults(func=_cmd_delete_account)


def _home(args: argparse.Namespace) -> Path:
    home = getattr(args, "home", None)
    return Path(home) if home else default_home()


def _user(args: argparse.Namespace) -> str | None:
    return getattr(args, "user", None) or os.environ.get(USER_ENV)


def _read_code() -> str:
    env = os.environ.get(RECOVERY_CODE_ENV)
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise UsageError(f"no terminal to ask for the recovery code: set {RECOVERY_CODE_ENV}")
    return prompt_line("Recovery code: ", secret=True)


def print_recovery_code(name: str, code: str) -> None:
    out.line(f"recovery code for {name} (write it down now and keep it safe; it is shown only this once "
             "and is the only way to take the account back on a new device):")
    out.line(f"    {code}")


def _cmd_recover(args: argparse.Namespace) -> int:
    pin = parse_fingerprint(args.server_fingerprint) if args.server_fingerprint else None
    key = RecoveryKey.from_code(_read_code())   # a mistyped code fails here, before any attempt
    passphrase = read_passphrase(f"New passphrase for {args.name}: ", confirm=True)

    async def go() -> int:
        client = await Client.create(_home(args), args.name, args.server, passphrase,
                                     server_fingerprint=pin, recovery=key)
        try:
            out.line(f"recovered {client.username} on {client.server_url} with a new identity key")
            out.line(f"your identity fingerprint: {client.identity.public.fingerprint_text()}")
            out.line("your contacts will see that your key changed; verify again with those who had "
                     "verified you. Messages queued for the old key cannot be read with the new one.")
            out.line("your recovery code stays the same; if anyone else may have seen it, run "
                     "`cipherpost recovery-key --new`")
        finally:
            await client.close()
        return 0
    return asyncio.run(go())


def _open(args: argparse.Namespace) -> Client:
    home = _home(args)
    username = resolve_username(home, _user(args))
    return Client.open(home, username, read_passphrase(f"Passphrase for {username}: "))


def _cmd_recovery_key(args: argparse.Namespace) -> int:
    async def go() -> int:
        client = _open(args)
        try:
            code = await client.new_recovery_code()
            print_recovery_code(client.username, code)
            out.line("the previous recovery code no longer works")
        finally:
            await client.close()
        return 0
    return asyncio.run(go())


def _cmd_delete_account(args: argparse.Namespace) -> int:
    home = _home(args)
    username = resolve_username(home, _user(args))
    paths = ProfilePaths(home, username)
    print(f"This DELETES the account '{username}' on its relay: queued messages, prekeys and the account. "
          "The name stays reserved there: nobody, you included, can register it again.", file=sys.stderr)
    print(f"Then it deletes this profile ({paths.dir}): your keys, contacts and history. "
          "This cannot be undone.", file=sys.stderr)
    try:
        typed = prompt_line("Type the account name to confirm: ").strip()
    except PromptClosed:
        typed = ""
    if typed != username:
        print(f"cipherpost: not deleted ('{typed}' is not '{username}')", file=sys.stderr)
        return 1

    async def go() -> None:
        client = Client.open(home, username, read_passphrase(f"Passphrase for {username}: "))
        try:
            await client.delete_account()
        finally:
            await client.close()
    asyncio.run(go())
    try:
        shutil.rmtree(paths.dir)
    except OSError as exc:
        print(f"cipherpost: the account is deleted on the relay, but the profile could not be removed "
              f"({exc.strerror}); delete {paths.dir} yourself", file=sys.stderr)
        return 1
    out.line(f"deleted the account {username} and its local profile")
    return 0
