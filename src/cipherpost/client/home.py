"""Where a profile lives on disk, and the exclusive lock that keeps two processes from using it at once.

Layout of a home directory (default: the platform's user data dir, or ``--home``/``CIPHERPOST_HOME``)::

    HOME/                      0700
      profiles/NAME/           0700, one per local identity
        keystore.bin           0600, Argon2id-sealed identity keys and the profile's record key
        profile.db             0600, SQLite (WAL): contacts, sessions, history, outbox; bodies and
                               session state encrypted with the record key
        lock                   flock()ed while a process has the profile open
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import platformdirs

from .errors import ProfileError, ProfileLocked

HOME_ENV = "CIPHERPOST_HOME"


def default_home() -> Path:
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("cipherpost", appauthor=False))


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700, and tighten it if it already existed."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def write_private_file(path: Path, data: bytes, *, before_replace: Callable[[], None] | None = None) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600, fsynced (a crash leaves old or new).

    ``before_replace`` runs once the new content is durable in ``path.tmp`` and before the rename
    (crash tests stop there)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:   # os.write may write less than asked
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ProfilePaths:
    def __init__(self, home: Path, username: str):
        self.home = home
        self.username = username
        self.dir = home / "profiles" / username
        self.keystore = self.dir / "keystore.bin"
        self.database = self.dir / "profile.db"
        self.lockfile = self.dir / "lock"

    def exists(self) -> bool:
        return self.keystore.exists()


def list_profiles(home: Path) -> list[str]:
    root = home / "profiles"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "keystore.bin").exists())


class ProfileLock:
    """An exclusive advisory lock on a profile directory, held for the life of a Client."""

    def __init__(self, paths: ProfilePaths):
        self._paths = paths
        self._fd: int | None = None

    def acquire(self) -> None:
        private_dir(self._paths.dir)
        fd = os.open(self._paths.lockfile, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ProfileLocked(
                f"profile '{self._paths.username}' is in use by another cipherpost process "
                f"(close it first; lock file {self._paths.lockfile})"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def resolve_username(home: Path, requested: str | None) -> str:
    """Pick the profile: the one asked for, or the only one there is."""
    names = list_profiles(home)
    if requested:
        if requested not in names:
            raise ProfileError(
                f"no profile '{requested}' in {home} (run `cipherpost init {requested} --server URL`)"
            )
        return requested
    if not names:
        raise ProfileError(f"no profile in {home}: run `cipherpost init NAME --server URL` first")
    if len(names) > 1:
        raise ProfileError(f"several profiles in {home} ({', '.join(names)}): pass --user NAME")
    return names[0]
