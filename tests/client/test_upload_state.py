"""The upload phase table (client/upload_state.py): every row, and every pair that is not a row."""

from __future__ import annotations

import itertools

import pytest

from cipherpost.client.upload_state import (
    TRANSITIONS,
    Begun,
    Changed,
    ChunkStored,
    Committed,
    TransferError,
    Upload,
    Verified,
    step,
)

EVENTS = [Begun(3), Verified(), Changed(), ChunkStored(4), Committed()]


@pytest.mark.parametrize(("state", "event_type"), list(TRANSITIONS), ids=lambda v: getattr(v, "__name__", v))
def test_each_row(state: Upload, event_type: type) -> None:
    event = next(e for e in EVENTS if type(e) is event_type)
    assert step(state, event) is TRANSITIONS[(state, event_type)]


@pytest.mark.parametrize(("state", "event"), [
    (s, e) for s, e in itertools.product(Upload, EVENTS) if (s, type(e)) not in TRANSITIONS])
def test_each_pair_that_is_not_a_row_is_refused_and_changes_nothing(state: Upload, event: object) -> None:
    held = state
    with pytest.raises(TransferError):
        step(state, event)  # type: ignore[arg-type]
    assert held is state


def test_a_resume_and_a_restart_read_as_the_docs_say() -> None:
    s = step(step(Upload.NEW, Begun(5)), Verified())                   # resume from chunk 5
    s = step(step(s, ChunkStored(5)), Committed())
    assert s is Upload.COMMITTED
    s = step(step(step(Upload.NEW, Begun(5)), Changed()), Begun(0))    # changed: fresh blob
    assert step(s, Verified()) is Upload.SENDING
    with pytest.raises(TransferError):
        step(Upload.COMMITTED, ChunkStored(0))                         # nothing after the commit
