"""Files end to end (issue 13, docs/attachments.md): real relay subprocess over real TLS with real
SQLite and blob files, real CLI processes (and the Client API where a hostile sender is needed).

The sizes stay small (a few MiB) so the suite stays fast; the 100 MiB figures are bench/files.py's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from e2e_support import PASSPHRASE, RelayProcess, User

from cipherpost.client.attachments import CHUNK_SIZE, ENCRYPTED_CHUNK_SIZE, FileOffer, safe_name, upload_file
from cipherpost.client.client import Client
from cipherpost.client.connection import parse_fingerprint


def blob_files(relay: RelayProcess, suffix: str) -> list[Path]:
    root = relay.data / "blobs"
    return sorted(root.rglob(f"*{suffix}")) if root.exists() else []


def recv_files(user: User, downloads: Path, *extra: str) -> list[dict[str, object]]:
    out = user.ok("recv", "--json", "--downloads", str(downloads), *extra)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def make_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def start_upload(user: User, path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "CIPHERPOST_HOME": str(user.home), "CIPHERPOST_PASSPHRASE": PASSPHRASE}
    return subprocess.Popen([sys.executable, "-m", "cipherpost", "send-file", "bob", str(path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def progress_events(text: str) -> list[dict[str, int]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"event": "progress"')]


def kill_after(proc: subprocess.Popen[str], nbytes: int) -> list[dict[str, int]]:
    """SIGKILL ``proc`` as soon as it reports ``nbytes`` uploaded; its progress events so far."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        if line.startswith('{"event": "progress"'):
            seen.append(json.loads(line))
            if seen[-1]["bytes"] >= nbytes:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=30)
    assert seen and seen[-1]["bytes"] < seen[-1]["total"], "the upload finished before it could be killed"
    return seen


def test_a_multi_chunk_file_round_trips_and_leaves_the_relay_once_saved(make_user, relay: RelayProcess,
                                                                        tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    bob.ok("send", "alice", "hi")              # bob is a contact of alice's
    source = tmp_path / "holiday photos.tar"
    data = make_file(source, 5 * CHUNK_SIZE + 123)
    out = alice.ok("send-file", "bob", str(source))
    assert out.startswith("sent ") and "holiday photos.tar" in out
    assert len(blob_files(relay, ".blob")) == 1
    stored = blob_files(relay, ".blob")[0].read_bytes()
    assert data[:4096] not in stored and len(stored) >= len(data)   # opaque, padded
    downloads = tmp_path / "downloads"
    [row] = recv_files(bob, downloads)
    assert row["from"] == "alice" and row["text"] == f"[file] holiday photos.tar ({len(data)} bytes)"
    f = row["file"]
    assert isinstance(f, dict)
    digest = hashlib.sha256(data).hexdigest()
    assert (f["name"], f["size"], f["sha256"]) == ("holiday photos.tar", len(data), digest)
    saved = Path(str(f["path"]))
    assert saved.parent == downloads and saved.read_bytes() == data
    assert not saved.stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    assert [p.name for p in downloads.iterdir()] == ["holiday photos.tar"]   # no part file left
    assert blob_files(relay, ".blob") == []   # every reader saved it: deleted
    # an empty file too
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    alice.ok("send-file", "bob", str(empty))
    [row] = recv_files(bob, downloads)
    assert Path(str(row["file"]["path"])).read_bytes() == b""  # type: ignore[index]


def test_no_download_then_download_by_id(make_user, tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    source = tmp_path / "notes.md"
    data = make_file(source, 70_000)
    alice.ok("send-file", "bob", str(source))
    downloads = tmp_path / "dl"
    [row] = recv_files(bob, downloads, "--no-download")
    assert row["file"]["path"] is None and not downloads.exists()  # type: ignore[index]
    out = bob.ok("download", str(row["id"]), "--downloads", str(downloads), "--json")
    assert Path(json.loads(out)["path"]).read_bytes() == data


def test_sigkill_of_the_client_mid_upload_resumes_without_sending_held_chunks_again(
        make_user, relay: RelayProcess, tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    source = tmp_path / "big.bin"
    data = make_file(source, 8 * 1024 * 1024)
    first = kill_after(start_upload(alice, source), 1 << 20)
    acked = first[-1]["bytes"] // ENCRYPTED_CHUNK_SIZE
    [index] = blob_files(relay, ".idx")
    written = index.stat().st_size // 32          # chunks the relay wrote before the kill
    second = alice.run("send-file", "bob", str(source), "--json")
    assert second.returncode == 0, second.stderr
    resumed = progress_events(second.stderr)[0]["bytes"] // ENCRYPTED_CHUNK_SIZE
    assert resumed >= acked                        # nothing acknowledged is sent again
    assert resumed >= written - 1                  # at most the one chunk in flight is sent again
    [row] = recv_files(bob, tmp_path / "dl")
    assert Path(str(row["file"]["path"])).read_bytes() == data  # type: ignore[index]


def test_a_file_changed_between_attempts_starts_over_with_a_fresh_key(make_user, relay: RelayProcess,
                                                                     tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    source = tmp_path / "draft.bin"
    make_file(source, 8 * 1024 * 1024)
    kill_after(start_upload(alice, source), 1 << 20)
    [old_blob] = blob_files(relay, ".blob")
    changed = make_file(source, 8 * 1024 * 1024)    # same size, other bytes
    second = alice.run("send-file", "bob", str(source), "--json")
    assert second.returncode == 0, second.stderr
    assert progress_events(second.stderr)[0]["bytes"] == 0   # started over
    assert not old_blob.exists()                   # the old blob (old key) was released
    [row] = recv_files(bob, tmp_path / "dl")
    assert Path(str(row["file"]["path"])).read_bytes() == changed  # type: ignore[index]


def test_a_relay_restart_mid_upload_resumes(make_user, relay: RelayProcess, tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    source = tmp_path / "video.bin"
    data = make_file(source, 8 * 1024 * 1024)
    proc = start_upload(alice, source)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith('{"event": "progress"') and json.loads(line)["bytes"] >= 1 << 20:
            assert relay.proc is not None
            relay.proc.send_signal(signal.SIGKILL)   # the relay dies mid-transfer
            relay.proc.wait()
            relay.proc = None
            break
    assert proc.wait(timeout=60) == 1                # a clear error, not a hang
    relay.start(port=relay.port)
    second = alice.run("send-file", "bob", str(source), "--json")
    assert second.returncode == 0, second.stderr
    assert progress_events(second.stderr)[0]["bytes"] > 0   # resumed, not restarted
    [row] = recv_files(bob, tmp_path / "dl")
    assert Path(str(row["file"]["path"])).read_bytes() == data  # type: ignore[index]


def _damage(blob: Path, how: str) -> None:
    raw = bytearray(blob.read_bytes())
    if how == "tampered":
        raw[ENCRYPTED_CHUNK_SIZE + 100] ^= 1
        blob.write_bytes(bytes(raw))
    elif how == "reordered":
        c = ENCRYPTED_CHUNK_SIZE
        raw[0:c], raw[c:2 * c] = raw[c:2 * c], raw[0:c]
        blob.write_bytes(bytes(raw))
    else:  # truncated: the file loses its last chunks
        with blob.open("r+b") as f:
            f.truncate(2 * ENCRYPTED_CHUNK_SIZE)


def test_tampered_reordered_or_truncated_chunks_fail_clearly_and_save_nothing(
        make_user, relay: RelayProcess, tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    for how in ("tampered", "reordered", "truncated"):
        source = tmp_path / f"{how}.bin"
        make_file(source, 4 * CHUNK_SIZE + 7)
        alice.ok("send-file", "bob", str(source))
        [blob] = blob_files(relay, ".blob")
        _damage(blob, how)
        downloads = tmp_path / f"dl-{how}"
        result = bob.run("recv", "--json", "--downloads", str(downloads))
        assert "nothing was saved" in result.stderr, (how, result.stderr)
        [row] = [json.loads(line) for line in result.stdout.splitlines()]
        assert row["file"]["path"] is None and "error" in row["file"]
        assert list(downloads.iterdir()) == [], how   # no final name, no part file
        blob.unlink()
        blob.with_suffix(".idx").unlink()


def test_hostile_file_names_are_tamed(relay: RelayProcess, tmp_path: Path) -> None:
    assert safe_name("../../.bashrc") == "bashrc"
    assert safe_name("C:\\Windows\\evil.exe") == "evil.exe"
    assert safe_name("a\x1b[31mred\x00\u202etxt.exe") == "a[31mredtxt.exe"
    assert safe_name("..") == "file" and safe_name("") == "file" and safe_name("/") == "file"
    assert len(safe_name("x" * 500 + ".pdf")) <= 120 and safe_name("x" * 500 + ".pdf").endswith(".pdf")

    async def scenario() -> None:
        clients = []
        for name in ("alice", "bob"):
            c = await Client.create(tmp_path / f"api-{name}", name, relay.url, PASSPHRASE,
                                    server_fingerprint=parse_fingerprint(relay.fingerprint))
            await c.connect()
            clients.append(c)
        alice, bob = clients
        source = tmp_path / "payload.sh"
        source.write_bytes(b"#!/bin/sh\necho owned\n")
        source.chmod(0o755)
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        (downloads / "passwd").write_bytes(b"mine")
        for hostile in ("../../../etc/passwd", "/etc/passwd", "..\\..\\passwd"):
            offer = await upload_file(alice, source, ["bob"])
            forged = FileOffer(offer.blob_id, offer.key, offer.nonce, offer.size, offer.sha256, hostile,
                               offer.media_type)
            await alice.send("bob", forged.describe(), file=forged)
        got = await bob.receive(wait=10)
        while len(got) < 3:
            got += await bob.receive(wait=10)
        from cipherpost.client.attachments import download_file
        saved = [await download_file(bob, m.file, downloads) for m in got if m.file is not None]
        assert sorted(p.name for p in saved) == ["passwd (1)", "passwd (2)", "passwd (3)"]
        assert (downloads / "passwd").read_bytes() == b"mine"           # never overwritten
        assert all(p.parent == downloads for p in saved)
        assert all(not p.stat().st_mode & 0o111 for p in saved)          # never executable
        for c in clients:
            await c.close()
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_the_relays_size_limit_and_quota_refuse_clearly(make_user, relay: RelayProcess,
                                                        tmp_path: Path) -> None:
    relay.stop()
    relay.start(port=relay.port, extra=["--max-blob-bytes", "200000", "--max-stored-bytes", "300000"])
    alice, _ = make_user("alice"), make_user("bob")
    big = tmp_path / "big.bin"
    make_file(big, 250_000)
    result = alice.run("send-file", "bob", str(big))
    assert result.returncode == 1 and "exceeds this relay's limit of 200000 bytes" in result.stderr
    ok = tmp_path / "ok.bin"
    make_file(ok, 150_000)
    alice.ok("send-file", "bob", str(ok))
    result = alice.run("send-file", "bob", str(tmp_path / "ok.bin"))
    assert result.returncode == 1 and "quota" in result.stderr, result.stderr


def test_a_download_folder_that_cannot_be_written_is_a_clear_error(make_user, tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    source = tmp_path / "a.bin"
    make_file(source, 1000)
    alice.ok("send-file", "bob", str(source))
    not_a_folder = tmp_path / "plain-file"
    not_a_folder.write_bytes(b"")
    result = bob.run("recv", "--json", "--downloads", str(not_a_folder))
    assert result.returncode == 0 and "cannot save into" in result.stderr and "Traceback" not in result.stderr
    [row] = [json.loads(line) for line in result.stdout.splitlines()]
    out = bob.ok("download", str(row["id"]), "--downloads", str(tmp_path / "ok"), "--json")
    assert Path(json.loads(out)["path"]).read_bytes() == source.read_bytes()   # still on the relay


def test_send_of_a_text_too_long_for_one_message_points_to_send_file(make_user) -> None:
    alice, _ = make_user("alice"), make_user("bob")
    result = alice.run("send", "bob", "-", stdin="y" * 70_000)
    assert result.returncode == 1
    assert "message too long" in result.stderr and "cipherpost send-file bob FILE" in result.stderr


def test_a_download_killed_midway_resumes_and_saves_only_when_complete(make_user, tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    source = tmp_path / "album.bin"
    data = make_file(source, 8 * 1024 * 1024)
    alice.ok("send-file", "bob", str(source))
    downloads = tmp_path / "dl"
    [row] = recv_files(bob, downloads, "--no-download")
    env = {**os.environ, "CIPHERPOST_HOME": str(bob.home), "CIPHERPOST_PASSPHRASE": PASSPHRASE}
    proc = subprocess.Popen([sys.executable, "-m", "cipherpost", "download", str(row["id"]), "--downloads",
                             str(downloads), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    kill_after(proc, 1 << 20)
    [part] = list(downloads.iterdir())                 # only the hidden part file, no final name
    assert part.name.endswith(".cipherpost-part") and part.name.startswith(".")
    second = bob.run("download", str(row["id"]), "--downloads", str(downloads), "--json")
    assert second.returncode == 0, second.stderr
    assert progress_events(second.stderr)[0]["bytes"] >= 1 << 20   # resumed, not started over
    saved = Path(json.loads(second.stdout)["path"])
    assert saved.read_bytes() == data and [p.name for p in downloads.iterdir()] == ["album.bin"]
