"""The whole path: simulated PLC (asyncua server) -> gateway -> mosquitto, with the shipped demo model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
from pathlib import Path

from asyncua import ua

from gateway.app import Gateway
from gateway.config import load_config
from gateway.demo.run import demo_config, write_config
from gateway.demo.simulator import PlcSimulator
from gateway.store import Store
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_gateway import running_gateway
from tests.fixtures_mqtt import Subscriber, make_event
from tests.fixtures_opcua import STILL, running_simulator

FAULT_PUMP = "pump02"


def test_fault_alarm_reaches_mqtt_and_sqlite_healthy_pumps_stay_quiet(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    opc_port = free_port()
    cfg = load_config(
        write_config(demo_config(opc_port=opc_port, mqtt_port=mosquitto.port, db_path=tmp_path / "gw.db"), tmp_path / "c.yaml")
    )

    async def scenario() -> tuple[dict, list[dict]]:
        sim = PlcSimulator(
            port=opc_port,
            n_pumps=4,
            fault_pump=2,
            fault_at_s=6.0,
            fault_ramp_s=4.0,
            bad_tag=(3, "pressure"),
            bad_between_s=(1.0, 5.0),
            nan_tag=(4, "flow"),
            nan_between_s=(1.0, 4.5),
        )
        with Subscriber(mosquitto.port, "edge/demo/#") as sub:
            async with sim, running_gateway(cfg) as run:
                gateway = run.gateway
                await wait_for_condition(
                    lambda: any(m.topic == f"edge/demo/{FAULT_PUMP}/alarm" for m in sub.messages) or run.stopped(),
                    90,
                    "the fault alarm over MQTT",
                )
                # Healthy pumps must have been judged for a while too, not just warmed up.
                await wait_for_condition(
                    lambda: min(s.windows_emitted for s in gateway.samplers.values()) >= 10 or run.stopped(),
                    60,
                    "windows from every pump",
                )
                status = gateway.status()
            assert run.code == 0
            alarms = [json.loads(m.payload) for m in sub.messages if m.topic.endswith("/alarm")]
        return status, alarms

    status, alarms = asyncio.run(scenario())
    raised = [a for a in alarms if a["event"] == "raised"]
    assert {a["asset"] for a in raised} == {FAULT_PUMP}, raised
    alarm = raised[0]
    assert alarm["rule"] == "bearing_anomaly" and alarm["severity"] == "high"
    assert alarm["model"] == "pump_ae" and alarm["model_version"]
    assert alarm["value"] >= alarm["threshold"]
    assert alarm["kind"] == "anomaly_score" and alarm["output"] == "score"
    assert alarm["gateway_id"] == "demo-gw" and alarm["site"] == "demo"
    assert alarm["event_id"] == f"{alarm['alarm_id']}:1" and (alarm["state"], alarm["seq"]) == ("unack", 1)
    assert alarm["first_abnormal_source_ts"].endswith("Z") and alarm["decided_at"].endswith("Z")

    # The Bad pressure sensor and the NaN flow sensor were skipped, not inferred, and counted.
    assert status["assets"]["pump03"]["skips"].get("bad_quality", 0) > 0
    assert status["assets"]["pump04"]["skips"].get("not_finite", 0) > 0
    assert sum(status["assets"]["pump01"]["skips"].values()) == 0

    db = sqlite3.connect(tmp_path / "gw.db")  # closed below
    rows = db.execute("select alarm_id, asset, rule, state from alarms").fetchall()
    assert (alarm["alarm_id"], FAULT_PUMP, "bearing_anomaly") in [r[:3] for r in rows]
    published = db.execute("select count(*) from alarm_events where published_at_ns is not null").fetchone()[0]
    assert published >= 1
    scores = dict(db.execute("select asset, count(*) from scores group by asset").fetchall())
    assert set(scores) == {"pump01", "pump02", "pump03", "pump04"}
    db.close()


def test_alarm_active_at_stop_is_restored_and_clears_under_its_id(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    """A restart must not forget an active alarm (SCADA would show it forever) nor raise it anew."""
    opc_port = free_port()
    db = tmp_path / "gw.db"
    cfg = load_config(write_config(demo_config(opc_port=opc_port, mqtt_port=mosquitto.port, db_path=db), tmp_path / "c.yaml"))
    raised = dataclasses.replace(
        make_event(1, asset="pump01", value=5.0), rule="bearing_anomaly", model="pump_ae", gateway_id="demo-gw"
    )

    async def scenario() -> tuple[list[dict], Gateway]:
        store = Store(db)  # the previous run's store: the alarm was raised and delivered
        await store.start()
        await store.add_alarm_event(raised, "edge/demo/pump01/alarm", b"{}")
        await store.mark_published([raised.event_id])
        await store.stop()
        with Subscriber(mosquitto.port, "edge/demo/pump01/alarm") as sub:
            async with (
                PlcSimulator(port=opc_port, n_pumps=4, fault_pump=None, bad_tag=None, nan_tag=None),
                running_gateway(cfg) as run,
            ):
                await wait_for_condition(lambda: bool(sub.messages) or run.stopped(), 60, "the restored alarm's clear")
            assert run.code == 0
            gateway = run.gateway
            return [json.loads(m.payload) for m in sub.messages], gateway

    messages, gateway = asyncio.run(scenario())
    # pump01 is healthy: the restored alarm clears, under the id it was raised with, and nothing is raised.
    # Nobody acknowledged it, so it returns to normal unacknowledged: transition 2 of the occurrence.
    assert [(m["event"], m["alarm_id"], m["seq"], m["state"]) for m in messages] == [
        ("cleared", raised.alarm_id, 2, "rtn_unack")
    ]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute("select state, seq from alarms where alarm_id = ?", [raised.alarm_id]).fetchone()
    assert row == ("rtn_unack", 2)


def test_a_stopped_asset_suppresses_its_alarms_by_design_and_the_state_survives_a_restart(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    raw = demo_config(opc_port=free_port(), mqtt_port=mosquitto.port, db_path=tmp_path / "gw.db", pumps=1)
    raw["assets"][0]["running"] = {"tag": "speed", "above": 100.0}
    raw["sources"][0]["comm_loss"] = {"enabled": False}
    cfg = load_config(write_config(raw, tmp_path / "c.yaml"))
    speed = ua.NodeId("pump01.speed", 2)

    async def write_speed(sim: PlcSimulator, rpm: float) -> None:
        assert sim.server is not None
        await sim.server.write_attribute_value(speed, ua.DataValue(ua.Variant(rpm, ua.VariantType.Double)))

    def events(sub: Subscriber) -> list[tuple[str, str, str]]:
        return [(p["event"], p["state"], p["cause"]) for p in map(json.loads, (m.payload for m in sub.messages))]

    async def scenario() -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
        port = int(raw["sources"][0]["endpoint"].rsplit(":", 1)[1].strip("/"))
        with Subscriber(mosquitto.port, "edge/demo/pump01/alarm") as sub:
            async with running_simulator(port, n_pumps=1, **STILL) as sim:
                async with running_gateway(cfg) as run:
                    await wait_for_condition(lambda: run.gateway.counters.windows_inferred > 0 or run.stopped(), 60, "windows")
                    await write_speed(sim, 0.0)  # the pump stops
                    await wait_for_condition(lambda: len(sub.messages) >= 1 or run.stopped(), 60, "suppressed")
                assert run.code == 0
                first = events(sub)
                # Restarted while stopped: the alarm stays suppressed, nothing is announced again.
                async with running_gateway(cfg) as run:
                    await wait_for_condition(lambda: run.gateway.counters.windows_inferred > 0 or run.stopped(), 60, "windows")
                    assert run.gateway.engine is not None
                    state = run.gateway.engine.states[("bearing_anomaly", "pump01")]
                    await write_speed(sim, 1480.0)  # it runs again
                    await wait_for_condition(lambda: len(sub.messages) >= 2 or run.stopped(), 60, "unsuppressed")
                assert run.code == 0 and state.state == "suppressed"
            return first, events(sub)

    first, both = asyncio.run(scenario())
    assert first == [("suppressed", "suppressed", "design:stopped")]
    assert both == [*first, ("unsuppressed", "normal", "design:running")]


def test_an_operator_acknowledges_a_returned_alarm_over_mqtt(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "gw.db"
    raw = demo_config(opc_port=free_port(), mqtt_port=mosquitto.port, db_path=db, pumps=1)
    raw["mqtt"]["commands"] = {"users": ["op1"]}
    cfg = load_config(write_config(raw, tmp_path / "c.yaml"))
    port = int(raw["sources"][0]["endpoint"].rsplit(":", 1)[1].strip("/"))
    raised = dataclasses.replace(
        make_event(1, asset="pump01", value=5.0), rule="bearing_anomaly", model="pump_ae", gateway_id="demo-gw"
    )

    async def scenario() -> tuple[dict, list[dict]]:
        store = Store(db)  # the previous run raised the alarm; the healthy pump will clear it
        await store.start()
        await store.add_alarm_event(raised, "edge/demo/pump01/alarm", b"{}")
        await store.mark_published([raised.event_id])
        await store.stop()
        with Subscriber(mosquitto.port, "edge/demo/#") as sub:
            async with running_simulator(port, n_pumps=1, **STILL), running_gateway(cfg) as run:
                alarms = lambda: [json.loads(m.payload) for m in sub.messages if m.topic.endswith("/alarm")]  # noqa: E731
                await wait_for_condition(lambda: len(alarms()) >= 1 or run.stopped(), 60, "the clear")
                sub.publish("edge/demo/cmd/op1/acknowledge", json.dumps({"alarm_id": raised.alarm_id}).encode())
                responses = lambda: [m for m in sub.messages if m.topic == "edge/demo/cmd-response/op1"]  # noqa: E731
                await wait_for_condition(
                    lambda: (len(alarms()) >= 2 and responses()) or run.stopped(), 60, "the acknowledgement"
                )
            assert run.code == 0
        return json.loads(responses()[0].payload), alarms()

    response, events = asyncio.run(scenario())
    assert response["ok"] is True and response["state"] == "normal"
    assert [(e["event"], e["state"], e["seq"], e["cause"]) for e in events] == [
        ("cleared", "rtn_unack", 2, "process"),
        ("acknowledged", "normal", 3, "operator:op1"),
    ]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute("select state, seq, acked_by from alarms where alarm_id = ?", [raised.alarm_id]).fetchone()
    assert row == ("normal", 3, "operator:op1")
