"""A PLC that dies and comes back: Bad data, the comm_loss system alarm, recovery, no leaked tasks."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from gateway.config import load_config
from gateway.demo.run import demo_config, write_config
from gateway.demo.simulator import PlcSimulator
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_gateway import running_gateway
from tests.fixtures_mqtt import Subscriber

PUMPS = ["pump01", "pump02", "pump03", "pump04"]


def test_server_killed_and_restarted_raises_then_clears_comm_loss(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    opc_port = free_port()
    raw = demo_config(opc_port=opc_port, mqtt_port=mosquitto.port, db_path=tmp_path / "gw.db")
    raw["sources"][0].update(reconnect_min_s=0.2, reconnect_max_s=0.5, timeout_s=1.0, comm_loss={"delay_s": 1.0})
    cfg = load_config(write_config(raw, tmp_path / "c.yaml"))
    sim_options = {"port": opc_port, "n_pumps": 4, "fault_pump": None, "bad_tag": None, "nan_tag": None}

    def alarms(sub: Subscriber, event: str) -> dict[str, dict]:
        found = (json.loads(m.payload) for m in sub.messages)
        return {a["asset"]: a for a in found if a["rule"] == "comm_loss" and a["event"] == event}

    async def scenario() -> tuple[set[asyncio.Task], set[asyncio.Task], dict, dict, dict, dict]:
        before = asyncio.all_tasks()
        with Subscriber(mosquitto.port, "edge/demo/+/alarm") as sub:
            sim = PlcSimulator(**sim_options)
            await sim.start()
            try:
                async with running_gateway(cfg) as run:
                    gateway = run.gateway
                    await wait_for_condition(lambda: gateway.counters.windows_inferred > 0, 60, "first windows")
                    await sim.stop()  # the PLC dies
                    await wait_for_condition(lambda: set(alarms(sub, "raised")) == set(PUMPS), 60, "comm_loss on every pump")
                    # Past max_gap_s the held values run out: windows are skipped, never fed stale numbers.
                    await wait_for_condition(
                        lambda: all(gateway.samplers[p].skips["bad_quality"] > 0 for p in PUMPS), 60, "skipped windows"
                    )
                    down = gateway.status()
                    windows_while_down = gateway.counters.windows_inferred
                    sim = PlcSimulator(**sim_options)  # ... and comes back on the same endpoint
                    await sim.start()
                    await wait_for_condition(lambda: set(alarms(sub, "cleared")) == set(PUMPS), 60, "comm_loss cleared")
                    await wait_for_condition(
                        lambda: gateway.counters.windows_inferred > windows_while_down, 60, "windows after recovery"
                    )
                    up = gateway.status()
            finally:
                await sim.stop()
            assert run.code == 0
            raised, cleared = alarms(sub, "raised"), alarms(sub, "cleared")
        return before, asyncio.all_tasks(), raised, cleared, down, up

    before, after, raised, cleared, down, up = asyncio.run(scenario())
    assert after == before, f"tasks left behind: {after - before}"
    for pump in PUMPS:
        assert raised[pump]["kind"] == "system" and raised[pump]["model"] == "source:plc1"
        assert raised[pump]["value"] >= raised[pump]["threshold"] == 1.0
        assert cleared[pump]["alarm_id"] == raised[pump]["alarm_id"]  # one occurrence, raised then cleared
    # While down, the source said why, and no window was fed with stale numbers.
    assert down["sources"]["plc1"]["connected"] is False and down["sources"]["plc1"]["last_error"]
    assert up["sources"]["plc1"]["connected"] is True and up["sources"]["plc1"]["connects"] >= 2
    assert all(down["assets"][p]["skips"]["bad_quality"] > 0 for p in PUMPS)


def test_source_scope_raises_one_alarm_for_the_plc_and_health_lines_say_why(tmp_path: Path, mosquitto, caplog) -> None:  # type: ignore[no-untyped-def]
    opc_port = free_port()
    raw = demo_config(opc_port=opc_port, mqtt_port=mosquitto.port, db_path=tmp_path / "gw.db", pumps=2)
    raw["gateway"]["health_log_interval_s"] = 0.2
    raw["sources"][0].update(
        reconnect_min_s=0.2, reconnect_max_s=0.5, timeout_s=1.0, comm_loss={"delay_s": 1.0, "scope": "source"}
    )
    cfg = load_config(write_config(raw, tmp_path / "c.yaml"))
    sim_options = {"port": opc_port, "n_pumps": 2, "fault_pump": None, "bad_tag": None, "nan_tag": None}
    caplog.set_level(logging.INFO, logger="gateway.app")

    def comm_loss(sub: Subscriber) -> list[tuple[str, dict]]:
        return [(m.topic, a) for m in sub.messages if (a := json.loads(m.payload))["rule"] == "comm_loss"]

    def health(text: str) -> bool:
        return any(m.startswith(f"health source plc1: {text}") for m in caplog.messages)

    async def scenario() -> list[tuple[str, dict]]:
        with Subscriber(mosquitto.port, "edge/demo/+/alarm") as sub:
            sim = PlcSimulator(**sim_options)
            await sim.start()
            try:
                async with running_gateway(cfg) as run:
                    await wait_for_condition(lambda: health("connected, ") or run.stopped(), 60, "a connected health line")
                    await sim.stop()
                    await wait_for_condition(lambda: len(comm_loss(sub)) == 1 or run.stopped(), 60, "comm_loss raised")
                    await wait_for_condition(
                        lambda: health("DISCONNECTED (") or run.stopped(), 60, "a disconnected health line"
                    )
                    sim = PlcSimulator(**sim_options)
                    await sim.start()
                    await wait_for_condition(lambda: len(comm_loss(sub)) == 2 or run.stopped(), 60, "comm_loss cleared")
            finally:
                await sim.stop()
            assert run.code == 0
            return comm_loss(sub)

    (raised_topic, raised), (cleared_topic, cleared) = asyncio.run(scenario())
    # One alarm for the PLC, under its own name, not one per pump.
    assert raised_topic == cleared_topic == "edge/demo/plc1/alarm"
    assert raised["asset"] == "plc1" and raised["event"] == "raised" and cleared["event"] == "cleared"
    assert cleared["alarm_id"] == raised["alarm_id"]
    assert any(m.startswith("health pipeline: ") for m in caplog.messages)
