"""Changing a profile's passphrase: the key store re-sealed and replaced atomically.

The key store (``keystore.bin``) is the only thing sealed with the passphrase; the database is
sealed with the record key inside it, so nothing else changes. The new blob is written to
``keystore.bin.tmp``, fsynced, renamed over the old one and the directory fsynced
(``home.write_private_file``): a crash before the rename leaves the old passphrase working, after
it the new one; never neither (``tests/e2e/test_passphrase.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..crypto.errors import CryptoError, WrongPassphrase
from ..crypto.keystore import reseal_keystore
from .errors import ClientError, ProfileError, WrongPassphraseError
from .home import ProfileLock, ProfilePaths, write_private_file

MIN_PASSPHRASE_CHARS = 8

Observer = Callable[[str, dict[str, Any]], None]


def change_passphrase(home: Path, username: str, old: str, new: str, *,
                      observer: Observer | None = None) -> None:
    """Re-seal ``username``'s key store under ``new``. Raises WrongPassphraseError if ``old`` does
    not open it, ProfileLocked if another process has the profile open."""
    if len(new) < MIN_PASSPHRASE_CHARS:
        raise ClientError(f"choose a passphrase of at least {MIN_PASSPHRASE_CHARS} characters")
    paths = ProfilePaths(home, username)
    if not paths.exists():
        raise ProfileError(f"no profile '{username}' in {home}")
    lock = ProfileLock(paths)
    lock.acquire()
    try:
        try:
            blob = reseal_keystore(old, new, paths.keystore.read_bytes())
        except WrongPassphrase:
            raise WrongPassphraseError("wrong passphrase") from None
        except CryptoError as exc:
            raise ProfileError(f"key store {paths.keystore} is damaged: {exc}") from None

        def sealed() -> None:
            if observer is not None:
                observer("keystore_tmp_written", {"user": username})
        write_private_file(paths.keystore, blob, before_replace=sealed)
        if observer is not None:
            observer("keystore_replaced", {"user": username})
    finally:
        lock.release()
