"""Alarm decisions: pure functions of (rule, previous state, value, time), apart from scoring."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from gateway.config import GatewayConfig
from gateway.errors import ConfigError
from gateway.manifest import ModelManifest

EventType = Literal["raised", "cleared"]


@dataclass(frozen=True)
class AlarmEvent:
    """One transition of one alarm occurrence; `alarm_id` is the same for its raise and its clear."""

    alarm_id: str
    event_id: str  # alarm_id + ":" + event; unique per transition, consumers dedupe on it
    event: EventType
    gateway_id: str
    asset: str
    rule: str
    kind: str  # the model's output kind: anomaly_score | class_probabilities | rul
    output: str  # which model value: score, rul, or a class name
    severity: str
    value: float
    threshold: float
    model: str
    model_version: str
    first_abnormal_source_ts_ns: int  # PLC source time of the last sample of the first abnormal window
    decided_at_ns: int  # gateway UTC wall clock when the decision was made


@dataclass(frozen=True)
class AlarmRule:
    """One alarm rule resolved against its model's manifest: which value, thresholds, and assets."""

    name: str
    model: str
    output: str
    value_index: int  # index into the model's value vector (ModelManifest.value_names())
    high: float  # raise level: value >= high (above) or value <= high (below)
    low: float  # clear level: value < low (above) or value > low (below)
    direction: Literal["above", "below"]
    on_delay: int  # consecutive abnormal windows before the alarm is raised
    severity: str
    kind: str  # the model's output kind
    model_version: str
    assets: frozenset[str]


@dataclass(frozen=True)
class AlarmState:
    """Where one (rule, asset) pair stands; the idle state is `AlarmState()`."""

    active: bool = False
    streak: int = 0  # consecutive abnormal windows while not active
    first_abnormal_source_ts_ns: int = 0  # source time of the first window of the streak
    alarm_id: str | None = None  # set while active
    raised_value: float | None = None
    raised_at_ns: int = 0


IDLE = AlarmState()
# Fixed namespace so alarm ids are reproducible across restarts and gateways (uuid5 is a hash).
_ALARM_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:edge-gateway:alarm")


COMM_LOSS = "comm_loss"


def comm_loss_model(source: str) -> str:
    """The pseudo model name under which a source's comm_loss rule is decided."""
    return f"source:{source}"


def comm_loss_targets(cfg: GatewayConfig) -> dict[str, list[str]]:
    """Per source with comm_loss enabled, the names its alarm is raised on: its assets, or itself."""
    return {
        s.name: [s.name] if s.comm_loss.scope == "source" else [a.name for a in cfg.assets if a.source == s.name]
        for s in cfg.sources
        if s.comm_loss.enabled
    }


def comm_loss_rules(cfg: GatewayConfig, *, version: str) -> list[AlarmRule]:
    """One system rule per source: value = seconds disconnected, raised at the configured delay.

    It goes through the same engine, store, outbox and topic as model alarms, so SCADA sees it on each
    asset the source feeds (or once under the source's name, with scope source), and a restart
    restores it like any other alarm.
    """
    targets = comm_loss_targets(cfg)
    return [
        AlarmRule(
            name=COMM_LOSS,
            model=comm_loss_model(s.name),
            output="disconnected_s",
            value_index=0,
            high=s.comm_loss.delay_s,
            low=s.comm_loss.delay_s,  # cleared as soon as the source is back (0 s disconnected)
            direction="above",
            on_delay=1,
            severity=s.comm_loss.severity,
            kind="system",
            model_version=version,
            assets=frozenset(targets[s.name]),
        )
        for s in cfg.sources
        if s.name in targets
    ]


def build_rules(cfg: GatewayConfig, manifests: Mapping[str, ModelManifest]) -> list[AlarmRule]:
    """Resolve the configured alarm rules; thresholds default to the manifest's, assets to the model's."""
    models = {m.name: m for m in cfg.models}
    rules: list[AlarmRule] = []
    problems: list[str] = []
    for i, r in enumerate(cfg.alarms):
        manifest = manifests.get(r.model)
        if manifest is None or r.model not in models:
            problems.append(f"alarms[{i}].model: no loaded model {r.model!r}; loaded: {sorted(manifests)}")
            continue
        names = manifest.value_names()
        if r.output not in names:
            problems.append(
                f"alarms[{i}].output: model {r.model!r} has no output {r.output!r}; valid: {', '.join(names)}"
            )
            continue
        high = manifest.thresholds.high if r.high is None else r.high
        if r.low is not None:
            low = r.low
        elif r.high is not None:
            low = r.high  # a lone high means no hysteresis band
        else:
            low = manifest.thresholds.low
        if (low > high) if r.direction == "above" else (low < high):
            rel = "<=" if r.direction == "above" else ">="
            problems.append(
                f"alarms[{i}].low: low {low} must be {rel} high {high} for direction {r.direction} "
                f"(thresholds not given in the rule come from the manifest of {r.model!r})"
            )
            continue
        rules.append(
            AlarmRule(
                name=r.name,
                model=r.model,
                output=r.output,
                value_index=names.index(r.output),
                high=high,
                low=low,
                direction=r.direction,
                on_delay=r.on_delay,
                severity=r.severity,
                kind=manifest.output.kind,
                model_version=manifest.version,
                assets=frozenset(r.assets if r.assets is not None else models[r.model].assets),
            )
        )
    if problems:
        raise ConfigError(problems)
    return rules


def alarm_id_for(gateway_id: str, asset: str, rule: str, first_ts_ns: int) -> str:
    """Deterministic id of one alarm occurrence, so a replayed decision dedupes downstream."""
    return str(uuid.uuid5(_ALARM_NAMESPACE, f"{gateway_id}/{asset}/{rule}/{first_ts_ns}"))


def evaluate(
    rule: AlarmRule,
    state: AlarmState,
    value: float,
    *,
    gateway_id: str,
    asset: str,
    source_ts_ns: int,
    now_ns: int,
) -> tuple[AlarmState, AlarmEvent | None]:
    """One window's value through the rule's on-delay and hysteresis; returns the new state and any event."""
    if not math.isfinite(value):
        return state, None
    above = rule.direction == "above"
    if state.active:
        if (value < rule.low) if above else (value > rule.low):
            return IDLE, _event(rule, state, "cleared", value, rule.low, gateway_id, asset, now_ns)
        return state, None
    if not ((value >= rule.high) if above else (value <= rule.high)):
        return (IDLE if state.streak else state), None
    first = state.first_abnormal_source_ts_ns if state.streak else source_ts_ns
    streak = state.streak + 1
    if streak < rule.on_delay:
        return AlarmState(streak=streak, first_abnormal_source_ts_ns=first), None
    # Without PLC timestamps, the decision time keeps distinct occurrences distinct.
    alarm_id = alarm_id_for(gateway_id, asset, rule.name, first or now_ns)
    raised = AlarmState(
        active=True,
        first_abnormal_source_ts_ns=first,
        alarm_id=alarm_id,
        raised_value=value,
        raised_at_ns=now_ns,
    )
    return raised, _event(rule, raised, "raised", value, rule.high, gateway_id, asset, now_ns)


def _event(
    rule: AlarmRule,
    state: AlarmState,
    event: EventType,
    value: float,
    threshold: float,
    gateway_id: str,
    asset: str,
    now_ns: int,
) -> AlarmEvent:
    assert state.alarm_id is not None
    return AlarmEvent(
        alarm_id=state.alarm_id,
        event_id=f"{state.alarm_id}:{event}",
        event=event,
        gateway_id=gateway_id,
        asset=asset,
        rule=rule.name,
        kind=rule.kind,
        output=rule.output,
        severity=rule.severity,
        value=value,
        threshold=threshold,
        model=rule.model,
        model_version=rule.model_version,
        first_abnormal_source_ts_ns=state.first_abnormal_source_ts_ns,
        decided_at_ns=now_ns,
    )


class AlarmEngine:
    """Keeps an AlarmState per (rule name, asset) and applies a model's rules to each window's values."""

    def __init__(
        self,
        rules: Sequence[AlarmRule],
        *,
        gateway_id: str,
        states: Mapping[tuple[str, str], AlarmState] | None = None,
    ) -> None:
        self.gateway_id = gateway_id
        self.rules = list(rules)
        self._by_model: dict[str, list[AlarmRule]] = {}
        for rule in self.rules:
            self._by_model.setdefault(rule.model, []).append(rule)
        # Restored states let an active alarm survive a restart and clear under its original id.
        self.states: dict[tuple[str, str], AlarmState] = dict(states or {})

    def decide(
        self, model: str, asset: str, values: np.ndarray, *, source_ts_ns: int, now_ns: int
    ) -> list[AlarmEvent]:
        """Apply every rule of `model` that covers `asset` to one window's value vector."""
        events: list[AlarmEvent] = []
        for rule in self._by_model.get(model, ()):
            if asset not in rule.assets:
                continue
            key = (rule.name, asset)
            state = self.states.get(key, IDLE)
            new, event = evaluate(
                rule,
                state,
                float(values[rule.value_index]),
                gateway_id=self.gateway_id,
                asset=asset,
                source_ts_ns=source_ts_ns,
                now_ns=now_ns,
            )
            if new is not state:
                self.states[key] = new
            if event is not None:
                events.append(event)
        return events

    def active(self) -> list[tuple[AlarmRule, str, AlarmState]]:
        """Active alarms as (rule, asset, state), sorted by rule name and asset."""
        rules = {r.name: r for r in self.rules}
        return [
            (rules[name], asset, state)
            for (name, asset), state in sorted(self.states.items(), key=lambda kv: kv[0])
            if state.active and name in rules
        ]
