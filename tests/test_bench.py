"""`edge-gateway bench` runs end to end and reports every documented figure (values, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

KEYS = {
    "tags", "hz", "mode", "seconds", "values_per_s", "delivered_fraction", "windows_per_s", "latency_p50_ms",
    "latency_p99_ms", "cpu_percent", "peak_rss_mb", "plc_cpu_percent", "broker_cpu_percent",
    "values_per_cpu_s", "naive_values_per_cpu_s", "batched_vs_naive",
}  # fmt: skip


@pytest.mark.parametrize("mode", ["poll", "subscribe"])
def test_bench_json_has_every_figure(mode: str) -> None:
    cmd = [sys.executable, "-m", "gateway", "bench", "--tags", "16", "--seconds", "2", "--naive-seconds", "0.5"]
    result = subprocess.run(cmd + ["--mode", mode, "--json"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert KEYS <= set(figures)
    assert figures["mode"] == mode and figures["tags"] == 16
    assert figures["values_per_s"] > 0 and 0 < figures["delivered_fraction"] <= 1.01
    assert figures["windows_per_s"] > 0 and figures["latency_p50_ms"] is not None
    assert figures["naive_values_per_cpu_s"] > 0 and figures["batched_vs_naive"] > 0


DELIVERY_KEYS = {
    "events", "events_per_s", "stored_per_s", "sustained_s", "cpu_percent", "backlog", "broker_down_s",
    "backlog_stored_s", "backlog_reconnect_s", "backlog_delivered_s", "outbox_bytes_per_event",
    "payload_bytes_per_event", "file_bytes_per_event",
}  # fmt: skip


def test_bench_delivery_json_has_every_figure() -> None:
    cmd = [sys.executable, "-m", "gateway", "bench", "--delivery", "--events", "200", "--backlog", "300"]
    result = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert DELIVERY_KEYS <= set(figures)
    assert figures["events"] == 200 and figures["backlog"] == 300
    assert figures["events_per_s"] > 0 and figures["stored_per_s"] > 0
    # The backlog is timed from the broker's return: reconnecting comes first, the last receipt after it.
    assert 0 <= figures["backlog_reconnect_s"] <= figures["backlog_delivered_s"]
    # Every stored event is in the outbox table, payload and row overhead included.
    assert figures["outbox_bytes_per_event"] > figures["payload_bytes_per_event"] > 0
