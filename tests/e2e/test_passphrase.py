"""`cipherpost passphrase` (issue 8 item 13): the key store re-sealed atomically; a crash at any
point leaves exactly one passphrase working, never neither."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from e2e_support import PASSPHRASE, User

NEW = "a new and longer passphrase"

CRASH_SCRIPT = """
import os, sys
from pathlib import Path
from cipherpost.client.passphrase import change_passphrase

def observer(event, details):
    if event == sys.argv[3]:
        os._exit(17)   # a hard crash at that point: no cleanup at all

change_passphrase(Path(sys.argv[1]), sys.argv[2], os.environ["OLD"], os.environ["NEW"], observer=observer)
"""


def _opens(user: User, passphrase: str) -> bool:
    result = user.run("fingerprint", passphrase=passphrase)
    assert "Traceback" not in result.stderr
    return result.returncode == 0


def test_passphrase_change_through_the_cli(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "before")
    result = alice.run("passphrase", env={"CIPHERPOST_NEW_PASSPHRASE": NEW})
    assert result.returncode == 0 and "passphrase of alice is changed" in result.stdout
    assert not _opens(alice, PASSPHRASE) and _opens(alice, NEW)
    alice.passphrase = NEW
    alice.ok("send", "bob", "after")   # same identity, same sessions, same history
    assert [m["text"] for m in bob.recv()] == ["before", "after"]
    assert "before" in alice.ok("history", "bob")
    # A wrong current passphrase changes nothing.
    wrong = alice.run("passphrase", passphrase="not it", env={"CIPHERPOST_NEW_PASSPHRASE": "x" * 12})
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr
    assert _opens(alice, NEW)
    # Too short a new one is refused.
    short = alice.run("passphrase", env={"CIPHERPOST_NEW_PASSPHRASE": "short"})
    assert short.returncode == 1 and "at least 8" in short.stderr and _opens(alice, NEW)


@pytest.mark.parametrize(("event", "working"), [
    ("keystore_tmp_written", PASSPHRASE),   # new file durable beside the old one, not yet renamed
    ("keystore_replaced", NEW),             # renamed: the new one is the key store
])
def test_a_crash_midway_leaves_exactly_one_passphrase_working(make_user, event: str, working: str) -> None:
    alice = make_user("alice")
    crashed = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(alice.home), "alice", event],
                             env={**os.environ, "OLD": PASSPHRASE, "NEW": NEW},
                             capture_output=True, text=True, timeout=60)
    assert crashed.returncode == 17, crashed.stderr
    other = NEW if working == PASSPHRASE else PASSPHRASE
    assert _opens(alice, working) and not _opens(alice, other)
    # And the command simply runs again from there (a leftover temporary file is replaced).
    alice.passphrase = working
    target = "third passphrase!" if working == NEW else NEW
    assert alice.run("passphrase", env={"CIPHERPOST_NEW_PASSPHRASE": target}).returncode == 0
    assert _opens(alice, target)
