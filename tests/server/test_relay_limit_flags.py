"""``cipherpost server`` flags for the abuse limits, metrics listener and logs (issue 9) reach the
config, with the defaults docs/server.md states, and bad values are refused with a clear message."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cipherpost.cli.server_cmd import config_from_args, register
from cipherpost.server.handlers.mail import policy_of


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIPHERPOST_LIMITS_REDIS", raising=False)
    config = config_from_args(_parser().parse_args(["server", "--data", str(tmp_path)]))
    config.validate()
    assert (config.max_queue_per_sender, config.max_stored_bytes, config.disk_budget_bytes) == (
        1000, 256 << 20, None)
    assert (config.registrations_per_prefix_per_hour, config.one_time_prekeys_per_target_per_hour,
            config.prekey_uploads_per_account_per_hour, config.pake_per_hour) == (20, 60, 2000, 10)
    assert config.limits_redis is None
    assert config.metrics_listen == "127.0.0.1:9765"  # loopback by default
    assert config.log_peer_addresses is False


def test_flags_set_the_limits(tmp_path: Path) -> None:
    config = config_from_args(_parser().parse_args([
        "server", "--data", str(tmp_path), "--max-queue-per-sender", "50", "--max-stored-bytes", "1000000",
        "--disk-budget", "5000000", "--registrations-per-prefix-per-hour", "3",
        "--one-time-prekeys-per-target-per-hour", "9", "--prekey-uploads-per-hour", "300",
        "--pake-per-hour", "4", "--limits-redis", "redis://127.0.0.1:6379/0", "--metrics-listen", "off",
        "--log-peer-addresses"]))
    config.validate()
    assert (config.max_queue_per_sender, config.max_stored_bytes, config.disk_budget_bytes,
            config.registrations_per_prefix_per_hour, config.one_time_prekeys_per_target_per_hour,
            config.prekey_uploads_per_account_per_hour, config.pake_per_hour) == (
        50, 1_000_000, 5_000_000, 3, 9, 300, 4)
    assert config.limits_redis == "redis://127.0.0.1:6379/0"
    assert config.metrics_listen is None and config.log_peer_addresses
    policy = policy_of(config)
    assert (policy.max_queue, policy.max_queue_per_sender, policy.max_stored_bytes,
            policy.disk_budget_bytes) == (10_000, 50, 1_000_000, 5_000_000)


def test_the_per_sender_cap_never_exceeds_the_mailbox(tmp_path: Path) -> None:
    config = config_from_args(_parser().parse_args(["server", "--data", str(tmp_path), "--max-queue", "20"]))
    assert policy_of(config).max_queue_per_sender == 20


def test_redis_url_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIPHERPOST_LIMITS_REDIS", "redis://example:6379/1")
    config = config_from_args(_parser().parse_args(["server", "--data", str(tmp_path)]))
    assert config.limits_redis == "redis://example:6379/1"


@pytest.mark.parametrize(("args", "message"), [
    (["--metrics-listen", "9765"], "HOST:PORT"),
    (["--metrics-listen", "localhost:http"], "HOST:PORT"),
    (["--max-queue-per-sender", "0"], "max_queue_per_sender must be positive"),
    (["--disk-budget", "0"], "disk_budget_bytes must be positive"),
    (["--registrations-per-prefix-per-hour", "0"], "registrations_per_prefix_per_hour must be positive"),
])
def test_bad_values_are_refused_clearly(tmp_path: Path, args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_args(_parser().parse_args(["server", "--data", str(tmp_path), *args])).validate()
