"""``cipherpost verify NAME --password`` and ``/verify NAME password``: the terminal side of SPAKE2."""

from __future__ import annotations

import os
import sys

from ..client.client import Client
from ..client.errors import VerificationError
from .common import prompt_line

PASSWORD_ENV = "CIPHERPOST_VERIFY_PASSWORD"  # noqa: S105 (a variable name, for scripts and tests)


async def verify_with_password(client: Client, name: str, *, timeout: float,
                               password: str | None = None) -> int:
    if password is None:
        password = os.environ.get(PASSWORD_ENV)
    if password is None:
        if not sys.stdin.isatty():
            print(f"cipherpost: no terminal to ask for the shared password: set {PASSWORD_ENV}",
                  file=sys.stderr)
            return 2
        password = prompt_line(f"Password you share with {name}: ", secret=True)
    print(f"verifying {name}: waiting up to {timeout:.0f}s for them to enter the same password...",
          flush=True)
    try:
        await client.verify_password(name, password, timeout=timeout)
    except VerificationError as exc:
        print(f"cipherpost: error: {exc}", file=sys.stderr)
        return 1
    print(f"{name} is verified: you both know the password and see each other's real keys. "
          "New sessions with them mix in the verification key.")
    return 0
