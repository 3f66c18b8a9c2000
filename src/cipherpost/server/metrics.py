"""Prometheus-style counters of the relay (text exposition format 0.0.4, served on /metrics)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    connections_total: int = 0
    connections_open: int = 0
    connections_refused: int = 0
    frames_received: int = 0
    messages_accepted: int = 0
    messages_duplicate: int = 0
    messages_delivered: int = 0
    auth_success: int = 0
    auth_failure: int = 0
    registrations: int = 0
    bundles_served: int = 0
    deliveries_deferred: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def render(self, *, queued: int, accounts: int, store_batches: int | None = None,
               store_ops: int | None = None) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: int, labels: str = "") -> None:
            if not any(line.startswith(f"# TYPE {name} ") for line in lines):
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name}{labels} {value}")

        metric("cipherpost_connections_total", "counter", "WebSocket connections accepted.",
               self.connections_total)
        metric("cipherpost_connections_open", "gauge", "WebSocket connections open now.",
               self.connections_open)
        metric("cipherpost_connections_refused_total", "counter", "Connections refused (limit).",
               self.connections_refused)
        metric("cipherpost_frames_received_total", "counter", "Frames received.", self.frames_received)
        metric("cipherpost_messages_accepted_total", "counter", "Messages stored and accepted.",
               self.messages_accepted)
        metric("cipherpost_messages_duplicate_total", "counter", "Retried sends answered without a new copy.",
               self.messages_duplicate)
        metric("cipherpost_messages_delivered_total", "counter", "Messages pushed to recipients.",
               self.messages_delivered)
        metric("cipherpost_messages_queued", "gauge", "Messages stored and not yet acked.", queued)
        metric("cipherpost_accounts", "gauge", "Registered accounts.", accounts)
        metric("cipherpost_auth_success_total", "counter", "Successful authentications.", self.auth_success)
        metric("cipherpost_auth_failure_total", "counter", "Failed authentications.", self.auth_failure)
        metric("cipherpost_registrations_total", "counter", "Accounts registered.", self.registrations)
        metric("cipherpost_bundles_served_total", "counter", "Prekey bundles served.", self.bundles_served)
        metric("cipherpost_deliveries_deferred_total", "counter",
               "Live deliveries left in the store because the peer was behind (paged later).",
               self.deliveries_deferred)
        if store_batches is not None and store_ops is not None:
            metric("cipherpost_store_commits_total", "counter", "Store transactions (group commits).",
                   store_batches)
            metric("cipherpost_store_operations_total", "counter", "Store operations.", store_ops)
        lines.append("# HELP cipherpost_errors_total Error frames sent, by code.")
        lines.append("# TYPE cipherpost_errors_total counter")
        for code, n in sorted(self.errors.items()):
            lines.append(f'cipherpost_errors_total{{code="{code}"}} {n}')
        return "\n".join(lines) + "\n"
