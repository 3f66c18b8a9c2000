"""`cipherpost demo --explain` (issue 8 item 15): readable at 100 columns, real ratchet steps,
one fingerprint format, F and SK explained, a password verification, no Python reprs."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_explain_reads_as_prose_and_shows_the_ratchet_and_a_password_check() -> None:
    result = subprocess.run([sys.executable, "-m", "cipherpost", "demo", "--explain"], capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert [line for line in out.splitlines() if len(line) > 100] == []
    assert re.search(r"\b(True|False|None)\b", out) is None
    # The ratchet, as it happens: a first key, a DH ratchet step on each reply, a symmetric step
    # for two messages in a row.
    assert "first ratchet key pair" in out and "first own ratchet key pair" in out
    assert out.count("NEW ratchet key pair") == 2
    assert "same ratchet key" in out and "symmetric step" in out
    assert "F is 32 bytes of 0xFF" in out and "SK, the 32-byte shared secret" in out
    # One identity fingerprint format (SHA256: then base32 groups), never a hex short id.
    unwrapped = re.sub(r"\n +", " ", out)
    identity_fps = re.findall(r"identity (?:fingerprint )?(SHA256:\S+)", unwrapped, flags=re.IGNORECASE)
    assert len(identity_fps) >= 4
    assert all(re.fullmatch(r"SHA256:[a-z2-7]{4}(-[a-z2-7]{1,4})+[,.]?", fp) for fp in identity_fps)
    assert re.search(r"received \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", out)    # not a raw ms timestamp
    assert "both sides now show the other as verified" in out
    assert "Traceback" not in result.stderr
