"""`edge-gateway demo`: simulated PLC + broker + gateway, with a live view of alarms received over MQTT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml

from gateway.config import load_config
from gateway.demo import signals
from gateway.demo.broker import EmbeddedBroker, MqttProtocol, choose_demo_broker
from gateway.errors import GatewayError

MODEL_DIR = Path(__file__).parent / "model"
DEMO_PUMPS = 4
DEMO_FAULT_PUMP = 2


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_config(
    *, opc_port: int, mqtt_port: int, db_path: Path, pumps: int = DEMO_PUMPS, protocol: MqttProtocol = "5"
) -> dict[str, Any]:
    """The demo's gateway config as a YAML-ready dict (also what the end-to-end tests run)."""
    return {
        "gateway": {"id": "demo-gw", "shutdown_timeout_s": 4.0},
        "sources": [
            {"name": "plc1", "endpoint": f"opc.tcp://127.0.0.1:{opc_port}/", "poll_interval_ms": 100}
        ],
        "assets": [
            {
                "name": f"pump{p:02d}",
                "source": "plc1",
                "sample_rate_hz": 10,
                "window": {"length": 32, "hop": 5},
                "max_gap_s": 1.0,
                "tags": [
                    {"name": tag, "node_id": f"ns=2;s=pump{p:02d}.{tag}", "unit": signals.UNITS[tag]}
                    for tag in signals.TAGS
                ],
            }
            for p in range(1, pumps + 1)
        ],
        "models": [
            {
                "name": "pump_ae",
                "path": str(MODEL_DIR / "pump_ae.onnx"),
                "assets": [f"pump{p:02d}" for p in range(1, pumps + 1)],
            }
        ],
        "alarms": [
            {
                "name": "bearing_anomaly",
                "model": "pump_ae",
                "output": "score",
                "on_delay": 3,
                "severity": "high",
            }
        ],
        "storage": {"path": str(db_path)},
        # Any free port: a demo (or a test) beside a running service must not fight over 9108.
        "metrics": {"port": 0},
        "mqtt": {
            "host": "127.0.0.1",
            "port": mqtt_port,
            "protocol": protocol,
            "site": "demo",
            "topic_prefix": "edge",
            "publish_scores": True,
        },
    }


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    """Write a config dict as YAML; the gateway then loads it through its real loader."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@contextlib.contextmanager
def simulator_process(
    port: int, *, pumps: int, rate_hz: float = 10.0, extra: list[str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """Run the simulated PLC in its own process, as a real PLC would be; stopped on exit."""
    cmd = [sys.executable, "-m", "gateway.demo.simulator", "--log-level", "warning"]
    cmd += ["--port", str(port), "--pumps", str(pumps), "--rate", str(rate_hz)]
    proc = subprocess.Popen(cmd + (extra or []), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise GatewayError(f"simulated PLC did not start (exit code {proc.poll()}): {line.strip()}")
        yield proc
    finally:
        # A stopped process (SIGSTOP, as a frozen-PLC test does) acts on SIGTERM only once continued.
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _number(x: float | None) -> str:
    """A payload number for the live view: 3 decimals, or '-' for null."""
    return "-" if x is None else f"{x:.3f}"


class AlarmView:
    """A real MQTT subscriber that prints alarms as SCADA would receive them, plus a score line."""

    def __init__(self, host: str, port: int, prefix: str, site: str, *, protocol: MqttProtocol = "5") -> None:
        self.alarms: list[dict[str, Any]] = []
        self.scores: dict[str, float] = {}
        self.status: dict[str, Any] = {}
        self._loop = asyncio.get_running_loop()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"demo-view-{port}",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        self._client.on_connect = lambda c, *_: c.subscribe([(f"{prefix}/{site}/#", 1)])
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        self._t0 = time.monotonic()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        self._loop.call_soon_threadsafe(self._handle, msg.topic, payload)

    def _handle(self, topic: str, payload: dict[str, Any]) -> None:
        if topic.endswith("/alarm"):
            self.alarms.append(payload)
            print(
                f"[{time.monotonic() - self._t0:6.1f}s] ALARM {payload['event'].upper():<12} {payload['asset']} "
                f"{payload['rule']} state={payload['state']} severity={payload['severity']} "
                f"value={_number(payload['value'])} threshold={_number(payload['threshold'])} "
                f"id={payload['alarm_id'][:8]}",
                flush=True,
            )
        elif topic.endswith("/score"):
            self.scores[payload["asset"]] = payload["values"]["score"]
        elif topic.endswith("/status"):
            self.status = payload
            stats = payload.get("stats")
            waiting = (
                f" (outbox: {stats['outbox']['alarm_events']} alarm events, {stats['outbox']['messages']} others waiting)"
                if stats
                else ""
            )
            print(f"[{time.monotonic() - self._t0:6.1f}s] gateway status: {payload.get('state')}{waiting}", flush=True)

    def score_line(self) -> str:
        """One line with the latest anomaly score of every pump."""
        return "  ".join(f"{a} {v:6.3f}" for a, v in sorted(self.scores.items()))

    def close(self) -> None:
        """Disconnect the subscriber."""
        self._client.disconnect()
        self._client.loop_stop()


async def run_demo(*, seconds: float | None, workdir: Path | None) -> int:
    """Run the whole demo; returns 0 when it ran (and ended by itself or by Ctrl-C)."""
    from gateway.app import Gateway

    # The view below shows what SCADA receives; the gateway's own log would only repeat it.
    logging.getLogger("gateway").setLevel(logging.ERROR)
    with contextlib.ExitStack() as stack:
        wd = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-gateway-demo-")))
        wd.mkdir(parents=True, exist_ok=True)
        opc_port, mqtt_port = free_port(), free_port()
        broker, protocol = choose_demo_broker(mqtt_port, wd)
        stack.enter_context(broker)
        stack.enter_context(simulator_process(opc_port, pumps=DEMO_PUMPS))
        cfg_path = write_config(
            demo_config(opc_port=opc_port, mqtt_port=mqtt_port, db_path=wd / "demo.db", protocol=protocol),
            wd / "config.yaml",
        )
        print(
            f"demo: PLC simulator opc.tcp://127.0.0.1:{opc_port}, broker {broker.host}:{mqtt_port}, config {cfg_path}"
        )
        fallback = (
            " (mosquitto not found: embedded Python broker)" if isinstance(broker, EmbeddedBroker) else ""
        )
        print(f"demo: MQTT broker {broker.name}{fallback}, pid {broker.pid}, MQTT {protocol}")
        print(
            f"demo: pump{DEMO_FAULT_PUMP:02d} develops a bearing fault after ~20 s; pump03 pressure goes Bad at 8-14 s, pump04 flow sends NaN at 16-19 s"
        )
        cfg = load_config(cfg_path)
        view = AlarmView("127.0.0.1", mqtt_port, cfg.mqtt.topic_prefix, cfg.mqtt.site, protocol=protocol)
        stack.callback(view.close)
        gateway = Gateway(cfg)
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, shutdown.set)
        task = asyncio.ensure_future(gateway.run(shutdown))
        started = asyncio.ensure_future(gateway.started.wait())
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if gateway.exporter is not None and gateway.exporter.url:
            print(f"demo: metrics at {gateway.exporter.url} (edge-gateway status --url {gateway.exporter.url})")
        t0 = time.monotonic()
        while (
            not task.done() and (seconds is None or time.monotonic() - t0 < seconds) and not shutdown.is_set()
        ):
            await asyncio.wait({task}, timeout=2.0)
            if view.scores:
                print(f"[{time.monotonic() - t0:6.1f}s] scores  {view.score_line()}", flush=True)
        shutdown.set()
        code = await task
        status = gateway.status()
        raised = [a for a in view.alarms if a["event"] == "raised"]
        print(f"demo: {len(raised)} alarm(s) raised over MQTT: {sorted({a['asset'] for a in raised})}")
        for asset, info in status["assets"].items():
            if any(info["skips"].values()):
                print(f"demo: {asset} skipped windows (not inferred on bad data): {info['skips']}")
        print(f"demo: database {cfg.storage.path}" if workdir else "demo: done")
        return code
