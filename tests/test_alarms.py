"""Alarm decisions: on-delay, hysteresis, direction, ids, rule building from config and manifests."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pytest

from gateway.alarms import AlarmEngine, AlarmEvent, AlarmRule, AlarmState, CommandError, build_rules, evaluate
from gateway.config import GatewayConfig
from gateway.errors import ConfigError
from gateway.manifest import ModelManifest
from tests.fixtures_config import pumps_config

GW = "gw01"


def _rule(
    *,
    high: float = 0.8,
    low: float = 0.6,
    direction: Literal["above", "below"] = "above",
    on_delay: int = 1,
    off_delay: int = 1,
    name: str = "bearing",
    value_index: int = 0,
    assets: frozenset[str] = frozenset({"P-101"}),
) -> AlarmRule:
    return AlarmRule(
        name=name,
        model="pump_ae",
        output="score",
        value_index=value_index,
        high=high,
        low=low,
        direction=direction,
        on_delay=on_delay,
        severity="high",
        kind="anomaly_score",
        model_version="1.2.0",
        assets=assets,
        off_delay=off_delay,
    )


def _run(
    rule: AlarmRule, values: list[float], state: AlarmState | None = None
) -> tuple[AlarmState, list[AlarmEvent]]:
    """Feed values as consecutive windows (source ts 1000*i, now 10**9 + i); return final state and events."""
    state = state or AlarmState()
    events = []
    for i, v in enumerate(values):
        state, event = evaluate(
            rule, state, v, gateway_id=GW, asset="P-101", source_ts_ns=1000 * (i + 1), now_ns=10**9 + i
        )
        if event is not None:
            events.append(event)
    return state, events


def test_on_delay_needs_consecutive_abnormal_windows() -> None:
    rule = _rule(on_delay=3)
    state, events = _run(rule, [0.9, 0.9, 0.5, 0.9, 0.9])  # the normal window resets the streak
    assert events == []
    assert state.streak == 2 and not state.active
    state, events = _run(rule, [0.9, 0.9, 0.5, 0.9, 0.9, 0.95])
    assert [e.event for e in events] == ["raised"]
    raised = events[0]
    assert state.active and state.alarm_id == raised.alarm_id
    # The streak that led to the raise began at window 4 (source ts 4000).
    assert raised.first_abnormal_source_ts_ns == 4000
    assert (raised.value, raised.threshold, raised.decided_at_ns) == (0.95, 0.8, 10**9 + 5)
    assert raised.event_id == f"{raised.alarm_id}:1"
    assert (raised.state, raised.seq, raised.cause) == ("unack", 1, "process")
    assert (raised.rule, raised.asset, raised.gateway_id, raised.model, raised.model_version) == (
        "bearing",
        "P-101",
        GW,
        "pump_ae",
        "1.2.0",
    )


def test_hysteresis_band_neither_raises_nor_clears() -> None:
    rule = _rule(high=0.8, low=0.6)
    _, events = _run(rule, [0.7, 0.79, 0.61])
    assert events == []
    state, events = _run(rule, [0.8, 0.7, 0.79, 0.6, 0.61, 0.59])
    assert [(e.event, e.value, e.threshold) for e in events] == [("raised", 0.8, 0.8), ("cleared", 0.59, 0.6)]
    # Nobody acknowledged it: it returned to normal but stays open, unacknowledged, under its id.
    assert (state.state, state.abnormal, state.alarm_id) == ("rtn_unack", False, events[0].alarm_id)
    assert events[0].alarm_id == events[1].alarm_id
    assert (events[1].event_id, events[1].state) == (f"{events[0].alarm_id}:2", "rtn_unack")
    assert events[1].first_abnormal_source_ts_ns == events[0].first_abnormal_source_ts_ns == 1000


def test_below_direction_for_remaining_useful_life() -> None:
    rule = _rule(direction="below", high=20.0, low=30.0, on_delay=2)
    _, events = _run(rule, [50.0, 20.0, 15.0, 25.0, 30.0, 31.0])  # 25 and 30 lie in the band
    assert [e.event for e in events] == ["raised", "cleared"]
    assert events[0].value == 15.0 and events[0].threshold == 20.0
    assert events[1].value == 31.0 and events[1].threshold == 30.0
    _, events = _run(rule, [19.0, 21.0, 19.0])  # 21 is normal: the streak resets
    assert events == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_changes_nothing(bad: float) -> None:
    rule = _rule(on_delay=2)
    pending, _ = _run(rule, [0.9])
    state, event = evaluate(rule, pending, bad, gateway_id=GW, asset="P-101", source_ts_ns=5, now_ns=6)
    assert state is pending and event is None
    active, _ = _run(rule, [0.9, 0.9])
    state, event = evaluate(rule, active, bad, gateway_id=GW, asset="P-101", source_ts_ns=5, now_ns=6)
    assert state is active and event is None


def test_alarm_ids_are_stable_and_distinct_per_occurrence() -> None:
    rule = _rule()
    _, first = _run(rule, [0.9, 0.1])
    _, again = _run(rule, [0.9, 0.1])
    assert [e.event_id for e in first] == [e.event_id for e in again]
    # Active again before anyone acknowledged it: the same occurrence, its transitions numbered on.
    _, two = _run(rule, [0.9, 0.1, 0.9, 0.1])
    assert {e.alarm_id for e in two} == {first[0].alarm_id}
    assert [(e.event, e.seq, e.state) for e in two] == [
        ("raised", 1, "unack"),
        ("cleared", 2, "rtn_unack"),
        ("raised", 3, "unack"),
        ("cleared", 4, "rtn_unack"),
    ]
    # Once acknowledged and back to normal, the next activation is a new occurrence.
    engine = AlarmEngine([rule], gateway_id=GW)
    (raised,) = engine.decide("pump_ae", "P-101", np.array([0.9]), source_ts_ns=1000, now_ns=1)
    engine.decide("pump_ae", "P-101", np.array([0.1]), source_ts_ns=2000, now_ns=2)
    engine.acknowledge(raised.alarm_id, by="op", now_ns=3)
    (again,) = engine.decide("pump_ae", "P-101", np.array([0.9]), source_ts_ns=4000, now_ns=4)
    assert again.alarm_id != raised.alarm_id and again.seq == 1
    other_asset, _ = evaluate(
        rule, AlarmState(), 0.9, gateway_id=GW, asset="P-102", source_ts_ns=1000, now_ns=1
    )
    assert other_asset.alarm_id != first[0].alarm_id


def test_id_falls_back_to_decision_time_without_source_timestamps() -> None:
    rule = _rule()
    a, _ = evaluate(rule, AlarmState(), 0.9, gateway_id=GW, asset="P-101", source_ts_ns=0, now_ns=111)
    b, _ = evaluate(rule, AlarmState(), 0.9, gateway_id=GW, asset="P-101", source_ts_ns=0, now_ns=222)
    assert a.alarm_id and b.alarm_id and a.alarm_id != b.alarm_id
    assert a.first_abnormal_source_ts_ns == 0


def test_engine_applies_the_rules_of_the_model_for_covered_assets_only() -> None:
    score = _rule(name="score_high", assets=frozenset({"P-101", "P-102"}))
    second = _rule(name="second_value", value_index=1, high=5.0, low=4.0)
    engine = AlarmEngine([score, second], gateway_id=GW)
    assert engine.decide("other_model", "P-101", np.array([9.0, 9.0]), source_ts_ns=1, now_ns=2) == []
    events = engine.decide("pump_ae", "P-102", np.array([0.9, 9.0]), source_ts_ns=1, now_ns=2)
    assert [(e.rule, e.asset) for e in events] == [("score_high", "P-102")]  # second_value covers P-101 only
    events = engine.decide("pump_ae", "P-101", np.array([0.1, 6.0]), source_ts_ns=3, now_ns=4)
    assert [(e.rule, e.value) for e in events] == [("second_value", 6.0)]
    assert [(r.name, asset) for r, asset, _ in engine.active()] == [
        ("score_high", "P-102"),
        ("second_value", "P-101"),
    ]
    assert engine.states.get(("score_high", "P-101"), AlarmState()) == AlarmState()


def test_engine_restored_state_clears_under_the_original_id() -> None:
    rule = _rule()
    first = AlarmEngine([rule], gateway_id=GW)
    (raised,) = first.decide("pump_ae", "P-101", np.array([0.9]), source_ts_ns=10, now_ns=20)
    restarted = AlarmEngine([rule], gateway_id=GW, states=dict(first.states))
    (cleared,) = restarted.decide("pump_ae", "P-101", np.array([0.1]), source_ts_ns=30, now_ns=40)
    assert cleared.event == "cleared" and cleared.alarm_id == raised.alarm_id
    assert restarted.active() == []


def _engine(**rule: Any) -> tuple[AlarmEngine, AlarmEvent]:
    """An engine whose bearing alarm on P-101 has just been raised (at now_ns 1)."""
    engine = AlarmEngine([_rule(**rule)], gateway_id=GW)
    (raised,) = engine.decide("pump_ae", "P-101", np.array([0.9]), source_ts_ns=1000, now_ns=1)
    return engine, raised


def _feed(engine: AlarmEngine, value: float, now_ns: int) -> list[AlarmEvent]:
    return engine.decide("pump_ae", "P-101", np.array([value]), source_ts_ns=now_ns * 1000, now_ns=now_ns)


def test_acknowledge_then_clear_ends_the_occurrence() -> None:
    engine, raised = _engine()
    ack = engine.acknowledge(raised.alarm_id, by="alice", now_ns=2)
    assert (ack.event, ack.state, ack.seq, ack.cause) == ("acknowledged", "acked", 2, "operator:alice")
    assert ack.event_id == f"{raised.alarm_id}:2"
    assert engine.active()[0][2].state == "acked"
    (cleared,) = _feed(engine, 0.1, 3)
    assert (cleared.event, cleared.state, cleared.seq) == ("cleared", "normal", 3)
    assert engine.states[("bearing", "P-101")] == AlarmState() and engine.active() == []
    with pytest.raises(CommandError, match="no open alarm"):
        engine.acknowledge(raised.alarm_id, by="alice", now_ns=4)


def test_acknowledging_a_returned_alarm_makes_it_normal_and_twice_is_refused() -> None:
    engine, raised = _engine()
    (cleared,) = _feed(engine, 0.1, 2)
    assert cleared.state == "rtn_unack" and engine.active() == []
    ack = engine.acknowledge(raised.alarm_id, by="bob", now_ns=3)
    assert (ack.event, ack.state, ack.seq) == ("acknowledged", "normal", 3)
    engine2, raised2 = _engine()
    engine2.acknowledge(raised2.alarm_id, by="bob", now_ns=2)
    with pytest.raises(CommandError, match="is acked, not unacknowledged"):
        engine2.acknowledge(raised2.alarm_id, by="bob", now_ns=3)


def test_off_delay_needs_consecutive_normal_windows() -> None:
    engine, _ = _engine(off_delay=3)
    assert _feed(engine, 0.1, 2) == [] and _feed(engine, 0.1, 3) == []
    assert _feed(engine, 0.9, 4) == []  # abnormal again: the count starts over
    assert _feed(engine, 0.1, 5) == [] and _feed(engine, 0.1, 6) == []
    (cleared,) = _feed(engine, 0.1, 7)
    assert cleared.event == "cleared" and cleared.decided_at_ns == 7


def test_shelved_alarm_is_followed_silently_and_announced_again_on_expiry() -> None:
    engine, raised = _engine()
    shelve = engine.shelve("bearing", "P-101", until_ns=100, by="carol", now_ns=2)
    assert (shelve.event, shelve.state, shelve.alarm_id, shelve.cause) == (
        "shelved",
        "shelved",
        raised.alarm_id,
        "operator:carol",
    )
    assert engine.active() == []
    assert _feed(engine, 0.1, 3) == [] and _feed(engine, 0.9, 4) == []  # no events while shelved
    assert engine.expire_shelves(99) == []
    (back,) = engine.expire_shelves(100)
    # The condition is present when the shelve ends: announced again, to be acknowledged.
    assert (back.event, back.state, back.cause, back.alarm_id) == (
        "unshelved",
        "unack",
        "shelve_expired",
        raised.alarm_id,
    )
    assert [e.seq for e in (raised, shelve, back)] == [1, 2, 3]


def test_unshelving_a_normal_alarm_returns_it_to_normal_and_commands_are_checked() -> None:
    engine = AlarmEngine([_rule()], gateway_id=GW)
    shelve = engine.shelve("bearing", "P-101", until_ns=50, by="dan", now_ns=1)
    assert shelve.state == "shelved" and shelve.seq == 1  # shelving a quiet alarm opens an occurrence
    back = engine.unshelve("bearing", "P-101", by="dan", now_ns=2)
    assert (back.event, back.state, back.alarm_id) == ("unshelved", "normal", shelve.alarm_id)
    assert engine.states.get(("bearing", "P-101"), AlarmState()) == AlarmState()
    with pytest.raises(CommandError, match="not shelved"):
        engine.unshelve("bearing", "P-101", by="dan", now_ns=3)
    with pytest.raises(CommandError, match="in the future"):
        engine.shelve("bearing", "P-101", until_ns=3, by="dan", now_ns=3)
    with pytest.raises(CommandError, match="no alarm 'bearing' on asset 'P-999'"):
        engine.shelve("bearing", "P-999", until_ns=30, by="dan", now_ns=3)


def test_suppression_by_design_hides_the_alarm_until_lifted() -> None:
    engine, raised = _engine()
    (sup,) = engine.set_suppressed("P-101", True, reason="stopped", now_ns=2)
    assert (sup.event, sup.state, sup.cause) == ("suppressed", "suppressed", "design:stopped")
    assert engine.set_suppressed("P-101", True, reason="stopped", now_ns=3) == []  # already suppressed
    assert _feed(engine, 0.1, 4) == []  # the condition ends while suppressed: followed, not announced
    with pytest.raises(CommandError, match="suppressed by design"):
        engine.shelve("bearing", "P-101", until_ns=99, by="eve", now_ns=5)
    (lifted,) = engine.set_suppressed("P-101", False, reason="stopped", now_ns=6)
    assert (lifted.event, lifted.state, lifted.alarm_id, lifted.cause) == (
        "unsuppressed",
        "normal",
        raised.alarm_id,
        "design:running",
    )
    assert engine.active() == []


def _manifest(name: str, kind: str, **extra: Any) -> ModelManifest:
    output: dict[str, Any] = {"kind": kind, "name": "out"}
    output.update(extra)
    return ModelManifest.model_validate(
        {
            "name": name,
            "version": "2.0.0",
            "input": {"window_length": 4, "channels": ["a"]},
            "output": output,
            "normalization": {"mean": [0.0], "std": [1.0]},
            "thresholds": {"high": 0.8, "low": 0.6},
        }
    )


def _config(alarms: list[dict[str, Any]]) -> GatewayConfig:
    models = [
        {"name": "ae", "path": "ae.onnx", "assets": ["P-101", "P-102"]},
        {"name": "clf", "path": "clf.onnx", "assets": ["P-102"]},
    ]
    return pumps_config(models=models, alarms=alarms)


MANIFESTS = {
    "ae": _manifest("ae", "anomaly_score"),
    "clf": _manifest("clf", "class_probabilities", classes=["normal", "bearing", "cavitation"]),
}


def test_build_rules_defaults_from_manifest_and_model() -> None:
    rules = build_rules(
        _config(
            [
                {"name": "r1", "model": "ae"},
                {"name": "r2", "model": "ae", "high": 0.9, "assets": ["P-101"]},
                {"name": "r3", "model": "clf", "output": "cavitation", "high": 0.7, "low": 0.5},
            ]
        ),
        MANIFESTS,
    )
    r1, r2, r3 = rules
    assert (r1.high, r1.low, r1.assets, r1.value_index) == (0.8, 0.6, frozenset({"P-101", "P-102"}), 0)
    assert (r1.kind, r1.model_version, r1.on_delay, r1.direction) == ("anomaly_score", "2.0.0", 1, "above")
    assert (r2.high, r2.low, r2.assets) == (0.9, 0.9, frozenset({"P-101"}))
    assert (r3.value_index, r3.high, r3.low, r3.kind) == (2, 0.7, 0.5, "class_probabilities")


def test_build_rules_rejects_unknown_output_naming_path_and_valid_names() -> None:
    cfg = _config([{"name": "r1", "model": "ae"}, {"name": "r2", "model": "clf", "output": "score"}])
    with pytest.raises(ConfigError) as info:
        build_rules(cfg, MANIFESTS)
    msg = str(info.value)
    assert "alarms[1].output" in msg
    for valid in ("normal", "bearing", "cavitation"):
        assert valid in msg


def test_build_rules_checks_thresholds_taken_from_the_manifest() -> None:
    cfg = _config([{"name": "rul_low", "model": "ae", "direction": "below"}])  # manifest low 0.6 < high 0.8
    with pytest.raises(ConfigError, match=r"alarms\[0\]\.low"):
        build_rules(cfg, MANIFESTS)
