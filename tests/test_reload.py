"""Config reload (SIGHUP): an invalid file changes nothing, a valid one swaps the gateway, losing neither alarm state nor outbox."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from gateway.app import Gateway
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


def _statuses(messages: list[Received]) -> list[str]:
    return [json.loads(m.payload)["state"] for m in messages if m.topic.endswith("/status")]


async def _reload(service: Service, raw: dict[str, Any], path: Path, n: int) -> Gateway:
    """Write `raw` to `path`, request a reload, and return the gateway that replaced the running one."""
    before = service.gateway
    write_config(raw, path)
    service.request_reload()
    await wait_for_condition(
        lambda: service.state.reloads == n and service.gateway is not before, 60, f"reload {n} applied"
    )
    gateway = service.gateway
    assert gateway is not None and gateway.status()["config"]["last_error"] is None
    await wait_for_condition(gateway.started.is_set, 60, f"gateway {n} started")
    return gateway


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

                # 2. A valid file with a threshold every pump exceeds: a new gateway applies it at once,
                # and SCADA sees no offline status in between.
                raw["alarms"][0].update(high=0.0, low=0.0)
                second = await _reload(service, raw, path, 1)
                msgs = await sub.await_for(
                    lambda msgs: {a["asset"] for a in _alarms(msgs) if a["event"] == "raised"}
                    >= {"pump01", "pump02", "pump03", "pump04"},
                    60,
                )
                assert _statuses(msgs) and "offline" not in _statuses(msgs)
                # pump02's alarm, active across the reload, came back under its id: never raised again.
                pump02 = [a["alarm_id"] for a in _alarms(msgs) if a["asset"] == "pump02" and a["event"] == "raised"]
                assert len(pump02) == 1 and second.engine is not None
                assert any(st.alarm_id == pump02[0] for st in second.engine.states.values())

                # 3. With the broker away: back to the model's thresholds, so pumps 1, 3 and 4 clear
                # into the outbox; one more reload must hand those waiting events on, not lose them.
                await asyncio.to_thread(mosquitto.stop)
                await wait_for_condition(lambda: not second.publisher.connected, 30, "the broker gone")
                raw["alarms"][0].pop("high")
                raw["alarms"][0].pop("low")
                third = await _reload(service, raw, path, 2)
                await wait_for_condition(lambda: third.store.stats.outbox_alarm_events >= 3, 60, "clears waiting")
                fourth = await _reload(service, raw, path, 3)
                assert fourth.store.stats.outbox_alarm_events >= 3  # counted from the file it took over
                await asyncio.to_thread(mosquitto.start)
                await sub.await_for(
                    lambda msgs: {a["asset"] for a in _alarms(msgs) if a["event"] == "cleared"}
                    >= {"pump01", "pump03", "pump04"},
                    60,
                )
                await wait_for_condition(lambda: fourth.store.stats.outbox_alarm_events == 0, 30, "outbox drained")
            finally:
                service.request_stop()
            assert await run == 0

    # A persistent session: the broker (persisting to disk) keeps what arrives while this client reconnects.
    with Subscriber(mosquitto.port, "edge/demo/#", client_id="scada", session_expiry_s=300) as sub:
        asyncio.run(scenario(sub))
        messages = sub.messages
    # Each transition arrived once per event id (a re-sent copy is the same event), in order per alarm.
    events = _alarms(messages)
    for alarm_id in {a["alarm_id"] for a in events}:
        seqs = list(dict.fromkeys(a["seq"] for a in events if a["alarm_id"] == alarm_id))
        assert seqs == sorted(seqs), (alarm_id, seqs)
    assert _statuses(messages)[-1] == "offline"  # the final stop, not a reload, publishes it
