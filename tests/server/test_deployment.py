"""The deployment files run what they say: the Docker image's command and healthcheck against a real
relay (docker itself may not run here), the systemd unit's and compose's relay command lines."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from relay_harness import REPO, ServerProcess

from cipherpost.cli import server_cmd


def _dockerfile_json(instruction: str) -> list[str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    [line] = [ln for ln in text.splitlines() if ln.startswith(instruction + " ")]
    return list(json.loads(line[len(instruction):].split("CMD", 1)[-1].strip()))


def _parse_server(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cipherpost")
    server_cmd.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(args)


def test_docker_image_command_serves_and_its_healthcheck_sees_it(tmp_path: Path) -> None:
    assert _dockerfile_json("ENTRYPOINT") == ["cipherpost"]
    cmd = _dockerfile_json("CMD")
    assert cmd[:1] == ["server"] and "--data" in cmd and "/data" in cmd
    health = _dockerfile_json("HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3")
    assert health[:2] == ["python", "/usr/local/bin/cipherpost-healthcheck"]
    # the image's command, on loopback and a free port here, with a temporary data volume
    args = list(cmd[1:])
    args[args.index("--host") + 1] = "127.0.0.1"  # tests listen on loopback only
    for flag in ("--port", "--data"):  # ServerProcess passes --port 0 and its own --data
        del args[args.index(flag):args.index(flag) + 2]
    server = ServerProcess(tmp_path / "data", args).start()
    port = server.url.rsplit(":", 1)[1]
    healthcheck = [sys.executable, str(REPO / "deploy" / "healthcheck.py"), port]
    try:
        ok = subprocess.run(healthcheck, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        code, log = server.terminate()
    assert code == 0 and "Traceback" not in log
    down = subprocess.run(healthcheck, capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "unhealthy" in down.stderr


def test_systemd_unit_and_compose_relay_command_lines_are_valid_server_invocations() -> None:
    unit = (REPO / "deploy" / "cipherpost.service").read_text()
    [exec_start] = re.findall(r"^ExecStart=(.+)$", unit, re.MULTILINE)
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/cipherpost")
    server_cmd.config_from_args(_parse_server(argv[1:])).validate()
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "DynamicUser=yes", "KillSignal=SIGTERM"):
        assert option in unit
    compose = (REPO / "compose.yaml").read_text()
    [command] = re.findall(r'command: (\["server".*?\])', compose, re.DOTALL)
    args = json.loads(command.replace("\n", " "))
    ns = _parse_server(args)
    store = re.search(r"CIPHERPOST_STORE: (\S+)", compose)
    bus = re.search(r"CIPHERPOST_BUS: (\S+)", compose)
    assert store and bus
    ns.store, ns.bus = store.group(1), bus.group(1)
    server_cmd.config_from_args(ns).validate()  # the pair a multi-instance relay needs
    haproxy = (REPO / "deploy" / "haproxy.cfg").read_text()
    assert "mode tcp" in haproxy and "ssl" not in haproxy.split("backend")[0]  # no TLS termination
    assert {"relay-a", "relay-b"} <= set(re.findall(r"server (\S+) ", haproxy))

