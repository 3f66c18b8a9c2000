"""Files from the command line (issue 13, docs/attachments.md): ``send-file``, ``download``, and the
attachment half of ``recv`` (``--downloads DIR``, ``--no-download``; ``recv --json`` rows carry
``"file": {"name", "size", "path", "sha256"}``).

Progress goes to stderr: a one-line meter (bytes, rate, ETA) when stderr is a terminal, nothing when
it is not, and with ``--json`` one JSON object per line (``{"event": "progress", ...}``) for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import platformdirs

from ..client.attachments import (
    AttachmentError,
    FileOffer,
    download_file,
    offer_of,
    printable_name,
    safe_name,
    send_file,
)
from ..client.client import Client, IncomingMessage
from .common import UsageError

MIB = 1 << 20
Runner = Callable[[argparse.Namespace, Callable[[Client], Awaitable[int]]], int]


def downloads_dir(args: argparse.Namespace) -> Path:
    chosen = getattr(args, "downloads", None)
    return Path(chosen) if chosen else Path(platformdirs.user_downloads_dir())


class ProgressMeter:
    """``(done, total)`` callbacks turned into a terminal meter or JSON events on ``stream``."""

    def __init__(self, what: str, *, json_events: bool, stream: TextIO | None = None) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.json_events = json_events
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.last = 0.0
        self.last_bytes = -1

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        final = done >= total
        if self.json_events:   # the first call, every MiB and the end: a script can act on them
            if not final and self.last_bytes >= 0 and done // MIB == self.last_bytes // MIB:
                return
        elif not final and now - self.last < 0.2:
            return
        self.last, self.last_bytes = now, done
        rate = done / max(now - self.start, 1e-6)
        eta = (total - done) / rate if rate > 0 else 0.0
        if self.json_events:
            print(json.dumps({"event": "progress", "what": self.what, "bytes": done, "total": total,
                              "rate": round(rate), "eta_s": round(eta, 1)}), file=self.stream, flush=True)
        elif self.tty:
            self.stream.write(f"\r{self.what}: {_size(done)} / {_size(total)}  {_size(rate)}/s  "
                              f"ETA {eta:.0f}s ")
            if final:
                self.stream.write("\n")
            self.stream.flush()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def file_row(offer: FileOffer, path: Path | None) -> dict[str, Any]:
    return {"name": safe_name(offer.name), "size": offer.size, "path": None if path is None else str(path),
            "sha256": offer.sha256.hex()}


async def save_attachment(client: Client, m: IncomingMessage,
                          args: argparse.Namespace) -> dict[str, Any] | None:
    """Download ``m``'s file unless ``--no-download``; the ``"file"`` row of ``recv --json``."""
    if m.file is None:
        return None
    if getattr(args, "no_download", False):
        return file_row(m.file, None)
    meter = ProgressMeter(f"receiving {printable_name(safe_name(m.file.name))}", json_events=args.json)
    try:
        path = await download_file(client, m.file, downloads_dir(args), progress=meter)
    except AttachmentError as exc:
        print(f"cipherpost: error: {exc}", file=sys.stderr)
        return {**file_row(m.file, None), "error": str(exc)}
    if not args.json:
        print(f"  saved to {path}")
    return file_row(m.file, path)


def add_recv_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--downloads", type=Path, default=None, metavar="DIR",
                   help="where received files are saved (default: your Downloads folder)")
    p.add_argument("--no-download", action="store_true",
                   help="do not fetch attachments now (later: cipherpost download ID)")


def register(add: Callable[..., argparse.ArgumentParser], run: Runner) -> None:
    """``add(name, help=...)``: the CLI's subcommand maker (global options, epilog)."""
    p = add("send-file", help="send a file (encrypted, resumable)")
    p.add_argument("name", help="recipient username")
    p.add_argument("path", type=Path, help="the file to send")
    p.add_argument("--json", action="store_true",
                   help="progress events as JSON lines on stderr, the result as one JSON object")
    p.set_defaults(func=lambda args: _cmd_send_file(args, run))

    p = add("download", help="fetch the file of a received message")
    p.add_argument("id", help="the message id (from recv)")
    p.add_argument("--json", action="store_true",
                   help="progress events as JSON lines on stderr; {name, size, path, sha256} on stdout")
    p.add_argument("--downloads", type=Path, default=None, metavar="DIR",
                   help="where to save it (default: your Downloads folder)")
    p.set_defaults(func=lambda args: _cmd_download(args, run))


def _cmd_send_file(args: argparse.Namespace, run: Runner) -> int:
    path = Path(args.path)
    if not path.is_file():
        raise UsageError(f"{path} is not a file")

    async def body(client: Client) -> int:
        await client.connect()
        meter = ProgressMeter(f"sending {path.name}", json_events=args.json)
        msg_id = await send_file(client, args.name, path, progress=meter)
        if args.json:
            print(json.dumps({"id": msg_id.hex(), "to": args.name, "name": path.name,
                              "size": path.stat().st_size}))
        else:
            print(f"sent {msg_id.hex()} ({path.name}) to {args.name}")
        return 0 if not client.pending_outbox() else 1
    return run(args, body)


def _cmd_download(args: argparse.Namespace, run: Runner) -> int:
    try:
        msg_id = bytes.fromhex(args.id)
    except ValueError:
        raise UsageError("ID must be the hex message id that recv printed") from None

    async def body(client: Client) -> int:
        stored = client.db.message_by_id(msg_id, "in")
        offer = None if stored is None else offer_of(stored.extra)
        if offer is None:
            raise UsageError(f"no received file with id {args.id}")
        await client.connect()
        meter = ProgressMeter(f"receiving {printable_name(safe_name(offer.name))}", json_events=args.json)
        path = await download_file(client, offer, downloads_dir(args), progress=meter)
        print(json.dumps(file_row(offer, path)) if args.json else f"saved to {path}")
        return 0
    return run(args, body)
