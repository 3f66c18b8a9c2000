"""The phases of one resumable upload, in one table (STYLE.md habit 3; docs/attachments.md 8).

Pure: ``step(state, event)`` gives the next phase or raises :class:`TransferError`, and then the
caller still holds its old phase. ``client/attachments.py`` drives it; the durable part of an
upload (key, nonce, blob id, chunk hashes) lives in the profile, so after a crash a new process
starts at ``NEW`` and reaches ``SENDING`` again through ``Begun``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class TransferError(Exception):
    """An event that is not allowed in the current phase (a bug in the driver, never user input)."""


class Upload(enum.Enum):
    NEW = "new"              # no relay state known yet (key, nonce and blob id may be stored)
    SENDING = "sending"      # the relay answered blob_begin; chunks go out from ``held``
    RESTART = "restart"      # the file changed: the old blob is released, a fresh key is drawn
    COMMITTED = "committed"  # every chunk held and the readers fixed: the message can go


@dataclass(frozen=True, slots=True)
class Begun:
    held: int                # chunks the relay holds (on disk)


@dataclass(frozen=True, slots=True)
class Verified:
    pass                     # the held chunks match the recorded hashes: resume from ``held``


@dataclass(frozen=True, slots=True)
class Changed:
    pass                     # a held chunk differs from the file now: never reuse this key and nonce


@dataclass(frozen=True, slots=True)
class ChunkStored:
    index: int


@dataclass(frozen=True, slots=True)
class Committed:
    pass


Event = Begun | Verified | Changed | ChunkStored | Committed

TRANSITIONS: Final[dict[tuple[Upload, type], Upload]] = {
    (Upload.NEW, Begun): Upload.NEW,               # what the relay holds is not trusted yet
    (Upload.NEW, Verified): Upload.SENDING,
    (Upload.NEW, Changed): Upload.RESTART,
    (Upload.SENDING, ChunkStored): Upload.SENDING,
    (Upload.SENDING, Changed): Upload.RESTART,     # the file changed size while being read
    (Upload.SENDING, Committed): Upload.COMMITTED,
    (Upload.RESTART, Begun): Upload.NEW,           # the fresh blob of the next attempt
}


def step(state: Upload, event: Event) -> Upload:
    new = TRANSITIONS.get((state, type(event)))
    if new is None:  # refused: the caller still holds its old state
        raise TransferError(f"{type(event).__name__} while {state.name}")
    return new
