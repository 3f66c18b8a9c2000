"""The interactive chat: prompts for what it needs, then a chat line with live incoming messages.

prompt_toolkit's ``patch_stdout`` prints incoming messages above the input line and redraws what
is being typed, so a message arriving mid-sentence never garbles it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import signal
import sys
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.history import DummyHistory
from prompt_toolkit.patch_stdout import patch_stdout

from ..client.client import Client, IncomingMessage
from ..client.connection import check_server_url, format_fingerprint, parse_fingerprint, probe_fingerprint
from ..client.errors import ClientError, IdentityChanged, ServerError, WrongPassphraseError
from ..client.home import list_profiles
from ..crypto.errors import CryptoError
from ..protocol.errors import ProtocolError
from ..protocol.usernames import normalize_username
from . import chat_files
from .account_cmd import print_recovery_code
from .common import EXIT_INTERRUPTED, PASSPHRASE_ENV, contact_state, group_digits, message_lines, printable
from .contacts_cmd import CHAT_COMMANDS, CHAT_HELP, chat_command
from .group_cmd import CHAT_HELP as GROUP_HELP
from .group_cmd import chat_command as group_command
from .input_limit import BoundedInput, limited_input_bindings

DEFAULT_SERVER = "wss://127.0.0.1:8765"
MIN_PASSPHRASE = 8          # as `cipherpost init` asks
SETUP_ATTEMPTS = 3          # re-ask a mistyped answer this many times before giving up
CONNECT_GRACE = 5.0         # seconds to wait for the first connection before showing the prompt
EXPECTED = (ClientError, CryptoError, ProtocolError, ValueError)

HELP = f"""\
commands:
  /to NAME [TEXT]   talk to NAME (plain lines are then sent to them); with TEXT, send it too
  /contacts         your contacts and whether they are verified
  /history NAME     the conversation with NAME
  /safety NAME      the safety number to compare with NAME (in person or on a call)
  /verify NAME      compare the safety number now and mark NAME verified
  /verify NAME password   verify NAME with a password you both know (SPAKE2)
{CHAT_HELP}
  /file PATH        send a file to the person you are talking to (received files go to Downloads)
{GROUP_HELP}
  //TEXT            send a line that starts with "/"
  /help             this text
  /quit             leave (Ctrl-D works too)"""


class SetupCancelled(Exception):
    """The person gave up during setup (too many wrong answers, or the certificate refused)."""


class Cancelled(Exception):
    """Ctrl-C or Ctrl-D at a question. An ordinary exception: a KeyboardInterrupt escaping a task
    would stop the whole event loop. ``interrupted``: it was Ctrl-C (exit code 130 at setup)."""

    def __init__(self, *, interrupted: bool) -> None:
        super().__init__("interrupted" if interrupted else "end of input")
        self.interrupted = interrupted


def clock(ms: int | None) -> str:
    """A short local time for chat lines: the date only when it is not today."""
    if ms is None:
        return "--:--:--"
    when = datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone()
    if when.date() == datetime.now().astimezone().date():
        return when.strftime("%H:%M:%S")
    return when.strftime("%Y-%m-%d %H:%M")


def question_session() -> PromptSession[str]:
    """For setup and yes/no questions: no history, so Up never brings back a passphrase."""
    return PromptSession(history=DummyHistory())


def chat_session() -> PromptSession[str]:
    """For chat lines: the typed line is erased on Enter and reprinted with a time and status; a
    line longer than one message is refused as it is typed or pasted (cli/input_limit.py)."""
    bounded = BoundedInput(print) if sys.stdin.isatty() else None
    return PromptSession(erase_when_done=True, key_bindings=limited_input_bindings(print), input=bounded)


async def ask(prompt: PromptSession[str], message: str, *, password: bool = False) -> str:
    # A PromptSession keeps options from the previous call, so is_password is passed every time.
    # handle_sigint=False: in raw mode Ctrl-C is a key anyway, and prompt_toolkit's SIGINT handling
    # would remove the one _interruptible installs around a command that asks a question.
    try:
        return await prompt.prompt_async(message, is_password=password, handle_sigint=False)
    except KeyboardInterrupt:
        raise Cancelled(interrupted=True) from None
    except EOFError:
        raise Cancelled(interrupted=False) from None


class Chat:
    def __init__(self, client: Client, questions: PromptSession[str]):
        self.client = client
        self.questions = questions
        self.lines = chat_session()
        self.peer: str | None = None
        self.group: str | None = None   # /group NAME: plain lines go to the group (cli/group_cmd.py)
        self.interrupt_hint_shown = False
        self.last_status = ""
        self.had_queued = False
        self.reply_hinted: set[str] = set()
        self.verifying: set[str] = set()

    def prompt_text(self) -> str:
        if self.group:
            return f"#{self.group}> "
        return f"{self.peer}> " if self.peer else "> "

    def show(self, message: IncomingMessage) -> None:
        print("\n".join(message_lines(message, clock)))
        chat_files.fetch_in_background(self.client, message)  # an attachment: saved, path shown
        if message.warning == "undecryptable":
            return
        if message.request:
            print(f"!! (in this chat: /accept {message.sender}, or /block {message.sender})")
        elif message.warning:
            print(f"!! (in this chat: /verify {message.sender})")
        if message.group is not None:
            return   # group lines carry their group; /group NAME answers there
        if self.peer is None:
            self.peer = message.sender
            print(f"-- now talking to {message.sender}: type to reply (/to NAME to switch)")
        elif message.sender != self.peer and message.sender not in self.reply_hinted:
            self.reply_hinted.add(message.sender)
            print(f"-- to answer {message.sender}: /to {message.sender} (you are talking to {self.peer})")

    def on_incoming(self, _message: IncomingMessage) -> None:
        for m in self.client.take_new_messages():
            self.show(m)

    def on_pake_request(self, name: str) -> None:
        if name not in self.verifying:   # not when it is the answer to our own /verify
            print(f"-- {name} started a password verification with you: type /verify {name} password")

    def on_pake_cancel(self, name: str) -> None:
        if name not in self.verifying:   # our own /verify reports it as its error
            print(f"-- {name} cancelled the password verification they started; nothing to do")

    def status(self, text: str) -> None:
        """Connection news from ``stay_connected``; a retry loop is reported once, not every retry."""
        retrying = text.startswith("cannot connect")
        if retrying and self.last_status.startswith("cannot connect"):
            return
        if text == "connected" and self.last_status:
            text = "connected again"
            if self.had_queued:
                left = self.client.pending_outbox()
                text += "; queued messages sent" if not left else f"; {left} message(s) still queued"
                self.had_queued = left > 0
        elif retrying:
            text = text.split("; retrying")[0] + "; retrying in the background"
        self.last_status = text
        print(f"-- {text}")

    async def read_line(self) -> str:
        """The next chat line; the typed line is replaced by a timestamped one once handled."""
        return await self.lines.prompt_async(self.prompt_text)

    async def handle(self, line: str) -> bool:
        """Run one input line; False means quit."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/") or line.startswith("//"):
            if line.startswith("//"):   # a message that itself starts with "/"
                line = line[1:]
            if self.group is not None:
                await self.client.send_group(self.group, line)
                print(f"[{clock(now_ms())}] you -> [{printable(self.group)}]: {printable(line)}")
                return True
            if self.peer is None:
                print(f"(not sent) who is it for? /to NAME first, then type. Unsent: {printable(line)}")
                return True
            await self.send(self.peer, line)
            return True
        print(f"{self.prompt_text()}{line}")   # echo the command, since the input line is erased
        cmd, _, rest = line.partition(" ")
        arg = rest.strip()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd in ("/help", "/?"):
            print(HELP)
        elif cmd in ("/to", "/history", "/safety", "/verify") and not arg:
            print(f"usage: {cmd} NAME (try /help)")
        elif cmd == "/to":
            name, _, text = arg.partition(" ")
            if self.switch_to(name) and text.strip() and self.peer:
                await self.send(self.peer, text.strip())
        elif cmd == "/file":
            await chat_files.send_path(self, arg)
        elif cmd == "/contacts":
            self.list_contacts()
        elif cmd == "/history":
            self.show_history(normalize_username(arg))
        elif cmd == "/safety":
            name = normalize_username(arg)
            number = self.client.safety_number(name)
            print(f"safety number with {name}:\n{group_digits(number.digits)}\n"
                  f"(compare it with {name} in person or on a call, then /verify {name})")
        elif cmd == "/verify":
            await self.verify(arg)
        elif cmd == "/groups" or (cmd == "/group" and arg):
            self.group = await group_command(self.client, cmd, arg) or self.group
        elif cmd in CHAT_COMMANDS:
            await chat_command(self.client, cmd, arg)
        else:
            print(f"unknown command: {cmd} (try /help)")
        return True

    def switch_to(self, arg: str) -> bool:
        name = normalize_username(arg)
        if name == self.client.username:
            print("that is you: /to someone else")
            return False
        self.peer, self.group = name, None
        known = self.client.db.get_contact(name) is not None
        print(f"-- talking to {name}" + ("" if known else " (new contact: their keys are fetched "
                                                         "when you send the first message)"))
        return True

    def list_contacts(self) -> None:
        contacts = self.client.contacts()
        if not contacts:
            print("no contacts yet: /to NAME, then type a message")
        width = max((len(printable(c.name)) for c in contacts), default=0)
        for c in contacts:
            state, text = contact_state(c)
            if self.client.is_blocked(c.name):
                state, text = "user_blocked", f"BLOCKED by you (/unblock {printable(c.name)})"
            hint = {"unverified": f" (compare: /safety {printable(c.name)})",
                    "key_changed": f" - check it: /verify {printable(c.name)}",
                    "blocked": f" (verify again: /verify {printable(c.name)} password)"}.get(state, "")
            print(f"  {printable(c.name):<{width}}  {printable(text)}{hint}")

    def show_history(self, name: str) -> None:
        messages = self.client.history(name)
        if not messages:
            print(f"no messages with {name}")
        for m in messages:
            who = "you" if m.direction == "out" else printable(m.contact)
            mark = "" if m.status in ("sent", "shown", "new") else f"  ({m.status})"
            prefix = "!! " if m.direction == "event" else ""
            print(f"  [{clock(m.sent_at or m.received_at)}] {prefix}{who}: {printable(m.text)}{mark}")

    async def send(self, name: str, text: str) -> None:
        before = self.client.pending_outbox()
        shown = printable(text)
        try:
            msg_id = await self.client.send(name, text)
        except IdentityChanged as exc:
            print(f"!! NOT SENT to {name}: {printable(str(exc))}\n!! (in this chat: /verify {name})")
            return
        except ServerError as exc:
            if exc.code == "unknown_user":
                print(f"!! NOT SENT: there is no user '{name}' on {self.client.server_url}: {shown}")
            else:
                print(f"!! NOT SENT to {name}: {printable(str(exc))}: {shown}")
            return
        except EXPECTED as exc:
            if chat_files.is_too_long(exc):
                await chat_files.offer_as_file(self, name, text)
                return
            if self.client.pending_outbox() > before:
                self.had_queued = True
                print(f"[{clock(now_ms())}] you -> {name}: {shown}  (queued: {printable(str(exc))}; "
                      "it is retried when the connection is back)")
            else:
                print(f"!! NOT SENT to {name}: {printable(str(exc))}: {shown}")
            return
        queued = self.client.is_queued(msg_id)
        mark = "  (queued: not connected; it is sent when the connection is back)" if queued else ""
        self.had_queued |= queued
        print(f"[{clock(now_ms())}] you -> {name}: {shown}{mark}")

    async def verify(self, arg: str) -> None:
        name, _, mode = arg.partition(" ")
        name = normalize_username(name)
        if mode.strip() == "password":   # as the CLI: also for someone not yet a contact
            from .verify_password import verify_with_password
            password = await ask(self.questions, f"Password you share with {name}: ", password=True)
            self.verifying.add(name)
            try:
                await verify_with_password(self.client, name, timeout=120.0, password=password)
            finally:
                self.verifying.discard(name)
            return
        contact = self.client.contact(name)
        candidate = contact.pending_identity or contact.identity
        if contact.pending_identity:
            print(f"!! {name}'s identity key CHANGED. The new safety number is below.")
        number = self.client.safety_number(name, candidate)
        print(f"safety number with {name}:\n{group_digits(number.digits)}")
        answer = await ask(self.questions, f"Does {name} see exactly the same number? [y/N] ")
        if answer.strip().lower() in ("y", "yes"):
            # exactly the key whose number was shown: refused if it changed while comparing
            self.client.accept_identity(name, candidate, verified=True)
            print(f"-- {name} is verified.")
        else:
            print(f"-- {name} is not verified. If the numbers differ, someone may be between you.")


def now_ms() -> int:
    return int(time.time() * 1000)


def _error(text: str) -> None:
    print(f"cipherpost: error: {text}", file=sys.stderr, flush=True)


async def _ask_username(prompt: PromptSession[str], existing: list[str]) -> str:
    default = existing[0] if len(existing) == 1 else ""
    if default:
        hint = f" [{default}] (a new name creates a new identity)"
    elif existing:
        hint = f" (yours: {', '.join(existing)}; a new name creates a new identity)"
    else:
        hint = " (pick one, e.g. alice: this creates your identity)"
    for _ in range(SETUP_ATTEMPTS):
        try:
            return normalize_username((await ask(prompt, f"Username{hint}: ")).strip() or default)
        except ProtocolError as exc:
            print(f"!! {exc.message}")
    raise SetupCancelled("no valid username given")


async def _ask_server(prompt: PromptSession[str], server: str | None) -> tuple[str, bytes]:
    """The relay address and its certificate fingerprint, confirmed by the person."""
    for _ in range(SETUP_ATTEMPTS):
        url = server or (await ask(prompt, f"Server address [{DEFAULT_SERVER}]: ")).strip() \
            or DEFAULT_SERVER
        server = None   # a bad --server is asked for again
        if "://" not in url:
            url = "wss://" + url
        try:
            check_server_url(url)
            print(f"contacting {url}...")
            fingerprint = await probe_fingerprint(url)
        except EXPECTED as exc:
            print(f"!! {printable(str(exc))}")
            continue
        print(f"The server's certificate fingerprint is\n  {format_fingerprint(fingerprint)}\n"
              "It must match the one the server printed when it started.")
        await _confirm_fingerprint(prompt, fingerprint)
        return url, fingerprint
    raise SetupCancelled("could not reach a server; nothing was created")


async def _confirm_fingerprint(prompt: PromptSession[str], fingerprint: bytes) -> None:
    while True:
        answer = (await ask(prompt, "Does it match? [Y/n, or paste the fingerprint to compare] ")).strip()
        if answer.lower() in ("", "y", "yes"):
            return
        if answer.lower() in ("n", "no"):
            raise SetupCancelled("certificate not confirmed; nothing was created")
        try:
            given = parse_fingerprint(answer)
        except ValueError:
            print("!! answer y or n, or paste the fingerprint the server printed (SHA256:...)")
            continue
        if not hmac.compare_digest(given, fingerprint):
            raise SetupCancelled("the fingerprint you gave does NOT match this server's certificate: "
                                 "someone may be in between; nothing was created")
        print("the fingerprints match.")
        return


async def _ask_new_passphrase(prompt: PromptSession[str]) -> str:
    for _ in range(SETUP_ATTEMPTS):
        passphrase = await ask(prompt, "New passphrase (protects your keys on this machine): ",
                               password=True)
        if len(passphrase) < MIN_PASSPHRASE:
            print(f"!! choose at least {MIN_PASSPHRASE} characters")
            continue
        if await ask(prompt, "Repeat passphrase: ", password=True) == passphrase:
            return passphrase
        print("!! the two passphrases differ; again")
    raise SetupCancelled("no passphrase chosen; nothing was created")


async def _unlock_or_create(prompt: PromptSession[str], home: Path, user: str | None,
                            server: str | None) -> Client:
    existing = list_profiles(home)
    username = normalize_username(user) if user is not None else await _ask_username(prompt, existing)
    env_passphrase = os.environ.get(PASSPHRASE_ENV)
    if username in existing:
        if env_passphrase:
            print("unlocking...")
            return Client.open(home, username, env_passphrase)
        for _ in range(SETUP_ATTEMPTS):   # a mistyped passphrase is asked again
            passphrase = await ask(prompt, f"Passphrase for {username}: ", password=True)
            print("unlocking...")
            try:
                return Client.open(home, username, passphrase)
            except WrongPassphraseError:
                print("!! wrong passphrase; try again")
        raise SetupCancelled(f"wrong passphrase {SETUP_ATTEMPTS} times; nothing was changed")
    print(f"'{username}' is new here: creating an identity for it.")
    url, fingerprint = await _ask_server(prompt, server)
    passphrase = env_passphrase if env_passphrase is not None else await _ask_new_passphrase(prompt)
    invite: str | None = None
    for _ in range(SETUP_ATTEMPTS):
        print("creating keys and registering...")
        try:
            client = await Client.create(home, username, url, passphrase, server_fingerprint=fingerprint,
                                         invite=invite)
        except ServerError as exc:
            if exc.code in ("username_taken", "name_reserved", "name_confusable"):
                print(f"!! {exc.server_message}")
                username = await _ask_username(prompt, [])
            elif exc.code in ("registration_closed", "bad_invite"):
                print(f"!! {exc.server_message or exc}")
                invite = (await ask(prompt, "Invite token (ask the server's operator): ")).strip() or None
            else:
                raise
            continue
        print(f"registered {username}. Your identity fingerprint:\n"
              f"  {client.identity.public.fingerprint_text()}")
        if client.recovery_code is not None:
            print_recovery_code(username, client.recovery_code)
        return client
    raise SetupCancelled("registration did not succeed; nothing was created")


async def _interruptible(command: Coroutine[Any, Any, bool]) -> bool:
    """Run one chat command; Ctrl-C cancels just that command (a password verification waits up to
    two minutes) instead of ending the chat. Outside a prompt the terminal turns Ctrl-C into SIGINT."""
    task = asyncio.ensure_future(command)
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()
    try:
        loop.add_signal_handler(signal.SIGINT, interrupt)
    except (NotImplementedError, RuntimeError):   # not the main thread, or no signals here
        return await task
    try:
        return await task
    except asyncio.CancelledError:
        if not interrupted:   # the chat itself is being cancelled, not just this command
            raise
        print("\r-- cancelled")   # over the "^C" the terminal echoed
        return True
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, previous)


async def _wait_connected(client: Client, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not client.connected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _chat(home: Path, user: str | None, server: str | None) -> int:
    prompt = question_session()
    try:
        client = await _unlock_or_create(prompt, home, user, server)
    except Cancelled as exc:
        _error(("interrupted" if exc.interrupted else "cancelled") + "; nothing was changed")
        return EXIT_INTERRUPTED if exc.interrupted else 1
    except SetupCancelled as exc:
        _error(str(exc))
        return 1
    except EXPECTED as exc:
        _error(str(exc))
        return 1
    chat = Chat(client, prompt)
    with patch_stdout(raw=True):
        client.add_listener(chat.on_incoming)
        client.on_pake_request(chat.on_pake_request)
        client.pake_mailbox.on_cancel(chat.on_pake_cancel)
        print(f"You are {client.username} on {client.server_url}. /to NAME starts a conversation; "
              "/help lists commands; Ctrl-D leaves.")
        keeper = asyncio.create_task(client.stay_connected(chat.status))
        await _wait_connected(client, CONNECT_GRACE)
        for m in client.take_new_messages():
            chat.show(m)
        try:
            while True:
                try:
                    line = await chat.read_line()
                except EOFError:
                    break
                except KeyboardInterrupt:
                    if not chat.interrupt_hint_shown:
                        print("(Ctrl-C clears the line; /quit or Ctrl-D leaves)")
                        chat.interrupt_hint_shown = True
                    continue
                try:
                    if not await _interruptible(chat.handle(line)):
                        break
                except Cancelled:
                    print("-- cancelled")
                except EXPECTED as exc:
                    print(f"!! {printable(str(exc))}")
                except Exception as exc:   # a bug should not end the conversation; say what it was
                    print(f"!! unexpected error ({type(exc).__name__}): {printable(str(exc))}")
        finally:
            keeper.cancel()
            with contextlib.suppress(BaseException):
                await keeper
            await client.close()
    print("bye")
    return 0


def run_chat(home: Path, user: str | None, server: str | None) -> int:
    try:
        return asyncio.run(_chat(home, user, server))
    except KeyboardInterrupt:   # Ctrl-C outside a prompt (registering): Client.create undid its work
        _error("interrupted; nothing was changed")
        return EXIT_INTERRUPTED
