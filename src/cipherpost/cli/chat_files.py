"""Files in the interactive chat (issue 13): ``/file PATH`` sends one to the person you talk to,
incoming files are saved to the downloads folder and shown with their path, and a text too long
for the relay is offered as a file instead of being refused."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import platformdirs

from ..client.attachments import download_file, printable_name, send_file, send_text_as_file
from ..client.client import Client, IncomingMessage
from ..client.errors import ClientError
from .common import printable
from .file_cmd import ProgressMeter

if TYPE_CHECKING:
    from .chat import Chat

_TASKS: set[asyncio.Task[Any]] = set()


def downloads() -> Path:
    return Path(platformdirs.user_downloads_dir())


async def send_path(chat: Chat, arg: str) -> None:
    if chat.peer is None:
        print("(not sent) who is it for? /to NAME first, then /file PATH")
        return
    path = Path(arg).expanduser()
    if not path.is_file():
        print(f"!! NOT SENT: {printable(str(path))} is not a file")
        return
    try:
        await send_file(chat.client, chat.peer, path, progress=ProgressMeter(f"sending {path.name}",
                                                                             json_events=False))
    except ClientError as exc:
        print(f"!! NOT SENT to {chat.peer}: {printable(str(exc))}")
        return
    print(f"-- sent {printable(path.name)} to {chat.peer}")


def is_too_long(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and str(exc).startswith("message too long")


async def offer_as_file(chat: Chat, name: str, text: str) -> None:
    """The text is over the relay's message limit: ask, then send it as ``message.txt``."""
    from .chat import ask
    answer = await ask(chat.questions, f"that message is too long for one message ({len(text.encode())} "
                                       "bytes); send it as a file (message.txt) instead? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        print("-- not sent")
        return
    try:
        await send_text_as_file(chat.client, name, text)
    except ClientError as exc:
        print(f"!! NOT SENT to {name}: {printable(str(exc))}")
        return
    print(f"-- sent as message.txt to {name}")


def fetch_in_background(client: Client, message: IncomingMessage) -> None:
    """Save an incoming file to the downloads folder and say where (or why not)."""
    if message.file is None:
        return
    task = asyncio.get_running_loop().create_task(_fetch(client, message))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


async def _fetch(client: Client, message: IncomingMessage) -> None:
    assert message.file is not None
    name = printable_name(message.file.name)
    try:
        path = await download_file(client, message.file, downloads())
    except ClientError as exc:
        print(f"!! the file {printable(name)} from {message.sender} was not saved: {printable(str(exc))} "
              f"(later: cipherpost download {message.id})")
        return
    print(f"-- {message.sender}'s file saved to {printable(str(path))}")
