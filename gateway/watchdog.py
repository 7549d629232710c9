"""What systemd sees of the daemon: READY=1 once a gateway runs, STATUS= lines a person can read, and
WATCHDOG=1 pings only while the pipeline makes progress, so a stuck loop or model gets it restarted.

"Progress" since the previous check means: the sampler tick counter advanced (it advances every
sample period even while a PLC is down: a dead PLC is not a stalled gateway), no inference call has
been running longer than the stall limit, and the event loop runs (the checks themselves run on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.sdnotify import Notifier

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.config import GatewayConfig

logger = logging.getLogger(__name__)

# STATUS= is refreshed (and progress checked) this often, or at half the watchdog interval if shorter.
STATUS_REFRESH_S = 5.0
# Without a watchdog (run by hand): how long one inference call may run before STATUS= calls it stalled.
DEFAULT_STALL_S = 15.0
# A reload (validate, stop, reconnect, load models) may take this long while the pings go on regardless.
RELOAD_LIMIT_S = 180.0


@dataclass(frozen=True)
class Progress:
    """One reading of the pipeline's progress signals."""

    ticks: int
    # How long the inference call now running has run; None while the inference thread is idle.
    inference_busy_s: float | None


@dataclass(frozen=True)
class Stall:
    """Why the pipeline is not progressing: which stage, for how long."""

    stage: str  # "inference", "sampler" or "reload"
    seconds: float

    def __str__(self) -> str:
        if self.stage == "inference":
            return f"one inference call running for {self.seconds:.0f} s"
        if self.stage == "sampler":
            return f"no sampler tick for {self.seconds:.0f} s"
        return f"reload not finished after {self.seconds:.0f} s"


def progress_of(gateway: Gateway, now: float) -> Progress:
    """The gateway's progress signals at monotonic time `now`."""
    busy_since = gateway.worker.busy_since
    return Progress(gateway.counters.ticks, None if busy_since is None else now - busy_since)


class ProgressJudge:
    """Decides from successive Progress readings whether the pipeline is stalled; no I/O, no clock of its own."""

    def __init__(self, *, tick_limit_s: float, inference_limit_s: float, ticks: int, now: float) -> None:
        self.tick_limit_s = tick_limit_s
        self.inference_limit_s = inference_limit_s
        self._ticks = ticks
        self._ticked_at = now

    @classmethod
    def for_config(cls, cfg: GatewayConfig, stall_s: float, *, ticks: int, now: float) -> ProgressJudge:
        """Limits for this config: a sampler's first tick may wait one source timeout for the first read."""
        first_tick_s = max(s.timeout_s for s in cfg.sources) + 2.0 / max(a.sample_rate_hz for a in cfg.assets)
        return cls(tick_limit_s=max(stall_s, first_tick_s), inference_limit_s=stall_s, ticks=ticks, now=now)

    def check(self, progress: Progress, now: float) -> Stall | None:
        """None while the pipeline progresses, else the stalled stage."""
        if progress.ticks != self._ticks:
            self._ticks, self._ticked_at = progress.ticks, now
        busy = progress.inference_busy_s
        if busy is not None and busy > self.inference_limit_s:
            return Stall("inference", busy)
        idle = now - self._ticked_at
        if idle > self.tick_limit_s:
            return Stall("sampler", idle)
        return None


def starting_line(cfg: GatewayConfig) -> str:
    """STATUS= while the first gateway starts."""
    return f"starting: connecting to {len(cfg.sources)} PLC(s), loading {len(cfg.models)} model(s)"


def status_line(gateway: Gateway, windows_per_s: float | None) -> str:
    """STATUS= while running, e.g. `running: 3 of 3 PLC(s) connected, 12.0 windows/s, 2 alarm(s) active, ...`."""
    status = gateway.status()
    sources = status["sources"].values()
    parts = [f"{sum(1 for s in sources if s['connected'])} of {len(sources)} PLC(s) connected"]
    if windows_per_s is not None:
        parts.append(f"{windows_per_s:.1f} windows/s")
    store = status["store"]
    parts += [
        f"{status['active_alarms']} alarm(s) active",
        f"mqtt {'connected' if gateway.publisher.connected else 'disconnected'}",
        f"outbox {store['outbox_alarm_events'] + store['outbox_messages']} waiting",
    ]
    config = status.get("config")
    if config and config["last_error"]:
        parts.append("last reload refused (see the journal)")
    return "running: " + ", ".join(parts)


class ServiceNotifier:
    """Tells systemd how the daemon is doing, through `notifier` (a no-op outside systemd).

    Lifecycle: wrap the service's run in `running()` (STATUS=starting..., then a check every period);
    pass `started` as gateway.service.Service's on_started hook (READY=1 for each gateway that
    started, the first and each one a reload brings); call `reloading()` on SIGHUP and `stopping()`
    on the first SIGTERM/SIGINT. Nothing here raises into the caller for a send that failed.
    """

    def __init__(
        self, notifier: Notifier, cfg: GatewayConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.notifier = notifier
        self._cfg = cfg
        self._clock = clock
        interval = notifier.watchdog_interval()
        self.period_s = STATUS_REFRESH_S if interval is None else min(STATUS_REFRESH_S, interval / 2)
        # Half the watchdog interval: a stall is seen within one more period and systemd still has
        # the other half before it kills, so a stuck gateway restarts about 1.5 intervals after it stuck.
        self.stall_s = DEFAULT_STALL_S if interval is None else interval / 2
        self._gateway: Gateway | None = None
        self._judge: ProgressJudge | None = None
        self._stall: Stall | None = None
        self._windows = (0, 0.0)  # windows inferred and when, at the last status line
        self._reload_since: float | None = None
        self._reload_failures = 0
        self._stopping = False

    def started(self, gateway: Gateway) -> None:
        """`gateway` finished start() (sources tried, models loaded, store open): READY=1, watch it from now on."""
        now = self._clock()
        self._gateway = gateway
        self._judge = ProgressJudge.for_config(
            gateway.cfg, self.stall_s, ticks=gateway.counters.ticks, now=now
        )
        self._stall = None
        self._reload_since = None
        self._windows = (gateway.counters.windows_inferred, now)
        self.notifier.ready(status_line(gateway, None))

    def reloading(self) -> None:
        """A reload was requested: RELOADING=1; pings go on until a gateway started or the reload was refused."""
        state = self._gateway.config_state if self._gateway is not None else None
        self._reload_failures = state.reload_failures if state is not None else 0
        self._reload_since = self._clock()
        self.notifier.reloading()
        self.notifier.status("reloading: validating the config file")

    def stopping(self) -> None:
        """A graceful stop began: STOPPING=1, and no more pings or status lines."""
        self._stopping = True
        self.notifier.stopping()

    def check(self) -> None:
        """One round: ping and refresh STATUS= while the pipeline progresses, say why not when it does not."""
        gateway, judge = self._gateway, self._judge
        if self._stopping or gateway is None or judge is None:
            return
        now = self._clock()
        if self._reload_since is not None:
            state = gateway.config_state
            if state is None or state.reload_failures <= self._reload_failures:
                self._reload_check(now - self._reload_since)
                return
            # Refused: the running gateway goes on, and systemd must hear that the reload is over.
            self._reload_since = None
            judge = ProgressJudge.for_config(gateway.cfg, self.stall_s, ticks=gateway.counters.ticks, now=now)
            self._judge = judge
            self.notifier.ready(status_line(gateway, None))
        self._report(judge.check(progress_of(gateway, now), now), gateway, now)

    def _reload_check(self, elapsed: float) -> None:
        """While a reload runs the old gateway stops and a new one starts: no progress to judge, only time."""
        if elapsed <= RELOAD_LIMIT_S:
            self.notifier.watchdog()
            return
        self._report(Stall("reload", elapsed), None, 0.0)

    def _report(self, stall: Stall | None, gateway: Gateway | None, now: float) -> None:
        """Ping and a running STATUS= when `stall` is None; else a stalled STATUS= and no ping."""
        if stall is not None:
            if self._stall is None or self._stall.stage != stall.stage:
                logger.warning(
                    "pipeline stalled: %s; watchdog pings stopped (systemd restarts the gateway if it stays stuck)",
                    stall,
                )
            self._stall = stall
            self.notifier.status(f"stalled: {stall}; watchdog pings stopped")
            return
        if self._stall is not None:
            logger.info("pipeline progressing again after %s; watchdog pings resumed", self._stall)
            self._stall = None
        self.notifier.watchdog()
        if gateway is not None and self.notifier.enabled:  # status() is not free: only when someone listens
            windows, since = self._windows
            self._windows = (gateway.counters.windows_inferred, now)
            rate = (self._windows[0] - windows) / (now - since) if now > since else None
            self.notifier.status(status_line(gateway, rate))

    async def run(self) -> None:
        """STATUS=starting..., then one check() per period until cancelled."""
        self.notifier.status(starting_line(self._cfg))
        while True:
            await asyncio.sleep(self.period_s)
            self.check()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """run() in a task for the duration of the block, cancelled and awaited on exit."""
        task = asyncio.ensure_future(self.run())
        # A bug here would stop the pings and get the daemon restarted: let the journal say why.
        task.add_done_callback(_log_failure)
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("systemd notifier failed; watchdog pings stopped", exc_info=task.exception())
