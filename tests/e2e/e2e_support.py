"""End-to-end support: a real relay subprocess on 127.0.0.1 with TLS and SQLite, and CLI runners."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PASSPHRASE = "correct horse battery staple"


@dataclass
class RelayProcess:
    data: Path
    port: int = 0
    url: str = ""
    fingerprint: str = ""
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)   # kept, so a restart keeps its configuration

    def start(self, port: int | None = None, extra: list[str] | None = None) -> None:
        if extra is not None:
            self.extra = extra
        cmd = [sys.executable, "-m", "cipherpost", "server", "--host", "127.0.0.1",
               "--port", str(self.port if port is None else port), "--data", str(self.data), *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 20
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("server exited early:\n" + "".join(self.output))
            self.output.append(line)
            m = re.search(r"listening on (wss?://[\d.]+:(\d+))", line)
            if m:
                self.url, self.port = m.group(1), int(m.group(2))
            m = re.search(r"TLS certificate fingerprint: (SHA256:[0-9a-f]{64})", line)
            if m:
                self.fingerprint = m.group(1)
            if self.url and self.fingerprint:
                break
        else:
            raise AssertionError("server did not report its address:\n" + "".join(self.output))
        # Keep draining output so the server never blocks on a full pipe.
        import threading

        def drain() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for rest in self.proc.stdout:
                self.output.append(rest)
        threading.Thread(target=drain, daemon=True).start()

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code


@dataclass
class User:
    name: str
    home: Path
    passphrase: str = PASSPHRASE

    def run(self, *args: str, passphrase: str | None = None, timeout: float = 60,
            stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "CIPHERPOST_HOME": str(self.home),
                    "CIPHERPOST_PASSPHRASE": self.passphrase if passphrase is None else passphrase,
                    **(env or {})}
        return subprocess.run([sys.executable, "-m", "cipherpost", *args], capture_output=True, text=True,
                              timeout=timeout, env=full_env, input=stdin)

    def ok(self, *args: str, **kw: object) -> str:
        result = self.run(*args, **kw)  # type: ignore[arg-type]
        assert result.returncode == 0, f"{args} failed ({result.returncode}): {result.stderr}{result.stdout}"
        return result.stdout

    def recv(self, wait: float = 0.0) -> list[dict[str, object]]:
        out = self.ok("recv", "--json", "--wait", str(wait))
        return [json.loads(line) for line in out.splitlines() if line.strip()]
