"""The daemon's life: run a Gateway, replace it with one on the new config on reload, stop on request.

A reload (SIGHUP, `systemctl reload`) first validates the file as `edge-gateway check` does: the
YAML, the cross references, the model files and manifests and the alarm rules. An invalid file
changes nothing: the running gateway goes on with its config, and the error is logged and kept in
`status()["config"]`. A valid one replaces the running gateway in the same process: the old one
stops as at shutdown (its outbox drained as far as it goes, SQLite closed), except that it does not
publish `offline`; the new one starts on the same SQLite file and the same MQTT session (client id
and persistent session unchanged unless the mqtt section changed). Alarm state comes back the way
it does after a restart: from the store, each open alarm under its id, never raised again; the
outbox is the same table. PLC sessions are opened afresh, so a reload costs one connect and one
window of warm-up per asset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.app import Gateway
from gateway.config import GatewayConfig, load_config
from gateway.errors import EXIT_OK, GatewayError, ModelError
from gateway.sinks.payloads import iso_utc

logger = logging.getLogger(__name__)


@dataclass
class ConfigState:
    """Which config runs and how the reloads went; in every gateway's status()["config"]."""

    path: str
    loaded_at: str
    reloads: int = 0
    reload_failures: int = 0
    last_error: str | None = None


def validate_config(path: Path) -> tuple[GatewayConfig, str]:
    """Load the config and its models as the daemon would, without connecting; a one-line summary.

    GatewayError (ConfigError, ModelError) when anything is wrong, with the file, line and path.
    """
    from gateway.alarms import build_rules
    from gateway.inference.select import choice_summary
    from gateway.model_checks import check_model_files
    from gateway.models import load_manifests, load_models

    cfg = load_config(path)
    manifests = load_manifests(cfg)
    # Every model file problem at once, each naming its model, before one of them stops the loading.
    problems = check_model_files(cfg, manifests)
    if problems:
        raise ModelError("\n".join(problems))
    models = load_models(cfg, manifests)
    rules = build_rules(cfg, manifests)
    n_tags = sum(len(a.tags) for a in cfg.assets)
    n_channels = sum(len(a.channels) for a in cfg.assets)
    tags = f"{n_tags} tag(s)" if n_channels == n_tags else f"{n_tags} tag(s) ({n_channels} channels)"
    summary = (
        f"{len(cfg.sources)} source(s), {len(cfg.assets)} asset(s), {tags}, "
        f"{len(models)} model(s), {len(rules)} alarm rule(s)"
    )
    # Which backend each model got, and why not a better one: the first thing to know on a Jetson.
    summary += "".join(f"; {n} on {choice_summary(m.backend, m.fallbacks)}" for n, m in models.items())
    return cfg, summary


class Service:
    """Runs gateways one after the other on `path`: `request_reload()` and `request_stop()` steer it."""

    def __init__(
        self, path: Path, cfg: GatewayConfig, *, on_started: Callable[[Gateway], None] | None = None
    ) -> None:
        self.path = Path(path)
        self.state = ConfigState(path=str(path), loaded_at=iso_utc(time.time_ns()))
        self.gateway: Gateway | None = None
        self._cfg = cfg
        self._on_started = on_started
        self._reload = asyncio.Event()
        self._stop = asyncio.Event()

    def request_reload(self) -> None:
        """Validate the file again and, if valid, replace the running gateway (safe from a signal handler)."""
        self._reload.set()

    def request_stop(self) -> None:
        """Stop the running gateway and return from run()."""
        self._stop.set()

    async def run(self) -> int:
        """Run until stopped or a stage fails; the exit code of the last gateway."""
        while True:
            stop = asyncio.Event()
            gateway = Gateway(self._cfg, config_state=self.state)
            self.gateway = gateway
            task = asyncio.ensure_future(gateway.run(stop))
            started = asyncio.ensure_future(gateway.started.wait())
            try:
                new_cfg = await self._next_config(task, started)
            finally:
                started.cancel()
            if new_cfg is not None:
                gateway.reloading = True
            stop.set()
            code = await task
            if new_cfg is None or code != EXIT_OK:
                return code
            self._cfg = new_cfg
            self.state.reloads += 1
            self.state.loaded_at = iso_utc(time.time_ns())
            logger.info("config %s reloaded (reload %d)", self.path, self.state.reloads)

    async def _next_config(self, task: asyncio.Future[int], started: asyncio.Future[bool]) -> GatewayConfig | None:
        """Wait while the gateway runs; a valid new config on reload, None on stop or when the gateway ended."""
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                reload = asyncio.ensure_future(self._reload.wait())
                waiting = {task, stop, reload} | ({started} if not started.done() else set())
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                reload.cancel()
                if task in done or stop in done:
                    return None
                if started in done and self._on_started is not None and self.gateway is not None:
                    self._on_started(self.gateway)
                if reload not in done or not self._reload.is_set():
                    continue
                self._reload.clear()
                cfg = await self._validated()
                if cfg is not None:
                    return cfg
        finally:
            stop.cancel()

    async def _validated(self) -> GatewayConfig | None:
        """The new config if the file is valid; else None, with the error logged and kept in the state."""
        logger.info("reload requested: validating %s", self.path)
        try:
            # Loading models opens ONNX Runtime sessions: seconds on a small device, off the loop.
            cfg, summary = await asyncio.to_thread(validate_config, self.path)
        except GatewayError as exc:
            self.state.reload_failures += 1
            self.state.last_error = str(exc)
            logger.error("reload refused, the running config stays: %s", exc)
            return None
        self.state.last_error = None
        logger.info("%s: OK: %s; replacing the running gateway", self.path, summary)
        return cfg
