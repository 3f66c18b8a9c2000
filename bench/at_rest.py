"""Cost of scrubbing superseded states from the profile's WAL (run by hand; issue 8 item 10).

    PYTHONPATH=src python bench/at_rest.py

A commit that replaces a ratchet state is followed by a TRUNCATE checkpoint (client/profile.py
``ProfileDB._scrub``). This times commits of 1 and of 100 messages (one state update and one
history row each, as the receive path writes them) with the scrub and without it, on a real file
with ``synchronous=FULL``: the scrub is paid once per commit, so batched commits amortise it.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from cipherpost.client import profile as profile_module
from cipherpost.client.profile import ProfileDB
from cipherpost.crypto.records import RecordCipher

STATE_BYTES = 2500   # a serialized session with a few skipped keys
COMMITS = 100


def run(batch: int, scrub: bool) -> float:
    """Milliseconds per commit."""
    with tempfile.TemporaryDirectory() as tmp:
        db = ProfileDB(Path(tmp) / "profile.db", RecordCipher(RecordCipher.new_key()))
        if not scrub:
            db._scrub = lambda: None  # type: ignore[method-assign]
        sid, ident = os.urandom(16), os.urandom(100)
        start = time.perf_counter()
        for i in range(COMMITS):
            with db.transaction():
                for _ in range(batch):
                    db.save_session(sid, "alice", ident, os.urandom(STATE_BYTES), i)
                    db.add_message("alice", "in", os.urandom(16), "m" * 256, sent_at=i, received_at=i,
                                   status="new")
        elapsed = time.perf_counter() - start
        db.close()
    return elapsed / COMMITS * 1000


def main() -> None:
    assert profile_module.SCHEMA_VERSION >= 1
    for batch in (1, 100):
        plain, scrubbed = run(batch, scrub=False), run(batch, scrub=True)
        print(f"{batch:>3} message(s) per commit: {plain:6.2f} ms without scrub, {scrubbed:6.2f} ms with "
              f"({(scrubbed - plain) / batch:5.3f} ms extra per message; "
              f"{batch * 1000 / scrubbed:7.0f} msgs/s with scrub)")


if __name__ == "__main__":
    main()
