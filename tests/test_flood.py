"""Flood control: more than max_alarms onsets in window_s on one asset raise one `flood` alarm and
suppress the asset's alarms until calm_s pass without an onset; through a restart; over MQTT."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from gateway.alarms import (
    AlarmEngine,
    AlarmEvent,
    AlarmRule,
    comm_loss_model,
    comm_loss_rules,
)
from gateway.config import GatewayConfig, load_config
from gateway.demo.run import demo_config, write_config
from gateway.errors import ConfigError
from gateway.flood import FloodTracker, flood_rules
from gateway.restore import restore_alarms
from gateway.sinks.payloads import alarm_payload
from gateway.store import NewEvent, Store
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_config import pumps_config
from tests.fixtures_gateway import running_gateway
from tests.fixtures_mqtt import Subscriber
from tests.fixtures_opcua import STILL, running_simulator

GW = "gw01"
S = 10**9
T0 = 1_764_060_000 * S  # a realistic wall clock, so payload times format as they do live
SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "schemas" / "alarm-event.schema.json"


def _config(flood: dict[str, Any] | None = None) -> GatewayConfig:
    return pumps_config(flood={"max_alarms": 3, "window_s": 60, "calm_s": 30, **(flood or {})})


def _rules(cfg: GatewayConfig) -> list[AlarmRule]:
    """Two model rules (bearing: value 0, cavitation: value 1) on both pumps, comm_loss, and flood."""
    model = [
        AlarmRule(
            name=name,
            model="pump_ae",
            output=name,
            value_index=i,
            high=0.8,
            low=0.6,
            direction="above",
            on_delay=1,
            severity="medium",
            kind="class_probabilities",
            model_version="1.2.0",
            assets=frozenset({"P-101", "P-102"}),
        )  # fmt: skip
        for i, name in enumerate(("bearing", "cavitation"))
    ]
    rules = model + comm_loss_rules(cfg, version="9.9.9")
    return rules + flood_rules(cfg, rules, version="9.9.9")


def _engine(flood: dict[str, Any] | None = None) -> AlarmEngine:
    cfg = _config(flood)
    return AlarmEngine(_rules(cfg), gateway_id=GW, flood=FloodTracker(cfg.flood), now_ns=T0)


def _feed(
    engine: AlarmEngine, t: float, bearing: float, cavitation: float = 0.1, asset: str = "P-101"
) -> list[AlarmEvent]:
    now = T0 + int(t * S)
    return engine.decide("pump_ae", asset, np.array([bearing, cavitation]), source_ts_ns=now, now_ns=now)


def _chatter(engine: AlarmEngine, start: float, onsets: int, asset: str = "P-101") -> list[AlarmEvent]:
    """`onsets` onsets of bearing on `asset`, one per second from `start` (each followed by its end)."""
    events: list[AlarmEvent] = []
    for i in range(onsets):
        events += _feed(engine, start + i, 0.9, asset=asset)
        events += _feed(engine, start + i + 0.5, 0.1, asset=asset)
    return events


def _brief(events: list[AlarmEvent]) -> list[tuple[str, str, str, str]]:
    return [(e.rule, e.event, e.state, e.cause) for e in events]


@functools.cache
def _validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _valid(payload: bytes) -> dict[str, Any]:
    obj = json.loads(payload)
    _validator().validate(obj)
    return obj


FLOOD_START = [
    ("flood", "raised", "unack", "process"),
    ("bearing", "suppressed", "suppressed", "design:flood"),
    ("cavitation", "suppressed", "suppressed", "design:flood"),
]


def test_the_onset_past_max_alarms_raises_the_flood_first_then_suppresses_the_assets_alarms() -> None:
    engine = _engine()
    events = _chatter(engine, 0, 3)  # max_alarms onsets: each announced on its own, no flood
    assert [e.event for e in events] == ["raised", "cleared"] * 3 and {e.rule for e in events} == {"bearing"}
    assert engine.flood is not None and engine.flood.status()["floods_started"] == 0
    # The fourth onset (of another rule) starts the flood: it is summarized, not announced.
    events = _feed(engine, 10, 0.1, cavitation=0.9)
    assert _brief(events) == FLOOD_START
    flood = events[0]
    assert (flood.asset, flood.kind, flood.output, flood.value, flood.threshold, flood.severity) == (
        "P-101", "system", "onsets", 4.0, 3.0, "high",
    )  # fmt: skip
    assert (flood.model, flood.model_version, flood.first_abnormal_source_ts_ns) == (
        "gateway:flood",
        "9.9.9",
        0,
    )
    for e in events:
        payload = _valid(alarm_payload(e, site="plant1"))
        assert payload["event_id"] == f"{payload['alarm_id']}:{payload['seq']}"
    assert [(r.name, a) for r, a, _ in engine.active()] == [("flood", "P-101")]
    # While flooded, onsets are followed silently and counted; the other pump is not concerned.
    assert _chatter(engine, 20, 5) == []
    assert engine.states[("bearing", "P-101")].state == "suppressed"
    assert [e.event for e in _chatter(engine, 20, 1, asset="P-102")] == ["raised", "cleared"]
    assert engine.flood.status() == {
        "floods_started": 1,
        "floods_ended": 0,
        "flooded": ["P-101"],
        "onsets": 10,
        "onsets_summarized": {"P-101": 6},
    }


def test_onsets_older_than_the_window_do_not_count() -> None:
    engine = _engine()
    for t in (0, 30, 60, 90, 120):  # never more than 2 onsets within 60 s
        assert [e.event for e in _chatter(engine, t, 1)] == ["raised", "cleared"]
    assert engine.flood is not None and engine.flood.status()["floods_started"] == 0


def test_calm_ends_the_flood_and_resumes_each_alarm_as_its_condition_stands() -> None:
    engine = _engine()
    _chatter(engine, 0, 3)
    (flood, *_) = _feed(engine, 10, 0.9, cavitation=0.9)  # the 4th onset floods, the 5th is summarized
    assert flood.rule == "flood"
    assert _feed(engine, 11, 0.9, cavitation=0.1) == []  # cavitation ends silently; bearing stays present
    assert engine.end_floods(T0 + 39 * S) == []  # the last onset was at 10 s: not calm for 30 s yet
    events = engine.end_floods(T0 + 40 * S)
    assert _brief(events) == [
        ("flood", "cleared", "rtn_unack", "process"),
        ("bearing", "unsuppressed", "unack", "design:flood_ended"),  # its condition is present
        ("cavitation", "unsuppressed", "normal", "design:flood_ended"),
    ]
    assert events[0].alarm_id == flood.alarm_id and events[0].value == 2.0  # the onsets it summarized
    for e in events:
        _valid(alarm_payload(e, site="plant1"))
    assert engine.flood is not None and engine.flood.status()["flooded"] == []
    # Counting starts afresh: the onsets of the past flood cannot start the next one at once.
    assert [e.event for e in _feed(engine, 41, 0.1)] == ["cleared"]
    assert {e.rule for e in _chatter(engine, 42, 3)} == {"bearing"}


def test_the_flood_alarm_is_acknowledged_and_shelved_like_any_alarm() -> None:
    engine = _engine()
    _chatter(engine, 0, 3)
    flood = _feed(engine, 10, 0.9, cavitation=0.9)[0]
    ack = engine.acknowledge(flood.alarm_id, by="alice", now_ns=T0 + 11 * S)
    assert (ack.rule, ack.state) == ("flood", "acked")
    cleared, *_ = engine.end_floods(T0 + 40 * S)
    assert (cleared.event, cleared.state) == ("cleared", "normal")  # acknowledged: the occurrence ends
    _feed(engine, 45, 0.1)
    _chatter(engine, 50, 4)
    assert engine.states[("flood", "P-101")].state == "unack"
    shelved = engine.shelve("flood", "P-101", until_ns=T0 + 3600 * S, by="bob", now_ns=T0 + 60 * S)
    assert (shelved.event, shelved.state) == ("shelved", "shelved")
    # Shelved, the flood's end is followed silently; the suppression still lifts.
    assert _brief(engine.end_floods(T0 + 90 * S)) == [
        ("bearing", "unsuppressed", "normal", "design:flood_ended"),
        ("cavitation", "unsuppressed", "normal", "design:flood_ended"),
    ]
    assert engine.unshelve("flood", "P-101", by="bob", now_ns=T0 + 91 * S).state == "normal"


def test_suppression_reasons_compose_with_the_running_tag() -> None:
    engine = _engine()
    stopped = engine.set_suppressed("P-101", True, reason="stopped", now_ns=T0)
    assert _brief(stopped) == [
        ("bearing", "suppressed", "suppressed", "design:stopped"),
        ("cavitation", "suppressed", "suppressed", "design:stopped"),
    ]
    # Onsets of suppressed alarms count: the flood alarm is raised, the alarms are suppressed already.
    assert _brief(_chatter(engine, 1, 4)) == FLOOD_START[:1]
    assert engine.suppressed == {"P-101": {"stopped", "flood"}}
    assert engine.set_suppressed("P-101", False, reason="stopped", now_ns=T0 + 10 * S) == []  # flood holds
    assert engine.states[("bearing", "P-101")].state == "suppressed"
    assert _brief(engine.end_floods(T0 + 40 * S)) == [
        ("flood", "cleared", "rtn_unack", "process"),
        ("bearing", "unsuppressed", "normal", "design:flood_ended"),
        ("cavitation", "unsuppressed", "normal", "design:flood_ended"),
    ]
    # The other order: the flood ends while the asset is stopped, which then holds the suppression.
    engine = _engine()
    assert _brief(_chatter(engine, 0, 4)) == _brief(_chatter(_engine(), 0, 3)) + FLOOD_START
    engine.set_suppressed("P-101", True, reason="stopped", now_ns=T0 + 5 * S)
    assert _brief(engine.end_floods(T0 + 40 * S)) == [("flood", "cleared", "rtn_unack", "process")]
    assert engine.suppressed == {"P-101": {"stopped"}}
    assert _brief(engine.set_suppressed("P-101", False, reason="stopped", now_ns=T0 + 41 * S)) == [
        ("bearing", "unsuppressed", "normal", "design:running"),
        ("cavitation", "unsuppressed", "normal", "design:running"),
    ]
    with pytest.raises(ValueError, match="unknown suppression reason 'running'"):
        engine.set_suppressed("P-101", False, reason="running", now_ns=T0 + 42 * S)


def test_system_alarms_neither_count_nor_are_suppressed() -> None:
    engine = _engine()
    comm_loss = comm_loss_model("plc1")
    for t in range(11):  # comm_loss chatters: its onsets are not the asset's alarms
        engine.decide(
            comm_loss, "P-101", np.array([30.0 if t % 2 == 0 else 0.0]), source_ts_ns=0, now_ns=T0 + t * S
        )
    assert engine.flood is not None and engine.flood.status()["onsets"] == 0
    assert engine.states[("comm_loss", "P-101")].state == "unack"
    assert _brief(_chatter(engine, 20, 4))[-3:] == FLOOD_START  # comm_loss is not suppressed by the flood
    assert engine.states[("comm_loss", "P-101")].state == "unack"


def test_disabled_flood_control_never_floods() -> None:
    cfg = _config({"enabled": False})
    assert flood_rules(cfg, _rules(_config()), version="9.9.9") == []
    engine = _engine({"enabled": False})
    assert engine.flood is None
    events = _chatter(engine, 0, 20)
    assert {e.rule for e in events} == {"bearing"} and len(events) == 40
    assert engine.end_floods(T0 + 3600 * S) == []


def test_flood_config_defaults_and_ranges(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    head = (
        "sources: [{name: p, endpoint: 'opc.tcp://h:4840'}]\n"
        "assets: [{name: a, source: p, window: {length: 4, hop: 1}, tags: [{name: t, node_id: 'ns=2;s=t'}]}]\n"
    )
    path.write_text(head, encoding="utf-8")
    flood = load_config(path).flood
    assert (flood.enabled, flood.max_alarms, flood.window_s, flood.calm_s, flood.severity) == (
        True, 10, 600.0, 300.0, "high",
    )  # fmt: skip
    for bad, where in [
        ("max_alarms: 0", "flood.max_alarms"),
        ("window_s: 0", "flood.window_s"),
        ("calm_s: .nan", "flood.calm_s"),
        ("severity: urgent", "flood.severity"),
        ("max_onsets: 3", "flood.max_onsets: unknown key"),
    ]:
        path.write_text(head + f"flood:\n  {bad}\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=f":4 {where}"):
            load_config(path)


def test_a_restart_keeps_the_flood_and_the_reasons_for_each_suppression(tmp_path: Path) -> None:
    """P-101 (running tag) stopped and flooded, P-102 (none) flooded with its flood alarm shelved."""
    cfg = _config()
    rules = _rules(cfg)
    before = AlarmEngine(rules, gateway_id=GW, flood=FloodTracker(cfg.flood), now_ns=T0)
    events = before.set_suppressed("P-101", True, reason="stopped", now_ns=T0)
    events += _chatter(before, 1, 4) + _chatter(before, 1, 4, asset="P-102")
    flood_102 = next(e for e in events if e.rule == "flood" and e.asset == "P-102")
    events.append(before.shelve("flood", "P-102", until_ns=T0 + 3600 * S, by="op", now_ns=T0 + 9 * S))
    restart = T0 + 3000 * S  # long after the last onset: the calm time counts from the restart

    async def restarted() -> AlarmEngine:
        store = Store(tmp_path / "gw.db")
        await store.start()
        await store.add_alarm_events([NewEvent(e, f"edge/site/{e.asset}/alarm", b"{}") for e in events])
        await store.stop()
        store = Store(tmp_path / "gw.db")
        await store.start()
        try:
            restored = restore_alarms(await store.open_alarms(), rules, running={"P-101"})
        finally:
            await store.stop()
        assert restored.suppressed == {"P-101": {"stopped", "flood"}, "P-102": {"flood"}}
        return AlarmEngine(
            rules, gateway_id=GW, states=restored.states, suppressed=restored.suppressed,
            flood=FloodTracker(cfg.flood), now_ns=restart,
        )  # fmt: skip

    after = asyncio.run(restarted())
    assert after.flood is not None and after.flood.status()["flooded"] == ["P-101", "P-102"]
    # The running tag reads Good and running: P-101 stays suppressed, the flood still holds it.
    assert after.set_suppressed("P-101", False, reason="stopped", now_ns=restart + S) == []
    assert {after.states[(r, a)].state for r in ("bearing", "cavitation") for a in ("P-101", "P-102")} == {
        "suppressed"
    }
    assert after.end_floods(restart + 29 * S) == []
    ended = after.end_floods(restart + 30 * S)
    assert [(e.asset, *b) for e, b in zip(ended, _brief(ended), strict=True)] == [
        ("P-101", "flood", "cleared", "rtn_unack", "process"),
        ("P-101", "bearing", "unsuppressed", "normal", "design:flood_ended"),
        ("P-101", "cavitation", "unsuppressed", "normal", "design:flood_ended"),
        # P-102's flood alarm is shelved: its end is followed silently, the suppression lifts.
        ("P-102", "bearing", "unsuppressed", "normal", "design:flood_ended"),
        ("P-102", "cavitation", "unsuppressed", "normal", "design:flood_ended"),
    ]
    p101 = next(e for e in events if e.rule == "flood" and e.asset == "P-101")
    assert (ended[0].alarm_id, ended[0].seq) == (p101.alarm_id, 2)  # the same occurrence, continued
    assert after.states[("flood", "P-102")].alarm_id == flood_102.alarm_id
    assert after.suppressed == {}


def test_a_chattering_gateway_publishes_the_flood_and_its_end_over_mqtt(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    """Two rules that are always abnormal: the second onset floods (max_alarms 1); calm after 1 s."""
    raw = demo_config(opc_port=free_port(), mqtt_port=mosquitto.port, db_path=tmp_path / "gw.db", pumps=1)
    raw["sources"][0]["comm_loss"] = {"enabled": False}
    raw["alarms"] = [
        {"name": name, "model": "pump_ae", "direction": "below", "high": 1e9, "low": 1e9}
        for name in ("r1", "r2")
    ]
    raw["flood"] = {"max_alarms": 1, "calm_s": 1.0}
    cfg = load_config(write_config(raw, tmp_path / "c.yaml"))
    port = int(raw["sources"][0]["endpoint"].rsplit(":", 1)[1].strip("/"))

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        with Subscriber(mosquitto.port, "edge/demo/pump01/alarm") as sub:
            async with running_simulator(port, n_pumps=1, **STILL), running_gateway(cfg) as run:
                await wait_for_condition(
                    lambda: len(sub.messages) >= 7 or run.stopped(), 60, "the flood and its end"
                )
                status = run.gateway.status()
            assert run.code == 0
            return [_valid(m.payload) for m in sub.messages], status

    messages, status = asyncio.run(scenario())
    assert [(m["rule"], m["event"], m["state"], m["cause"]) for m in messages] == [
        ("r1", "raised", "unack", "process"),
        ("flood", "raised", "unack", "process"),
        ("r1", "suppressed", "suppressed", "design:flood"),
        ("r2", "suppressed", "suppressed", "design:flood"),
        ("flood", "cleared", "rtn_unack", "process"),
        ("r1", "unsuppressed", "unack", "design:flood_ended"),
        ("r2", "unsuppressed", "unack", "design:flood_ended"),
    ]
    assert (messages[1]["kind"], messages[1]["value"], messages[1]["threshold"]) == ("system", 2.0, 1.0)
    assert status["flood"] == {
        "floods_started": 1, "floods_ended": 1, "flooded": [], "onsets": 2, "onsets_summarized": {"pump01": 1},
    }  # fmt: skip
