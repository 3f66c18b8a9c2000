"""``cipherpost admin``: operator tools on a relay's store (docs/server.md "Operating accounts").

Works on the store through the :class:`~cipherpost.store.base.RelayStore` interface only: the
SQLite file of ``--data DIR`` today, any other backend with ``--store URL`` once it exists. It may
run while the relay runs: every action is appended to the store's operator log (who, what, when,
why), which the relay polls to close the live connections of a suspended or deleted account.

Exit codes: 0 done, 1 refused (one line on stderr saying why), 2 wrong usage.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from ..protocol.errors import ProtocolError
from ..protocol.usernames import normalize_username
from ..server.backends import STORE_ENV, make_store
from ..server.config import DATA_ENV, ServerConfig, default_data_dir
from ..store.base import AccountDeleted, AccountInfo, AccountState, RelayStore, StoreError, UnknownAccount

OPERATOR_ENV = "CIPHERPOST_OPERATOR"
HOUR_MS = 3600_000


class AdminError(Exception):
    """An operator action was refused (exit 1)."""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "admin", help="operator tools: suspend, delete, reserve names, list accounts, top senders",
        description="Act on a relay's accounts through its store (also while the relay runs: it "
                    "applies suspensions and deletions to live connections within seconds). Every "
                    "action is logged in the store with who, what, when and why (`admin log`).")
    p.add_argument("--data", type=Path, default=None,
                   help=f"the relay's data directory (default ${DATA_ENV} or the platform data dir)")
    p.add_argument("--store", default=os.environ.get(STORE_ENV) or None, metavar="URL",
                   help="the relay's --store, if not the data directory's relay.db (postgresql://..., "
                        f"sqlite:PATH; default ${STORE_ENV})")
    p.add_argument("--as", dest="operator", default=None, metavar="NAME",
                   help=f"who is acting, for the log (default ${OPERATOR_ENV} or the login name)")
    sub = p.add_subparsers(dest="admin_command", metavar="ACTION", required=True)

    a = sub.add_parser("suspend", help="suspend an account: it cannot log in or receive; senders are told")
    a.add_argument("name", help="the account")
    a.add_argument("--reason", default="", help="why, for the log")
    a.set_defaults(admin_func=_suspend)
    a = sub.add_parser("unsuspend", help="lift a suspension")
    a.add_argument("name", help="the account")
    a.add_argument("--reason", default="", help="why, for the log")
    a.set_defaults(admin_func=_unsuspend)
    a = sub.add_parser("delete", help="delete an account: mailbox, prekeys, keys; the name stays reserved")
    a.add_argument("name", help="the account")
    a.add_argument("--reason", default="", help="why, for the log")
    a.set_defaults(admin_func=_delete)
    a = sub.add_parser("reserve", help="reserve names (and their look-alikes) against registration")
    a.add_argument("names", nargs="+", metavar="NAME", help="usernames to reserve")
    a.set_defaults(admin_func=_reserve)
    a = sub.add_parser("unreserve", help="release reserved names")
    a.add_argument("names", nargs="+", metavar="NAME", help="reserved usernames to release")
    a.set_defaults(admin_func=_unreserve)
    a = sub.add_parser("list", help="accounts with their state, and the reserved names")
    a.add_argument("--json", action="store_true", help="one JSON object per line")
    a.set_defaults(admin_func=_list)
    a = sub.add_parser("top", help="senders by messages and bytes in the last hour and day (counts only)")
    a.add_argument("--json", action="store_true", help="one JSON object per line")
    a.add_argument("--limit", type=int, default=20, help="how many senders (default 20)")
    a.set_defaults(admin_func=_top)
    a = sub.add_parser("log", help="the operator log: who did what, when, why")
    a.add_argument("--json", action="store_true", help="one JSON object per line")
    a.set_defaults(admin_func=_log)
    a = sub.add_parser("renew-epoch", help="after restoring a backup: make clients republish their prekeys",
                       description="Give the store a new epoch (docs/contracts.md 1.5). Run it on a "
                                   "restored store before starting the relays (they read the epoch at "
                                   "start): each client then drops and republishes its one-time prekeys "
                                   "on its next connection, so no already-used one-time key is handed out.")
    a.set_defaults(admin_func=_renew_epoch)
    p.set_defaults(func=run_admin)


def open_store(args: argparse.Namespace) -> RelayStore:
    """The relay's store: ``--store URL`` as the relay takes it, else ``--data DIR``'s relay.db; a
    directory or SQLite file that holds no relay is refused (a typo must not make an empty store)."""
    data: Path = args.data or default_data_dir()
    url: str | None = args.store
    db = Path(url.removeprefix("sqlite:")) if url and url.startswith("sqlite:") else data / "relay.db"
    if (url is None or url.startswith("sqlite:")) and not db.is_file():
        raise AdminError(f"no relay data in {db.parent} (no {db.name}): check --data or --store")
    return make_store(ServerConfig(data_dir=data, store_url=url))


def _operator(args: argparse.Namespace) -> str:
    who: str | None = args.operator or os.environ.get(OPERATOR_ENV)
    if not who:
        try:
            who = getpass.getuser()
        except (KeyError, OSError):  # no login name (a container without a passwd entry)
            who = f"uid{os.getuid()}"
    return who


def _name(text: str) -> str:
    try:
        return normalize_username(text)
    except ProtocolError as exc:
        raise AdminError(f"{text!r}: {exc.message}") from None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def run_admin(args: argparse.Namespace) -> int:
    async def go() -> int:
        store = open_store(args)
        await store.open()
        try:
            result: int = await args.admin_func(store, args)
            return result
        finally:
            await store.close()
    try:
        return asyncio.run(go())
    except AdminError as exc:
        print(f"cipherpost admin: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"cipherpost admin: store error: {exc}", file=sys.stderr)
        return 1


async def _logged(store: RelayStore, args: argparse.Namespace, action: str, names: list[str],
                  reason: str, act: Callable[[], Awaitable[None]]) -> int:
    """Do ``act``, then record it in the operator log and say so."""
    who = _operator(args)
    await act()
    now = _now_ms()
    await store.log_operator_action(who, action, names, reason, now)
    print(f"{_when(now)} {who}: {action} {' '.join(names)}" + (f" ({reason})" if reason else ""))
    return 0


async def _account(store: RelayStore, name: str) -> AccountInfo:
    info = await store.get_account(name)
    if info is None:
        raise AdminError(f"no account named {name!r}")
    if info.state is AccountState.DELETED:
        raise AdminError(f"the account {name!r} is deleted")
    return info


async def _set_state(store: RelayStore, args: argparse.Namespace, state: AccountState, action: str) -> int:
    name = _name(args.name)
    info = await _account(store, name)
    if info.state is state:
        raise AdminError(f"the account {name!r} is already {state.value}")
    try:
        return await _logged(store, args, action, [name], args.reason,
                             lambda: store.set_state(name, state, _operator(args), args.reason))
    except (AccountDeleted, UnknownAccount):
        raise AdminError(f"the account {name!r} is deleted or unknown") from None


async def _suspend(store: RelayStore, args: argparse.Namespace) -> int:
    return await _set_state(store, args, AccountState.SUSPENDED, "suspend")


async def _unsuspend(store: RelayStore, args: argparse.Namespace) -> int:
    return await _set_state(store, args, AccountState.ACTIVE, "unsuspend")


async def _delete(store: RelayStore, args: argparse.Namespace) -> int:
    name = _name(args.name)
    await _account(store, name)
    reason = args.reason or "by the operator"
    return await _logged(store, args, "delete", [name], args.reason,
                         lambda: store.delete_account(name, _operator(args), reason))


async def _reserve(store: RelayStore, args: argparse.Namespace) -> int:
    names = [_name(n) for n in args.names]
    return await _logged(store, args, "reserve", names, "", lambda: store.reserve(names))


async def _unreserve(store: RelayStore, args: argparse.Namespace) -> int:
    names = [_name(n) for n in args.names]
    held = set(await store.reserved())
    missing = [n for n in names if n not in held]
    if missing:
        raise AdminError(f"not reserved: {', '.join(missing)} (a deleted account's name stays reserved "
                         "by its account)")
    return await _logged(store, args, "unreserve", names, "", lambda: store.unreserve(names))


async def _list(store: RelayStore, args: argparse.Namespace) -> int:
    accounts = await store.list_accounts()
    reserved = await store.reserved()
    if args.json:
        for a in accounts:
            print(json.dumps({"name": a.username, "state": a.state.value, "created_ms": a.created_ms,
                              "recovery_key": a.recovery_public is not None,
                              "state_changed_ms": a.state_changed_ms, "state_by": a.state_by,
                              "state_reason": a.state_reason}))
        for name in reserved:
            print(json.dumps({"name": name, "state": "reserved"}))
        return 0
    width = max([len(a.username) for a in accounts] + [len(n) for n in reserved] + [4])
    for a in accounts:
        extra = "" if a.state is AccountState.ACTIVE else \
            f"  since {_when(a.state_changed_ms)} by {a.state_by or '-'}" + \
            (f": {a.state_reason}" if a.state_reason else "")
        key = "recovery key" if a.recovery_public is not None else "no recovery key"
        print(f"{a.username:<{width}}  {a.state.value:<9}  created {_when(a.created_ms)}  {key}{extra}")
    if reserved:
        print(f"reserved: {' '.join(reserved)}")
    return 0


async def _top(store: RelayStore, args: argparse.Namespace) -> int:
    now = _now_ms()
    hour = {r.sender: r for r in await store.usage(now - HOUR_MS)}
    day = await store.usage(now - 24 * HOUR_MS)
    rows = []
    for r in day[:args.limit]:
        h = hour.get(r.sender)
        rows.append({"sender": r.sender, "messages_1h": h.messages if h else 0,
                     "bytes_1h": h.bytes_sent if h else 0, "messages_24h": r.messages,
                     "bytes_24h": r.bytes_sent, "bytes_stored": r.bytes_stored})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'sender':<32} {'msgs 1h':>9} {'bytes 1h':>12} {'msgs 24h':>9} {'bytes 24h':>12} {'stored':>12}")
    for row in rows:
        print(f"{row['sender']:<32} {row['messages_1h']:>9} {row['bytes_1h']:>12} {row['messages_24h']:>9} "
              f"{row['bytes_24h']:>12} {row['bytes_stored']:>12}")
    return 0


async def _log(store: RelayStore, args: argparse.Namespace) -> int:
    after = 0
    while page := await store.operator_log(after, 500):
        for e in page:
            if args.json:
                print(json.dumps({"id": e.id, "ts_ms": e.ts_ms, "operator": e.operator, "action": e.action,
                                  "names": list(e.names), "reason": e.reason}))
            else:
                print(f"{_when(e.ts_ms)} {e.operator}: {e.action} {' '.join(e.names)}"
                      + (f" ({e.reason})" if e.reason else ""))
        after = page[-1].id
    return 0


async def _renew_epoch(store: RelayStore, args: argparse.Namespace) -> int:
    await store.renew_epoch()
    print("store epoch renewed: (re)start the relay instances; clients republish their prekeys "
          "on their next connection")
    return 0
