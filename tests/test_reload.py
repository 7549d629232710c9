"""Config reload (SIGHUP): an invalid file changes nothing, a valid one swaps the gateway and loses no alarm state."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from gateway.config import load_config
from gateway.demo.broker import MosquittoBroker
from gateway.demo.run import demo_config, write_config
from gateway.service import Service
from gateway.status_cli import fetch
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_mqtt import Received, Subscriber
from tests.fixtures_opcua import running_simulator


def _alarms(messages: list[Received]) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if m.topic.endswith("/alarm")]


def test_an_invalid_file_keeps_the_running_gateway_and_a_valid_one_swaps_it_keeping_alarm_state(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    opc_port = free_port()
    raw = demo_config(opc_port=opc_port, mqtt_port=mosquitto.port, db_path=tmp_path / "gw.db")
    path = write_config(raw, tmp_path / "gateway.yaml")

    async def scenario(sub: Subscriber) -> None:
        async with running_simulator(opc_port, fault_pump=2, fault_at_s=1.0, fault_ramp_s=1.0, bad_tag=None, nan_tag=None):
            service = Service(path, load_config(path))
            run = asyncio.ensure_future(service.run())
            try:
                await sub.await_for(lambda msgs: any(a["asset"] == "pump02" for a in _alarms(msgs)), 60)
                first = service.gateway
                assert first is not None and first.started.is_set()

                # 1. A broken file: refused with its line, the same gateway goes on.
                path.write_text(path.read_text().replace("sources:", "sources: [", 1))
                service.request_reload()
                await wait_for_condition(lambda: service.state.reload_failures == 1, 60, "the reload refused")
                assert service.gateway is first and not run.done()
                error = service.state.last_error or ""
                assert str(path) in error and ":" in error
                assert first.status()["config"]["reload_failures"] == 1
                # ... and reported where a person on the device looks: the metrics and `edge-gateway status`.
                assert first.exporter is not None and first.exporter.url is not None
                scrape = await asyncio.to_thread(fetch, first.exporter.url)
                assert scrape.value("edge_gateway_config_reload_failures_total") == 1
                assert scrape.value("edge_gateway_config_last_reload_ok") == 0

                # 2. A valid file with a threshold every pump exceeds: a new gateway applies it.
                raw["alarms"][0].update(high=0.0, low=0.0)
                write_config(raw, path)
                service.request_reload()
                await wait_for_condition(
                    lambda: service.state.reloads == 1 and service.gateway is not first, 60, "the reload applied"
                )
                second = service.gateway
                assert second is not None and second.status()["config"]["last_error"] is None
                await sub.await_for(
                    lambda msgs: {a["asset"] for a in _alarms(msgs) if a["event"] == "raised"}
                    >= {"pump01", "pump02", "pump03", "pump04"},
                    60,
                )
            finally:
                service.request_stop()
            assert await run == 0

    with Subscriber(mosquitto.port, "edge/demo/#") as sub:
        asyncio.run(scenario(sub))
        messages = sub.messages
    raised = [a for a in _alarms(messages) if a["event"] == "raised"]
    # pump02's alarm, active across the reload, was restored under its id: never raised a second time.
    assert [a["alarm_id"] for a in raised if a["asset"] == "pump02"] == [
        next(a["alarm_id"] for a in raised if a["asset"] == "pump02")
    ]
    # SCADA saw no offline between the two gateways: only the final stop publishes it.
    states = [json.loads(m.payload)["state"] for m in messages if m.topic.endswith("/status")]
    assert "offline" not in states[:-1] and states[-1] == "offline"
