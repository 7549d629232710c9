"""Prometheus metrics and `edge-gateway status`: the names the README documents, values that move."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import MetricsConfig, load_config
from gateway.demo.run import demo_config, write_config
from gateway.errors import EXIT_RUNTIME, ConfigError, GatewayError
from gateway.exporter import GatewayCollector
from gateway.metrics import INFERENCE_BUCKETS_S, InferenceStats
from gateway.outbox import DataMessage
from gateway.status_cli import metrics_section, metrics_url
from gateway.store import Store
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_gateway import running_gateway
from tests.fixtures_mqtt import make_event
from tests.fixtures_opcua import running_simulator

README = Path(__file__).resolve().parent.parent / "README.md"
Scraped = dict[str, Metric]
Completed = subprocess.CompletedProcess[str]


def documented() -> dict[str, tuple[str, set[str]]]:
    """The README's metrics table: name -> (type, label names)."""
    section = README.read_text(encoding="utf-8").split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (\w+) \|([^|]*)\|", section, flags=re.M)
    assert len(rows) > 20, "the README's metrics table was not found"
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def scrape(url: str) -> Scraped:
    """One scrape, by family name as the README spells it (a counter with its _total)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode("utf-8")
    families = text_string_to_metric_families(text)
    return {f.name + ("_total" if f.type == "counter" else ""): f for f in families}


def value(families: Scraped, name: str, **labels: str) -> float:
    """The one sample of `name` (its _total/_count sample for counters and histograms) with these labels."""
    family = families[name]
    wanted = {"counter": name, "histogram": f"{name}_count"}.get(family.type, name)
    [v] = [s.value for s in family.samples if s.name == wanted and labels.items() <= s.labels.items()]
    return v


def test_metrics_config_is_loopback_unless_allowed(tmp_path: Path) -> None:
    assert MetricsConfig().host == "127.0.0.1" and MetricsConfig().port == 9108
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        MetricsConfig(host=host)
    assert MetricsConfig(host="0.0.0.0", allow_remote=True).allow_remote
    path = tmp_path / "c.yaml"
    raw = demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "gw.db")
    for host in ("0.0.0.0", "192.168.1.20", "gateway.local", ""):
        raw["metrics"] = {"host": host}
        with pytest.raises(ConfigError) as info:
            load_config(write_config(raw, path))
        [problem] = info.value.problems
        assert "metrics" in problem and "allow_remote" in problem and repr(host) in problem
    raw["metrics"] = {"port": 70000}
    with pytest.raises(ConfigError):
        load_config(write_config(raw, path))


def test_status_url_comes_from_the_metrics_section(tmp_path: Path) -> None:
    assert metrics_url(MetricsConfig()) == "http://127.0.0.1:9108/metrics"
    assert metrics_url(MetricsConfig(host="::1", port=9200)) == "http://[::1]:9200/metrics"
    assert metrics_url(MetricsConfig(host="0.0.0.0", allow_remote=True)) == "http://127.0.0.1:9108/metrics"
    with pytest.raises(GatewayError, match="disabled"):
        metrics_url(MetricsConfig(enabled=False))
    with pytest.raises(GatewayError, match="--url"):
        metrics_url(MetricsConfig(port=0))
    path = tmp_path / "c.yaml"
    path.write_text("gateway: {id: gw1}\nmetrics:\n  host: 10.0.0.5\n")
    with pytest.raises(ConfigError) as info:
        metrics_section(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}:2 metrics: ") and "allow_remote" in problem


def test_status_of_a_gateway_not_running_exits_3_with_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    # The rest of the file may be mid-edit (here: no sources) while the daemon runs on its last valid one.
    config = write_config({"assets": [], "metrics": {"port": port}}, tmp_path / "c.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_RUNTIME, proc.stderr
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: cannot reach the gateway's metrics at http://127.0.0.1:{port}/metrics")


def test_inference_histogram_counts_each_call_in_the_bucket_of_its_upper_bound() -> None:
    stats = InferenceStats()
    for seconds in (INFERENCE_BUCKETS_S[0], INFERENCE_BUCKETS_S[0] * 1.01, 60.0):
        stats.observe("ae", seconds, windows=4)
    snap = stats.snapshot()
    stats.observe("ae", 0.0, windows=1)  # the snapshot is a copy
    ae = snap["ae"]
    assert (ae.windows, ae.calls) == (12, 3)
    assert ae.buckets[0] == 1 and ae.buckets[1] == 1 and ae.buckets[-1] == 1 and sum(ae.buckets) == 3
    assert ae.seconds_sum == pytest.approx(60.0 + INFERENCE_BUCKETS_S[0] * 2.01)


def test_store_tells_when_the_oldest_waiting_message_was_stored(tmp_path: Path) -> None:
    async def main() -> tuple[int | None, int | None, int | None, int | None, int, int]:
        store = Store(tmp_path / "gw.db")
        await store.start()
        try:
            empty = await store.oldest_waiting_ns()
            before = time.time_ns()
            await store.add_alarm_event(make_event(1), "edge/site/pump01/alarm", b"{}")
            store.add_messages([DataMessage("status-1", "status", "edge/site/gw01/status", b"{}")])
            await wait_for_condition(lambda: store.stats.outbox_messages == 1, what="the status stored")
            both = await store.oldest_waiting_ns()
            await store.mark_published([make_event(1).event_id])
            data_only = await store.oldest_waiting_ns()
            await store.mark_published(["status-1"])
            none_left = await store.oldest_waiting_ns()
            return empty, both, data_only, none_left, before, time.time_ns()
        finally:
            await store.stop()

    empty, both, data_only, none_left, before, after = asyncio.run(main())
    assert empty is None and none_left is None
    assert both is not None and data_only is not None
    assert before <= both <= data_only <= after  # the alarm event was stored first


def test_metrics_serve_the_documented_names_with_values_that_move(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    opc_port = free_port()
    raw = demo_config(opc_port=opc_port, mqtt_port=mosquitto.port, db_path=tmp_path / "gw.db", pumps=2)
    raw["metrics"] = {"port": 0}
    cfg = load_config(write_config(raw, tmp_path / "c.yaml"))
    docs = documented()

    async def scrape_until(url: str, pred: Callable[[Scraped], bool], what: str) -> Scraped:
        """Scrape (off the loop, which must answer the scrape) until `pred` holds."""
        found: list[Scraped] = []

        async def check() -> bool:
            found[:] = [await asyncio.to_thread(scrape, url)]
            return bool(pred(found[0]))

        deadline = asyncio.get_running_loop().time() + 60
        while not await check():
            assert asyncio.get_running_loop().time() < deadline, f"{what} not seen within 60 s"
            await asyncio.sleep(0.2)
        return found[0]

    async def scenario() -> tuple[Scraped, Scraped, Completed, Completed, list[Metric], str]:
        # pump02's pressure is Bad all along: its windows are skipped and the tag counted Bad.
        sim = dict(
            n_pumps=2, fault_pump=None, bad_tag=(2, "pressure"), bad_between_s=(0.0, 1e9), nan_tag=None
        )
        async with running_simulator(opc_port, **sim), running_gateway(cfg) as run:
            gateway = run.gateway
            await wait_for_condition(
                lambda: gateway.exporter is not None and gateway.exporter.url is not None or run.stopped(),
                60,
                "the metrics endpoint",
            )
            assert gateway.exporter is not None and gateway.exporter.url is not None, "the gateway stopped"
            url = gateway.exporter.url
            first = await scrape_until(
                url,
                lambda f: value(f, "edge_gateway_windows_inferred_total", model="pump_ae") > 0,
                "a window inferred",
            )
            second = await scrape_until(
                url,
                lambda f: all(
                    value(f, name, **labels) > value(first, name, **labels)
                    for name, labels in (
                        ("edge_gateway_source_values_total", {"source": "plc1"}),
                        ("edge_gateway_windows_inferred_total", {"model": "pump_ae"}),
                        ("edge_gateway_inference_seconds", {"model": "pump_ae"}),
                    )
                ),
                "counters moving",
            )
            table, as_json = [
                await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "gateway", "status", "--url", url, *extra],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                for extra in ([], ["--json"])
            ]
            # A scrape while the event loop is blocked: the collector must not wait for it forever.
            collector = GatewayCollector(gateway, asyncio.get_running_loop(), timeout_s=0.2)
            stuck: list[Metric] = []
            answered = threading.Event()

            def scrape_stuck() -> None:
                stuck.extend(collector.collect())
                answered.set()

            thread = threading.Thread(target=scrape_stuck)
            thread.start()
            answered.wait(30)  # blocks the loop on purpose
            thread.join()
        return first, second, table, as_json, stuck, url

    first, second, table, as_json, stuck, url = asyncio.run(scenario())

    # Every documented name is served with its type and labels, and nothing undocumented is.
    served = {n for n in second if n.startswith("edge_gateway_")}
    assert served == {n for n in docs if n.startswith("edge_gateway_")}
    for name, (kind, labels) in docs.items():
        family = second[name]
        assert family.type == kind, name
        assert family.samples, f"{name} has no sample"
        assert {k for s in family.samples for k in s.labels} - {"le"} == labels, name

    assert value(second, "edge_gateway_loop_responsive") == 1
    assert value(second, "edge_gateway_info", gateway_id="demo-gw") == 1
    assert value(second, "edge_gateway_source_connected", source="plc1") == 1
    assert value(second, "edge_gateway_mqtt_connected") == 1
    assert value(second, "edge_gateway_source_bad_tags", source="plc1", status="BadSensorFailure") == 1
    assert value(second, "edge_gateway_windows_skipped_total", asset="pump02", reason="bad_quality") > 0
    assert value(second, "edge_gateway_windows_skipped_total", asset="pump01", reason="bad_quality") == 0
    assert value(second, "edge_gateway_sqlite_bytes") > 0
    assert value(second, "process_resident_memory_bytes") > 0
    assert [s.labels["backend"] for s in second["edge_gateway_windows_inferred_total"].samples] == [
        "onnxruntime-cpu"
    ]

    assert table.returncode == 0, table.stderr
    out = table.stdout
    for heading in ("SOURCES", "MODELS", "ALARMS", "OUTBOX / MQTT", "PROCESS"):
        assert f"\n{heading}\n" in out, out
    assert "edge-gateway demo-gw" in out and url in out
    assert re.search(r"^  plc1 +yes +[\d,]+ +0 +0 +BadSensorFailure 1$", out, flags=re.M), out
    assert re.search(r"^  pump_ae +onnxruntime-cpu +[\d,]+ +[\d,]+ +[\d.]+ ms$", out, flags=re.M), out
    assert re.search(r"^  windows skipped +pump02 bad_quality [\d,]+$", out, flags=re.M), out
    assert re.search(r"^  mqtt +connected$", out, flags=re.M), out
    assert as_json.returncode == 0, as_json.stderr
    samples = json.loads(as_json.stdout)["metrics"]
    assert samples["edge_gateway_source_connected"] == [{"labels": {"source": "plc1"}, "value": 1.0}]

    # Stuck loop: the scrape still answers, says so, and serves no stale gateway figures.
    stuck_names = {m.name for m in stuck}
    assert stuck_names == {"edge_gateway_info", "edge_gateway_loop_responsive"}
    [responsive] = [m for m in stuck if m.name == "edge_gateway_loop_responsive"]
    assert responsive.samples[0].value == 0

    # Stopped with the gateway: nothing listens any more.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
