"""The whole path: simulated PLC (asyncua server) -> gateway -> mosquitto, with the shipped demo model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
from pathlib import Path

from gateway.app import Gateway
from gateway.config import load_config
from gateway.demo.run import demo_config, write_config
from gateway.demo.simulator import PlcSimulator
from gateway.store import Store
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_gateway import running_gateway
from tests.fixtures_mqtt import Subscriber, make_event

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
    assert alarm["event_id"] == f"{alarm['alarm_id']}:raised"
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
    assert [(m["event"], m["alarm_id"]) for m in messages] == [("cleared", raised.alarm_id)]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        state = conn.execute("select state from alarms where alarm_id = ?", [raised.alarm_id]).fetchone()
    assert state == ("cleared",)
