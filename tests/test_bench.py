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
