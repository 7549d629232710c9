"""Alarm decisions: on-delay, hysteresis, direction, ids, rule building from config and manifests."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pytest

from gateway.alarms import AlarmEngine, AlarmEvent, AlarmRule, AlarmState, build_rules, evaluate
from gateway.config import GatewayConfig
from gateway.errors import ConfigError
from gateway.manifest import ModelManifest

GW = "gw01"


def _rule(
    *,
    high: float = 0.8,
    low: float = 0.6,
    direction: Literal["above", "below"] = "above",
    on_delay: int = 1,
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
    assert raised.event_id == f"{raised.alarm_id}:raised"
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
    assert state == AlarmState()
    assert events[0].alarm_id == events[1].alarm_id
    assert events[1].event_id == f"{events[0].alarm_id}:cleared"
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
    _, two = _run(rule, [0.9, 0.1, 0.9, 0.1])
    assert two[0].alarm_id == first[0].alarm_id
    assert two[2].alarm_id == two[3].alarm_id != two[0].alarm_id
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
    return GatewayConfig.model_validate(
        {
            "sources": [{"name": "plc1", "endpoint": "opc.tcp://127.0.0.1:4840"}],
            "assets": [
                {
                    "name": n,
                    "source": "plc1",
                    "window": {"length": 4, "hop": 1},
                    "tags": [{"name": "a", "node_id": f"ns=2;s={n}.a"}],
                }
                for n in ("P-101", "P-102")
            ],
            "models": [
                {"name": "ae", "path": "ae.onnx", "assets": ["P-101", "P-102"]},
                {"name": "clf", "path": "clf.onnx", "assets": ["P-102"]},
            ],
            "alarms": alarms,
        }
    )


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
