"""Commands that print, read through a real pipe that closes early (issue 8 item 2).

`cipherpost recv | head -1` must show one message and leave the rest for the next `recv`; a closed
pipe ends any command quietly (no traceback), with exit status 141 as a SIGPIPE death would give.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

from e2e_support import User

F_SETPIPE_SZ = 1031   # Linux: shrink the pipe so the writer cannot run ahead of the reader
EXIT_PIPE_CLOSED = 141


def _env(user: User) -> dict[str, str]:
    return {**os.environ, "CIPHERPOST_HOME": str(user.home), "CIPHERPOST_PASSPHRASE": user.passphrase}


def _read_first_line_then_close(user: User, *args: str) -> tuple[bytes, int, str]:
    """Run the command into a 4 KiB pipe; read up to the first newline, one byte at a time (as
    `head -1` would, never past it), close the pipe, and return (line, exit status, stderr)."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([sys.executable, "-m", "cipherpost", *args], stdout=w,
                            stderr=subprocess.PIPE, env=_env(user))
    os.close(w)
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(r, 1)
        if not byte:
            break
        line += byte
    os.close(r)
    _, err = proc.communicate(timeout=60)
    return line, proc.returncode, err.decode()


def _into_closed_pipe(user: User, *args: str) -> tuple[int, str]:
    r, w = os.pipe()
    os.close(r)   # the reader is gone before the first byte
    proc = subprocess.run([sys.executable, "-m", "cipherpost", *args], stdout=w, stderr=subprocess.PIPE,
                          env=_env(user), timeout=60)
    os.close(w)
    return proc.returncode, proc.stderr.decode()


def test_recv_into_a_pipe_closed_after_one_line_leaves_the_rest_for_the_next_recv(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    # Each message is much longer than the pipe (a page or two), so the second cannot be flushed
    # before the reader left.
    texts = [f"{i:02d}" + "p" * 20_000 for i in range(30)]
    alice.ok("send", "bob", "--stdin", stdin="\n".join(texts) + "\n")
    line, code, err = _read_first_line_then_close(bob, "recv", "--json")
    assert json.loads(line)["text"] == texts[0]
    assert code == EXIT_PIPE_CLOSED
    assert "Traceback" not in err and "Error" not in err
    # What was flushed into the pipe counts as shown (the pipe holds a little more than the reader
    # took, so one more line may have gone in before the reader left); everything after that is
    # left for the next recv: none lost, none shown twice, in order.
    rest = [m["text"] for m in bob.recv()]
    assert 27 <= len(rest) <= 29 and rest == texts[30 - len(rest):]
    assert bob.recv() == []


def test_recv_into_a_closed_pipe_shows_nothing_and_keeps_everything(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "--stdin", stdin="one\ntwo\nthree\n")
    code, err = _into_closed_pipe(bob, "recv")
    assert code == EXIT_PIPE_CLOSED and "Traceback" not in err and "Exception" not in err
    assert [m["text"] for m in bob.recv()] == ["one", "two", "three"]


def test_every_printing_command_ends_quietly_on_a_closed_pipe(make_user) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alice.ok("send", "bob", "hi")
    bob.recv()
    bob.ok("accept", "alice")                      # a stranger's message is a request until accepted
    for args in (["history", "alice"], ["history", "alice", "--json"], ["contacts"], ["contacts", "--json"],
                 ["fingerprint"], ["fingerprint", "--qr"], ["fingerprint", "alice", "--qr"]):
        code, err = _into_closed_pipe(bob, *args)
        assert code == EXIT_PIPE_CLOSED, (args, code, err)
        assert "Traceback" not in err and "Exception" not in err, (args, err)
    # A long history through `head -1` style reading: one line, quiet end.
    alice.ok("send", "bob", "--stdin", stdin="".join(f"line {i} " + "h" * 5000 + "\n" for i in range(5)))
    line, code, err = _read_first_line_then_close(alice, "history", "bob")
    assert b"hi" in line and code == EXIT_PIPE_CLOSED and "Traceback" not in err
