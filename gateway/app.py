"""The composition root: builds every stage from the config, owns every task, shuts down in order."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway import __version__
from gateway.alarms import (
    AlarmEngine,
    AlarmEvent,
    AlarmRule,
    build_rules,
    comm_loss_model,
    comm_loss_rules,
    comm_loss_targets,
)
from gateway.commands import CommandHandler, command_filter
from gateway.config import GatewayConfig
from gateway.degraded import decide_degraded, degraded_rules, inference_status
from gateway.errors import EXIT_OK, EXIT_RUNTIME, GatewayError, ModelError, PublishError
from gateway.exporter import MetricsExporter
from gateway.flood import FloodTracker, flood_rules
from gateway.inference.worker import InferenceWorker
from gateway.latest import LatestValues, is_good
from gateway.metrics import InferenceStats, LatencyReservoir
from gateway.models import LoadedModel, load_manifests, load_models
from gateway.outbox import DataMessage
from gateway.restore import Restored, restore_alarms
from gateway.retention import HistoryRecorder, RetentionPolicy
from gateway.sinks.mqtt import MqttPublisher, drain_once, drain_outbox
from gateway.sinks.payloads import (
    MessageIds,
    alarm_payload,
    alarm_topic,
    iso_utc,
    score_payload,
    score_topic,
    status_payload,
    status_stats,
)
from gateway.sources.opcua import OpcUaPollSource, OpcUaSource, SourceTag
from gateway.sources.subscription import OpcUaSubscriptionSource
from gateway.store import NewEvent, Store
from gateway.tasks import Supervisor, wait_for
from gateway.windows import AssetSampler, Window

if TYPE_CHECKING:
    from gateway.service import ConfigState

logger = logging.getLogger(__name__)

# Windows waiting for inference per model; beyond this the oldest are dropped (latest state matters).
WINDOW_QUEUE_SIZE = 4096
SCORE_QUEUE_SIZE = 4096
SCORE_INFLIGHT = 10
COMM_LOSS_CHECK_S = 1.0


@dataclass
class WindowQueue:
    """Due windows of one model, drained in one batch per inference call; overflow drops oldest."""

    windows: deque[Window] = field(default_factory=lambda: deque(maxlen=WINDOW_QUEUE_SIZE))
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: int = 0

    def put(self, window: Window) -> None:
        """Queue a window and wake the model's inference task."""
        if len(self.windows) == self.windows.maxlen:
            self.dropped += 1
        self.windows.append(window)
        self.ready.set()

    def take(self, n: int) -> list[Window]:
        """Up to n queued windows, oldest first."""
        batch = [self.windows.popleft() for _ in range(min(n, len(self.windows)))]
        if not self.windows:
            self.ready.clear()
        return batch


@dataclass
class Counters:
    """Pipeline counters reported in status and read by the benchmark."""

    ticks: int = 0
    missed_ticks: int = 0
    windows_inferred: int = 0
    inference_calls: int = 0
    inference_errors: int = 0
    alarm_events: int = 0
    scores_published: int = 0
    scores_dropped: int = 0


class Gateway:
    """One gateway: sources -> samplers -> inference -> alarms -> store/outbox -> MQTT."""

    def __init__(self, cfg: GatewayConfig, *, config_state: ConfigState | None = None) -> None:
        self.cfg = cfg
        # Which config file runs and how its reloads went (gateway.service); None when run directly.
        self.config_state = config_state
        # Set once start() returned: sources tried, models loaded, store open, pipeline running.
        self.started = asyncio.Event()
        # Set by the service before a reload stops this gateway: a successor takes over at once, so
        # SCADA must not see `offline`.
        self.reloading = False
        self.started_at = iso_utc(time.time_ns())
        self.counters = Counters()
        self.latency = LatencyReservoir()
        self.inference_stats = InferenceStats()
        self.exporter: MetricsExporter | None = None
        # One table row per channel: a scalar tag has one, an array tag one per element.
        self.latest = LatestValues(sum(len(a.channels) for a in cfg.assets))
        self.samplers: dict[str, AssetSampler] = {}
        # Per asset with a running tag: its table row, scale, offset and the running threshold.
        self._running: dict[str, tuple[int, float, float, float]] = {}
        source_tags: dict[str, list[SourceTag]] = {s.name: [] for s in cfg.sources}
        row = 0
        for position, asset in enumerate(cfg.assets):
            rows = np.arange(row, row + len(asset.channels))
            self.samplers[asset.name] = AssetSampler(asset, rows, self.latest, phase=position)
            for t in asset.tags:
                source_tags[asset.source].append(SourceTag(row, t.node_id, t.array_length))
                if asset.running is not None and t.name == asset.running.tag:
                    self._running[asset.name] = (row, t.scale, t.offset, asset.running.above)
                row += len(t.channels)
        self.sources: list[OpcUaSource] = [
            (OpcUaSubscriptionSource if s.mode == "subscribe" else OpcUaPollSource)(
                s, source_tags[s.name], self.latest
            )
            for s in cfg.sources
        ]
        self.store = Store(
            cfg.storage.path,
            outbox_quota_bytes=cfg.storage.outbox_quota_bytes,
            retention=RetentionPolicy.from_config(cfg.storage),
        )
        self.history = HistoryRecorder(cfg.assets, cfg.storage.history_hz)
        self.ids = MessageIds(cfg.gateway.id)
        self.publisher = MqttPublisher(
            cfg.mqtt, gateway_id=cfg.gateway.id, version=__version__, started_at=self.started_at, ids=self.ids
        )
        self.worker = InferenceWorker()
        self.models: dict[str, LoadedModel] = {}
        self.queues: dict[str, WindowQueue] = {}
        self.engine: AlarmEngine | None = None
        self.outbox_wake = asyncio.Event()
        # Each score with the monotonic time its window's newest sample arrived (for the latency).
        self.scores_out: asyncio.Queue[tuple[DataMessage, int]] = asyncio.Queue(SCORE_QUEUE_SIZE)
        self.supervisor = Supervisor()
        self._models_of_asset: dict[str, list[str]] = {a.name: [] for a in cfg.assets}
        self._source_tasks: list[asyncio.Task[None]] = []
        self._sampler_tasks: list[asyncio.Task[None]] = []
        self._inference_tasks: list[asyncio.Task[None]] = []
        self._score_task: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._outbox_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self.commands: CommandHandler | None = None
        self._command_task: asyncio.Task[None] | None = None
        self._last_inference_error = ""

    async def start(self) -> None:
        """Open the store, load models, connect MQTT, start acquisition and the pipeline tasks."""
        await self.store.start()
        manifests = await self.worker.call(load_manifests, self.cfg)
        self.models = await self.worker.call(load_models, self.cfg, manifests)
        rules = build_rules(self.cfg, manifests) + comm_loss_rules(self.cfg, version=__version__)
        rules += flood_rules(self.cfg, rules, version=__version__) + degraded_rules(self.models)
        restored = await self._restored_alarms(rules)
        self.engine = AlarmEngine(
            rules,
            gateway_id=self.cfg.gateway.id,
            states=restored.states,
            suppressed=restored.suppressed,
            flood=FloodTracker(self.cfg.flood),
            now_ns=time.time_ns(),
        )
        # Once per start: the backends do not change while the gateway runs.
        await self._emit(
            *decide_degraded(
                self.engine, self.models, enabled=self.cfg.inference.degraded_alarm, now_ns=time.time_ns()
            )
        )
        for name, model in self.models.items():
            self.queues[name] = WindowQueue()
            for asset in model.columns:
                self._models_of_asset[asset].append(name)
        commands = self.cfg.mqtt.commands
        if commands is not None:
            self.commands = CommandHandler(
                self.cfg.mqtt, commands, self.engine, self._emit, self.publisher, self.store
            )
            self.publisher.subscribe(command_filter(self.cfg.mqtt), self.commands.on_message)
        self.publisher.set_inference(inference_status(self.models))
        await self.publisher.start()
        sup = self.supervisor
        if self.commands is not None:
            self._command_task = sup.spawn(self.commands.run(), "commands")
        self._source_tasks = [sup.spawn(s.run(), f"source:{s.cfg.name}") for s in self.sources]
        # Give each PLC one connect timeout, so the first windows are not all warm-up skips; a PLC
        # that is down does not hold the gateway back (its tags are Bad until it comes back).
        await asyncio.gather(*(s.wait_connected(s.cfg.timeout_s) for s in self.sources))
        self._sampler_tasks = [
            sup.spawn(self._sample_loop(source, rate), f"sampler:{source.cfg.name}:{rate:g}Hz")
            for source in self.sources
            for rate in sorted({a.sample_rate_hz for a in self.cfg.assets if a.source == source.cfg.name})
        ]
        self._inference_tasks = [
            sup.spawn(self._infer_loop(m), f"inference:{n}") for n, m in self.models.items()
        ]
        self._watch_task = sup.spawn(self._watch(), "watch")
        interval = self.cfg.gateway.health_log_interval_s
        self._health_task = sup.spawn(self._log_health(interval), "health-log") if interval > 0 else None
        self._outbox_task = sup.spawn(drain_outbox(self.store, self.publisher, self.outbox_wake), "outbox")
        self._score_task = (
            sup.spawn(self._publish_scores(), "scores") if self.cfg.mqtt.publish_scores else None
        )
        every = self.cfg.mqtt.status_interval_s
        self._status_task = sup.spawn(self._publish_status(every), "status") if every > 0 else None
        logger.info(
            "gateway %s started: %d source(s), %d asset(s), %d tag(s), %d model(s)",
            self.cfg.gateway.id,
            len(self.sources),
            len(self.samplers),
            len(self.latest),
            len(self.models),
        )
        if self.cfg.metrics.enabled:
            self.exporter = MetricsExporter(self, self.cfg.metrics)
            await self.exporter.start()
        self.started.set()

    async def _restored_alarms(self, rules: list[AlarmRule]) -> Restored:
        """Alarms open at the last stop keep their state and id, assets the reasons they are suppressed."""
        restored = restore_alarms(await self.store.open_alarms(), rules, running=self._running.keys())
        if restored.states:
            logger.info("restored %d open alarm(s) from %s", len(restored.states), self.cfg.storage.path)
        return restored

    async def run(self, shutdown: asyncio.Event) -> int:
        """Start, run until `shutdown` is set or a stage fails, then stop; returns an exit code."""
        try:
            await self.start()
            stop = asyncio.ensure_future(shutdown.wait())
            failed = asyncio.ensure_future(self.supervisor.failed.wait())
            await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
            for f in (stop, failed):
                f.cancel()
            await asyncio.gather(stop, failed, return_exceptions=True)
        finally:
            await self.stop()
        return EXIT_OK if self.supervisor.failure is None else EXIT_RUNTIME

    async def stop(self) -> None:
        """Stop in pipeline order: sources, samplers, inference, outbox, MQTT, SQLite last."""
        deadline = time.monotonic() + self.cfg.gateway.shutdown_timeout_s

        def left(cap: float = float("inf")) -> float:
            return max(0.1, min(cap, deadline - time.monotonic()))

        if self.exporter is not None:
            await self.exporter.stop()
        sup = self.supervisor
        watch = [
            t for t in (self._command_task, self._watch_task, self._health_task, self._status_task) if t is not None
        ]
        for task in (*watch, *self._source_tasks, *self._sampler_tasks, *self._inference_tasks):
            await sup.cancel(task, left())
        if self._outbox_task is not None:
            await sup.cancel(self._outbox_task, left())
        if self.publisher.connected:
            # One last bounded attempt to hand stored alarm events to the broker; what is left stays
            # in the outbox and goes out after the next start.
            try:
                await wait_for(drain_once(self.store, self.publisher), left(1.0))
            except (asyncio.TimeoutError, GatewayError) as exc:
                logger.warning(
                    "outbox not fully delivered before stopping (%s); sent after the next start",
                    str(exc) or "timed out",
                )
        await sup.close(left(1.0))
        await self.publisher.stop(timeout=left(2.0), publish_offline=not self.reloading)
        await self.store.stop(timeout=left())
        self.worker.close()
        logger.info("gateway %s stopped", self.cfg.gateway.id)

    async def _sample_loop(self, source: OpcUaSource, rate_hz: float) -> None:
        """Sample this source's assets once per period, as soon as a read of the source lands.

        Time is cut into slots of one period centred on a fixed monotonic grid; each slot takes exactly
        one sample: at the first read that completes in it (so a window's newest value is fresh and
        the acquisition-to-publish latency stays low), or at the slot's end if no read came (PLC slow
        or down: the values are then held or Bad, and the quality policy decides).
        """
        names = {
            a.name for a in self.cfg.assets if a.source == source.cfg.name and a.sample_rate_hz == rate_hz
        }
        samplers = [s for n, s in self.samplers.items() if n in names]
        period = int(1e9 / rate_hz)
        await source.updated.wait(source.cfg.timeout_s)
        tick = time.monotonic_ns()  # the grid is aligned to the first read
        while True:
            now = time.monotonic_ns()
            self.counters.ticks += 1
            for sampler in samplers:
                window = sampler.sample(now)
                if window is not None:
                    for model in self._models_of_asset[window.asset]:
                        self.queues[model].put(window)
            if history := self.history.rows(samplers):
                self.store.add_samples(history)
            tick += period
            while time.monotonic_ns() >= tick + period // 2:  # held up for whole slots: skip, count
                tick += period
                self.counters.missed_ticks += 1
            while (now := time.monotonic_ns()) < tick + period // 2:
                if (
                    await source.updated.wait((tick + period // 2 - now) / 1e9)
                    and time.monotonic_ns() >= tick - period // 2
                ):
                    break

    async def _infer_loop(self, model: LoadedModel) -> None:
        """Batch every queued window of one model into one backend call; decide and store results."""
        queue = self.queues[model.cfg.name]
        assert self.engine is not None
        while True:
            await queue.ready.wait()
            windows = queue.take(model.cfg.max_batch)
            if not windows:
                continue
            batch = np.stack([w.data[:, model.columns[w.asset]] for w in windows])
            began = time.perf_counter()
            try:
                outputs = await self.worker.run_model(model.cfg.name, model.backend, model.normalizer.apply(batch))
                values = model.manifest.values(outputs)
            except ModelError as exc:
                # The backend stays usable; these windows are lost, counted, and said once per reason.
                self.counters.inference_errors += 1
                if str(exc) != self._last_inference_error:
                    logger.error("model %s: inference failed: %s", model.cfg.name, exc)
                self._last_inference_error = str(exc)
                continue
            self.counters.inference_calls += 1
            self.counters.windows_inferred += len(windows)
            self.inference_stats.observe(model.cfg.name, time.perf_counter() - began, len(windows))
            await self._decide(model, windows, values)

    async def _decide(self, model: LoadedModel, windows: list[Window], values: np.ndarray) -> None:
        assert self.engine is not None
        now_ns = time.time_ns()
        names = model.manifest.value_names()
        version = model.manifest.version
        if self.cfg.storage.store_scores:
            self.store.add_scores(
                [
                    (now_ns, w.asset, model.cfg.name, version, name, float(v))
                    for w, row in zip(windows, values, strict=True)
                    for name, v in zip(names, row, strict=True)
                ]
            )
        events: list[AlarmEvent] = []
        for w, row in zip(windows, values, strict=True):
            events += self.engine.decide(
                model.cfg.name, w.asset, row, source_ts_ns=w.end_source_ts_ns, now_ns=now_ns
            )
            if self._score_task is not None:
                self._queue_score(model, w, names, row, now_ns)
        # Every transition of one inference call in one commit: a FULL sync per event would cap the rate.
        await self._emit(*events)

    async def _emit(self, *events: AlarmEvent) -> None:
        """Store alarm transitions durably, in order and in one commit, then wake the outbox."""
        if not events:
            return
        mqtt, gateway_id = self.cfg.mqtt, self.cfg.gateway.id
        # Durable before published: the outbox task sends them only once they are committed.
        items = [
            NewEvent(e, alarm_topic(mqtt, gateway_id=gateway_id, event=e), alarm_payload(e, site=mqtt.site))
            for e in events
        ]
        await self.store.add_alarm_events(items)
        self.counters.alarm_events += len(events)
        self.outbox_wake.set()
        for event in events:
            # A raise is what a person reading the journal must see; the rest of the lifecycle is INFO.
            logger.log(
                logging.WARNING if event.event == "raised" else logging.INFO,
                "alarm %s %s -> %s: asset=%s rule=%s value=%.4g threshold=%.4g cause=%s",
                event.alarm_id,
                event.event,
                event.state,
                event.asset,
                event.rule,
                event.value,
                event.threshold,
                event.cause,
            )

    async def _watch(self) -> None:
        """Once a second: each source's time without a session to its comm_loss rule, shelves that
        ran out, alarm floods that calmed down, and the suppression of assets whose running tag says
        they are stopped."""
        assert self.engine is not None
        targets = comm_loss_targets(self.cfg)
        down_since: dict[str, int] = {}
        while True:
            for event in self.engine.expire_shelves(time.time_ns()):
                await self._emit(event)
            # A flood's end (its alarm cleared, the suppressions lifted) is stored in one commit.
            await self._emit(*self.engine.end_floods(time.time_ns()))
            for asset, stopped in self._stopped_assets():
                events = self.engine.set_suppressed(asset, stopped, reason="stopped", now_ns=time.time_ns())
                await self._emit(*events)
            now = time.monotonic_ns()
            for source in self.sources:
                name = source.cfg.name
                if source.stats.connected:
                    down_since.pop(name, None)
                    down_s = 0.0
                else:
                    down_s = (now - down_since.setdefault(name, now)) / 1e9
                value = np.array([down_s])
                for target in targets.get(name, []):
                    for event in self.engine.decide(
                        comm_loss_model(name), target, value, source_ts_ns=0, now_ns=time.time_ns()
                    ):
                        await self._emit(event)
            await asyncio.sleep(COMM_LOSS_CHECK_S)

    def _stopped_assets(self) -> list[tuple[str, bool]]:
        """(asset, stopped) for each asset with a running tag whose value is Good now; others are left as they are."""
        out = []
        for asset, (row, scale, offset, above) in self._running.items():
            value = self.latest.value[row] * scale + offset
            if is_good(self.latest.status[row : row + 1])[0] and math.isfinite(value):
                out.append((asset, not value > above))
        return out

    async def _log_health(self, interval_s: float) -> None:
        """One INFO line per source and one for the pipeline every `interval_s`: health in the journal."""
        while True:
            await asyncio.sleep(interval_s)
            for source in self.sources:
                logger.info("health %s", source.health_line())
            c, st = self.counters, self.store.stats
            logger.info(
                "health pipeline: %d windows inferred, %d inference error(s), %d alarm(s) active, mqtt %s, "
                "outbox %d alarm event(s) + %d other(s) waiting (%.0f%% of quota), %d score(s) dropped",
                c.windows_inferred,
                c.inference_errors,
                len(self.engine.active()) if self.engine else 0,
                "connected" if self.publisher.connected else "disconnected",
                st.outbox_alarm_events,
                st.outbox_messages,
                100.0 * st.outbox_bytes / st.outbox_quota_bytes,
                c.scores_dropped + st.outbox_dropped_scores + st.outbox_expired,
            )

    def _queue_score(
        self, model: LoadedModel, w: Window, names: list[str], row: np.ndarray, now_ns: int
    ) -> None:
        mqtt = self.cfg.mqtt
        message_id = self.ids.next()
        payload = score_payload(
            message_id=message_id,
            asset=w.asset,
            model=model.cfg.name,
            model_version=model.manifest.version,
            values={n: float(v) for n, v in zip(names, row, strict=True)},
            source_ts_ns=w.end_source_ts_ns,
            decided_at_ns=now_ns,
        )
        topic = score_topic(mqtt, gateway_id=self.cfg.gateway.id, asset=w.asset, model=model.cfg.name)
        expires = now_ns + mqtt.score_expiry_s * 10**9 if mqtt.score_expiry_s else 0
        if self.scores_out.full():  # DROP_OLDEST: the newest scores matter most
            self.scores_out.get_nowait()
            self.counters.scores_dropped += 1
        self.scores_out.put_nowait(
            (DataMessage(message_id, "score", topic, payload, qos=mqtt.qos, expires_at_ns=expires), w.end_recv_ns)
        )

    async def _publish_scores(self) -> None:
        """Publish per-window scores live; those that cannot go out now wait in the outbox (low priority).

        Each live latency is acquisition of the window's newest sample to its PUBACK. While scores wait
        in the outbox, new ones queue behind them there, so a consumer gets them in order.
        """
        # Scores hold at most SCORE_INFLIGHT of the publisher's in-flight slots: alarms always find one.
        slots = asyncio.Semaphore(SCORE_INFLIGHT)
        mqtt = self.cfg.mqtt

        async def publish_one(score: DataMessage, recv_ns: int) -> None:
            async with slots:
                if self.publisher.connected and not self.store.data_waiting:
                    try:
                        await self.publisher.publish(
                            score.topic, score.payload, qos=score.qos, expiry_s=mqtt.score_expiry_s
                        )
                    except PublishError:
                        pass  # to the outbox; if paho still delivers this copy, the message_id repeats
                    else:
                        self.counters.scores_published += 1
                        self.latency.add((time.monotonic_ns() - recv_ns) / 1e9)
                        return
            self.store.add_messages([score])
            self.outbox_wake.set()

        while True:
            items = [await self.scores_out.get()]
            while not self.scores_out.empty() and len(items) < 256:
                items.append(self.scores_out.get_nowait())
            await asyncio.gather(*(publish_one(*item) for item in items))

    async def _publish_status(self, interval_s: float) -> None:
        """Every `interval_s`, a retained status with the outbox's depth and drops, through the outbox."""
        topic = self.publisher.status_topic
        while True:
            await asyncio.sleep(interval_s)
            stats = status_stats(
                at_ns=time.time_ns(),
                active_alarms=len(self.engine.active()) if self.engine else 0,
                store=self.store.stats,
                scores_published=self.counters.scores_published,
                scores_dropped=self.counters.scores_dropped,
            )
            message_id = self.ids.next()
            payload = status_payload(
                "online", message_id=message_id, gateway_id=self.cfg.gateway.id, version=__version__,
                started_at=self.started_at, inference=inference_status(self.models), stats=stats,
            )  # fmt: skip
            self.store.add_messages([DataMessage(message_id, "status", topic, payload, qos=1, retain=True)])
            self.outbox_wake.set()

    def status(self) -> dict[str, Any]:
        """A snapshot of every stage's counters, for logs, health and the benchmark."""
        return {
            "gateway_id": self.cfg.gateway.id,
            "version": __version__,
            "started_at": self.started_at,
            "counters": vars(self.counters).copy(),
            "sources": {s.cfg.name: s.status() for s in self.sources},
            "assets": {
                name: {"samples": s.samples, "windows": s.windows_emitted, "skips": dict(s.skips)}
                for name, s in self.samplers.items()
            },
            "window_queue_dropped": {n: q.dropped for n, q in self.queues.items()},
            "active_alarms": len(self.engine.active()) if self.engine else 0,
            "flood": self.engine.flood.status() if self.engine and self.engine.flood else None,
            "store": vars(self.store.stats).copy(),
            "mqtt": vars(self.publisher.stats).copy(),
            "config": vars(self.config_state).copy() if self.config_state is not None else None,
            "commands": (
                {"executed": self.commands.executed, "refused": self.commands.refused, "dropped": self.commands.dropped}
                if self.commands is not None
                else None
            ),
        }
