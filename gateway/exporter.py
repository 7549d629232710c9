"""Prometheus metrics on a loopback HTTP endpoint, read from the gateway's own counters at scrape time.

prometheus_client's HTTP server answers on its own threads. The gateway's counters belong to the
event loop, so each scrape asks the loop for a snapshot (`asyncio.run_coroutine_threadsafe`) and
waits at most SNAPSHOT_TIMEOUT_S for it, rather than a task copying them every second: the numbers
are as of the scrape, nothing runs between scrapes, and a stuck loop shows as
`edge_gateway_loop_responsive 0` instead of as figures that look fine but no longer move.
Process CPU and memory come from prometheus_client's ProcessCollector (Linux /proc).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.alarms import LifecycleState
from gateway.config import MetricsConfig
from gateway.errors import GatewayError
from gateway.metrics import INFERENCE_BUCKETS_S, ModelInference
from gateway.retention import file_bytes
from gateway.tasks import wait_for

if TYPE_CHECKING:
    from gateway.app import Gateway

logger = logging.getLogger(__name__)

# How long a scrape waits for the event loop's snapshot, and the snapshot for the store's answer.
SNAPSHOT_TIMEOUT_S = 2.0
OUTBOX_AGE_TIMEOUT_S = 1.0
# Every lifecycle state an open alarm can be in; a state with no alarm is served as 0, not left out.
ALARM_STATES = tuple(s for s in typing.get_args(LifecycleState) if s != "normal")


@dataclass(frozen=True)
class Snapshot:
    """The gateway's figures at one instant, copied on the event loop for the scraping thread."""

    status: dict[str, Any]
    alarm_states: dict[str, int]
    inference: dict[str, ModelInference]
    backends: dict[str, str]
    mqtt_connected: bool
    # Seconds the oldest message has waited in the outbox (0: none waits); None when the store did not say.
    outbox_oldest_age_s: float | None


async def take_snapshot(gateway: Gateway) -> Snapshot:
    """Copy every figure the metrics serve; runs on the event loop."""
    age: float | None = None  # the writer is busy or failing: leave the age out rather than guess
    try:
        oldest = await wait_for(gateway.store.oldest_waiting_ns(), OUTBOX_AGE_TIMEOUT_S)
        age = 0.0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)
    except (asyncio.TimeoutError, GatewayError):
        pass
    states: dict[str, int] = dict.fromkeys(ALARM_STATES, 0)
    if gateway.engine is not None:
        for state in gateway.engine.states.values():
            if state.state in states:
                states[state.state] += 1
    return Snapshot(
        status=gateway.status(),
        alarm_states=states,
        inference=gateway.inference_stats.snapshot(),
        backends={name: m.backend.name for name, m in gateway.models.items()},
        mqtt_connected=gateway.publisher.connected,
        outbox_oldest_age_s=age,
    )


Samples = Iterable[tuple[list[str], float]]


def _counter(name: str, doc: str, labels: list[str], samples: Samples) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _gauge(name: str, doc: str, labels: list[str], samples: Samples) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _source_families(status: dict[str, Any]) -> Iterator[Metric]:
    sources = sorted(status["sources"].items())
    yield _gauge(
        "edge_gateway_source_connected",
        "1 while the source has a session delivering values.",
        ["source"],
        (([name], float(s["connected"])) for name, s in sources),
    )
    yield _counter(
        "edge_gateway_source_values_total",
        "Channel values acquired (stored in the latest-value table), Good or not.",
        ["source"],
        (([name], s["values"]) for name, s in sources),
    )
    yield _gauge(
        "edge_gateway_source_bad_tags",
        "Tags of the source now carrying a Bad status, by status code name.",
        ["source", "status"],
        (([name, code], n) for name, s in sources for code, n in sorted(s["bad_by_status"].items())),
    )
    yield _counter(
        "edge_gateway_source_reconnects_total",
        "Sessions opened again after the first.",
        ["source"],
        (([name], s["reconnects"]) for name, s in sources),
    )
    yield _counter(
        "edge_gateway_source_connect_errors_total",
        "Connection attempts that failed.",
        ["source"],
        (([name], s["connect_errors"]) for name, s in sources),
    )


def _inference_families(snap: Snapshot) -> Iterator[Metric]:
    models = sorted(snap.backends)
    stats = {m: snap.inference.get(m, ModelInference()) for m in models}
    yield _counter(
        "edge_gateway_windows_inferred_total",
        "Windows scored by each model, by backend.",
        ["model", "backend"],
        (([m, snap.backends[m]], stats[m].windows) for m in models),
    )
    histogram = HistogramMetricFamily(
        "edge_gateway_inference_seconds",
        "Inference call latency per model: normalizing, waiting for the inference thread, running one batch.",
        labels=["model"],
    )
    bounds = [*map(str, INFERENCE_BUCKETS_S), "+Inf"]
    for m in models:
        cumulative = list(itertools.accumulate(stats[m].buckets))
        histogram.add_metric([m], list(zip(bounds, cumulative, strict=True)), stats[m].seconds_sum)
    yield histogram
    status = snap.status
    yield _counter(
        "edge_gateway_inference_errors_total",
        "Inference calls that failed (their windows are lost).",
        [],
        [([], status["counters"]["inference_errors"])],
    )
    yield _counter(
        "edge_gateway_windows_skipped_total",
        "Windows not inferred because of their data, by asset and reason.",
        ["asset", "reason"],
        (
            ([a, r], n)
            for a, info in sorted(status["assets"].items())
            for r, n in sorted(info["skips"].items())
        ),
    )
    yield _counter(
        "edge_gateway_windows_dropped_total",
        "Windows dropped (oldest first) because a model's inference queue was full.",
        ["model"],
        (([m], n) for m, n in sorted(status["window_queue_dropped"].items())),
    )


def _delivery_families(snap: Snapshot, db_path: Path) -> Iterator[Metric]:
    counters, store, mqtt = snap.status["counters"], snap.status["store"], snap.status["mqtt"]
    yield _gauge(
        "edge_gateway_alarms",
        "Alarms now in each lifecycle state.",
        ["state"],
        (([s], n) for s, n in snap.alarm_states.items()),
    )
    yield _counter(
        "edge_gateway_alarm_events_total",
        "Alarm transitions stored (raised, cleared, acknowledged, ...).",
        [],
        [([], counters["alarm_events"])],
    )
    yield _gauge(
        "edge_gateway_outbox_messages",
        "Messages stored and waiting for the broker, by kind.",
        ["kind"],
        [(["alarm_event"], store["outbox_alarm_events"]), (["data"], store["outbox_messages"])],
    )
    if snap.outbox_oldest_age_s is not None:
        yield _gauge(
            "edge_gateway_outbox_oldest_age_seconds",
            "Age of the oldest message waiting in the outbox; 0 when none waits.",
            [],
            [([], snap.outbox_oldest_age_s)],
        )
    yield _gauge(
        "edge_gateway_outbox_bytes",
        "Bytes the outbox counts against its quota.",
        [],
        [([], store["outbox_bytes"])],
    )
    yield _gauge(
        "edge_gateway_outbox_quota_bytes",
        "The outbox quota (storage.outbox_quota_mb).",
        [],
        [([], store["outbox_quota_bytes"])],
    )
    yield _counter(
        "edge_gateway_outbox_dropped_total",
        "Messages dropped from the outbox undelivered (quota, full queue), by kind.",
        ["kind"],
        [
            (["score"], store["outbox_dropped_scores"]),
            (["status"], store["outbox_dropped_status"]),
            (["alarm_event"], store["outbox_dropped_alarm_events"]),
        ],
    )
    yield _counter(
        "edge_gateway_outbox_expired_total",
        "Data messages whose expiry passed before delivery.",
        [],
        [([], store["outbox_expired"])],
    )
    yield _counter(
        "edge_gateway_scores_dropped_total",
        "Scores dropped because a queue was full: the live publish queue, or the SQLite write queue.",
        ["stage"],
        [(["publish_queue"], counters["scores_dropped"]), (["store_queue"], store["scores_dropped"])],
    )
    yield _gauge(
        "edge_gateway_mqtt_connected",
        "1 while connected to the MQTT broker.",
        [],
        [([], float(snap.mqtt_connected))],
    )
    yield _counter(
        "edge_gateway_mqtt_published_total",
        "Messages the broker acknowledged.",
        [],
        [([], mqtt["published"])],
    )
    yield _counter(
        "edge_gateway_mqtt_publish_failures_total",
        "Publishes the broker refused or did not acknowledge in time.",
        [],
        [([], mqtt["failed"])],
    )
    # Read here, on the scraping thread: the event loop does no file system calls for metrics.
    yield _gauge(
        "edge_gateway_sqlite_bytes",
        "Size of the SQLite file and its write-ahead log.",
        [],
        [([], file_bytes(db_path))],
    )


def _service_families(status: dict[str, Any]) -> Iterator[Metric]:
    config = status["config"] or {"reloads": 0, "reload_failures": 0, "last_error": None}
    yield _counter(
        "edge_gateway_config_reloads_total", "Config reloads applied (SIGHUP with a valid file).", [],
        [([], config["reloads"])],
    )  # fmt: skip
    yield _counter(
        "edge_gateway_config_reload_failures_total",
        "Reloads refused because the file was invalid (the running config stayed).", [],
        [([], config["reload_failures"])],
    )  # fmt: skip
    yield _gauge(
        "edge_gateway_config_last_reload_ok", "0 while the last reload was refused, else 1.", [],
        [([], float(config["last_error"] is None))],
    )  # fmt: skip
    store = status["store"]
    yield _counter(
        "edge_gateway_retention_deleted_total", "Rows deleted by retention (age or size), by table.", ["table"],
        (([t], store[f"retention_deleted_{t}"]) for t in ("scores", "samples", "alarm_events")),
    )  # fmt: skip
    yield _counter(
        "edge_gateway_samples_written_total", "Tag history rows written (storage.history_hz).", [],
        [([], store["samples_written"])],
    )  # fmt: skip


class GatewayCollector(Collector):
    """Serves the gateway's figures from a snapshot taken on its event loop at each scrape."""

    def __init__(
        self, gateway: Gateway, loop: asyncio.AbstractEventLoop, *, timeout_s: float = SNAPSHOT_TIMEOUT_S
    ) -> None:
        self._gateway = gateway
        self._loop = loop
        self._timeout_s = timeout_s
        self._late = False

    def collect(self) -> Iterable[Metric]:
        """Called by prometheus_client on its HTTP thread for every scrape."""
        snap = self._snapshot()
        cfg = self._gateway.cfg
        yield _gauge(
            "edge_gateway_info",
            "The gateway's id and version (always 1).",
            ["gateway_id", "version"],
            [([cfg.gateway.id, __version__], 1)],
        )
        yield _gauge(
            "edge_gateway_loop_responsive",
            "1 when the event loop answered this scrape in time; 0 when it is stuck.",
            [],
            [([], float(snap is not None))],
        )
        if snap is None:
            return
        yield from _source_families(snap.status)
        yield from _inference_families(snap)
        yield from _delivery_families(snap, cfg.storage.path)
        yield from _service_families(snap.status)

    def _snapshot(self) -> Snapshot | None:
        coro = take_snapshot(self._gateway)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # the loop is closed: the gateway is gone
            coro.close()
            return None
        try:
            snap = future.result(self._timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            if not self._late:
                logger.warning("metrics: the event loop did not answer within %.1f s", self._timeout_s)
            self._late = True
            return None
        self._late = False
        return snap


class MetricsExporter:
    """The Prometheus endpoint: `start()` on the event loop serves it, `stop()` closes it."""

    def __init__(self, gateway: Gateway, cfg: MetricsConfig) -> None:
        self.cfg = cfg
        self._gateway = gateway
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str | None:
        """Where the metrics are served (the port actually bound), or None when not serving."""
        if self._server is None:
            return None
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self._server.server_port}/metrics"

    async def start(self) -> None:
        """Listen on host:port; a port that cannot be bound is logged and the gateway runs on without metrics."""
        # Without auto_describe, registering does not scrape: a scrape from the loop thread would wait on itself.
        registry = CollectorRegistry(auto_describe=False)
        registry.register(GatewayCollector(self._gateway, asyncio.get_running_loop()))
        ProcessCollector(registry=registry)
        try:
            self._server, self._thread = start_http_server(
                self.cfg.port, addr=self.cfg.host, registry=registry
            )
        except OSError as exc:
            # Alarms matter more than metrics: a taken port must not keep the gateway from running.
            logger.error(
                "metrics: cannot listen on %s port %d (%s); running without metrics",
                self.cfg.host,
                self.cfg.port,
                exc.strerror or exc,
            )
            return
        logger.info("metrics served at %s", self.url)

    async def stop(self) -> None:
        """Stop serving and close the socket; a scrape in progress is answered or dropped."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        # shutdown() waits for serve_forever's next poll (up to 0.5 s): off the loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        await asyncio.to_thread(thread.join)
