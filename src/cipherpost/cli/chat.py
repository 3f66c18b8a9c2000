"""The interactive chat: prompts for what it needs, then a chat line with live incoming messages.

prompt_toolkit's ``patch_stdout`` prints incoming messages above the input line and redraws what
is being typed, so a message arriving mid-sentence never garbles it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.patch_stdout import patch_stdout

from ..client.client import Client, IncomingMessage
from ..client.connection import format_fingerprint, probe_fingerprint
from ..client.errors import ClientError, IdentityChanged
from ..client.home import list_profiles
from ..crypto.errors import CryptoError
from ..protocol.errors import ProtocolError
from ..protocol.usernames import normalize_username
from .common import PASSPHRASE_ENV, fmt_time, group_digits

DEFAULT_SERVER = "wss://127.0.0.1:8765"

HELP = """\
commands:
  /to NAME          talk to NAME (plain lines are then sent to them)
  /contacts         your contacts and whether they are verified
  /history NAME     the conversation with NAME
  /safety NAME      the safety number to compare with NAME (in person or on a call)
  /verify NAME      compare the safety number now and mark NAME verified
  /verify NAME password   verify NAME with a password you both know (SPAKE2)
  /help             this text
  /quit             leave (Ctrl-D works too)"""


class Chat:
    def __init__(self, client: Client, prompt: PromptSession[str]):
        self.client = client
        self.prompt = prompt
        self.peer: str | None = None

    def show(self, message: IncomingMessage) -> None:
        if message.warning == "undecryptable":
            print(f"!! [{fmt_time(message.received_at)}] {message.text}")
            return
        if message.warning:
            print(f"!! WARNING: {message.warning}")
        print(f"[{fmt_time(message.sent_at)}] {message.sender}: {message.text}")
        if self.peer is None:
            self.peer = message.sender
            print(f"(now talking to {message.sender}; /to NAME to switch)")

    def on_incoming(self, _message: IncomingMessage) -> None:
        for m in self.client.take_new_messages():
            self.show(m)

    def status(self, text: str) -> None:
        print(f"-- {text}")

    async def handle(self, line: str) -> bool:
        """Run one input line; False means quit."""
        if not line.strip():
            return True
        if not line.startswith("/"):
            if self.peer is None:
                print("pick a conversation first: /to NAME")
                return True
            await self.send(self.peer, line)
            return True
        cmd, _, rest = line.partition(" ")
        arg = rest.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            print(HELP)
        elif cmd == "/to" and arg:
            self.peer = normalize_username(arg)
            print(f"(talking to {self.peer})")
        elif cmd == "/contacts":
            contacts = self.client.contacts()
            if not contacts:
                print("no contacts yet: /to NAME, then type a message")
            for c in contacts:
                state = "verified" if c.verified else "unverified"
                if c.pending_identity:
                    state = "KEY CHANGED - run /verify " + c.name
                print(f"  {c.name}  {state}")
        elif cmd == "/history" and arg:
            for m in self.client.history(normalize_username(arg)):
                who = self.client.username if m.direction == "out" else m.contact
                print(f"  [{fmt_time(m.sent_at or m.received_at)}] {who}: {m.text}")
        elif cmd == "/safety" and arg:
            number = self.client.safety_number(normalize_username(arg))
            print(f"safety number with {arg}:\n{group_digits(number.digits)}")
        elif cmd == "/verify" and arg:
            await self.verify(arg)
        else:
            print(f"unknown command or missing NAME: {line.strip()} (try /help)")
        return True

    async def send(self, name: str, text: str) -> None:
        try:
            await self.client.send(name, text)
        except IdentityChanged as exc:
            print(f"!! NOT SENT: {exc}")
        except ClientError as exc:
            queued = self.client.pending_outbox()
            suffix = f" ({queued} message(s) wait in the outbox and will be retried)" if queued else ""
            print(f"!! {exc}{suffix}")

    async def verify(self, arg: str) -> None:
        name, _, mode = arg.partition(" ")
        name = normalize_username(name)
        contact = self.client.contact(name)
        if mode.strip() == "password":
            from .verify_password import verify_with_password
            password = await self.prompt.prompt_async("Shared password: ", is_password=True)
            await verify_with_password(self.client, name, timeout=120.0, password=password)
            return
        candidate = contact.pending_identity or contact.identity
        if contact.pending_identity:
            print(f"!! {name}'s identity key CHANGED. The new safety number is below.")
        number = self.client.safety_number(name, candidate)
        print(f"safety number with {name}:\n{group_digits(number.digits)}")
        answer = await self.prompt.prompt_async(f"Does {name} see exactly the same number? [y/N] ")
        if answer.strip().lower() in ("y", "yes"):
            self.client.accept_identity(name, verified=True)
            print(f"{name} is verified.")
        else:
            print(f"{name} is not verified.")


async def _unlock_or_create(prompt: PromptSession[str], home: Path, user: str | None,
                            server: str | None) -> Client:
    existing = list_profiles(home)
    if user is None:
        hint = f" (existing: {', '.join(existing)})" if existing else " (new name = new identity)"
        user = await prompt.prompt_async(f"Username{hint}: ")
    username = normalize_username(user)
    env_passphrase = os.environ.get(PASSPHRASE_ENV)
    if username in existing:
        passphrase = env_passphrase or await prompt.prompt_async(f"Passphrase for {username}: ",
                                                                 is_password=True)
        print("unlocking...")
        return Client.open(home, username, passphrase)
    print(f"'{username}' is new here: creating an identity for it.")
    url = server or (await prompt.prompt_async(f"Server address [{DEFAULT_SERVER}]: ")).strip() \
        or DEFAULT_SERVER
    fingerprint = await probe_fingerprint(url)
    print(f"The server's certificate fingerprint is\n  {format_fingerprint(fingerprint)}\n"
          "It must match the one the server printed when it started.")
    answer = await prompt.prompt_async("Does it match? [Y/n] ")
    if answer.strip().lower() in ("n", "no"):
        raise ClientError("certificate not confirmed; nothing was created")
    if env_passphrase is not None:
        passphrase = env_passphrase
    else:
        passphrase = await prompt.prompt_async("New passphrase (protects your keys on this machine): ",
                                               is_password=True)
        again = await prompt.prompt_async("Repeat passphrase: ", is_password=True)
        if again != passphrase:
            raise ClientError("the two passphrases differ; nothing was created")
    print("creating keys and registering...")
    client = await Client.create(home, username, url, passphrase, server_fingerprint=fingerprint)
    print(f"registered {username}. Your identity fingerprint: {client.identity.public.fingerprint_text()}")
    return client


async def _chat(home: Path, user: str | None, server: str | None) -> int:
    prompt: PromptSession[str] = PromptSession()
    try:
        client = await _unlock_or_create(prompt, home, user, server)
    except (ClientError, CryptoError, ProtocolError, ValueError) as exc:
        print(f"cipherpost: error: {exc}")
        return 1
    chat = Chat(client, prompt)
    with patch_stdout(raw=True):
        client.add_listener(chat.on_incoming)
        client.on_pake_request(lambda name: print(
            f"-- {name} started a password verification with you: type /verify {name} password"))
        keeper = asyncio.create_task(client.stay_connected(chat.status))
        print(f"{client.username} on {client.server_url}. /to NAME starts a conversation; /help lists "
              "commands.")
        for m in client.take_new_messages():
            chat.show(m)
        try:
            while True:
                try:
                    line = await prompt.prompt_async(lambda: f"{chat.peer or '-'}> ")
                except EOFError:
                    break
                except KeyboardInterrupt:
                    continue
                try:
                    if not await chat.handle(line):
                        break
                except (ClientError, CryptoError, ProtocolError, ValueError) as exc:
                    print(f"!! {exc}")
        finally:
            keeper.cancel()
            with contextlib.suppress(BaseException):
                await keeper
            await client.close()
    return 0


def run_chat(home: Path, user: str | None, server: str | None) -> int:
    try:
        return asyncio.run(_chat(home, user, server))
    except KeyboardInterrupt:
        return 130
