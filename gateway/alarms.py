"""Alarm decisions: pure functions of (rule, previous state, value, time), apart from scoring."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from gateway.config import GatewayConfig
from gateway.errors import ConfigError
from gateway.manifest import ModelManifest

# What happened: the process condition began or ended, or an operator or the system acted on the alarm.
EventType = Literal["raised", "cleared", "acknowledged", "shelved", "unshelved", "suppressed", "unsuppressed"]
# ISA-18.2 alarm states: normal; active and unacknowledged; active and acknowledged; returned to
# normal but not yet acknowledged; shelved by an operator (until an expiry); suppressed by design.
LifecycleState = Literal["normal", "unack", "acked", "rtn_unack", "shelved", "suppressed"]
ANNUNCIATED: frozenset[str] = frozenset({"unack", "acked"})


class CommandError(ValueError):
    """An operator command that does not apply to the alarm as it stands; nothing was changed."""


@dataclass(frozen=True)
class AlarmEvent:
    """One transition of one alarm; `alarm_id` is the same for every transition of one occurrence."""

    alarm_id: str
    event_id: str  # alarm_id + ":" + seq; unique per transition, consumers dedupe on it
    event: EventType
    gateway_id: str
    asset: str
    rule: str
    kind: str  # the model's output kind: anomaly_score | class_probabilities | rul | system
    output: str  # which model value: score, rul, or a class name
    severity: str  # the rule's priority: low | medium | high | critical
    value: float
    threshold: float
    model: str
    model_version: str
    first_abnormal_source_ts_ns: int  # PLC source time of the last sample of the first abnormal window
    decided_at_ns: int  # gateway UTC wall clock when the decision was made
    state: LifecycleState = "unack"  # the alarm's state after this transition
    seq: int = 1  # this transition's number within the occurrence, from 1
    cause: str = "process"  # process, operator:<who>, shelve_expired, design:<why>
    shelved_until_ns: int = 0  # with state shelved: when the shelve ends by itself (wall clock)


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
    off_delay: int = 1  # consecutive normal windows before an active alarm clears


@dataclass(frozen=True)
class AlarmState:
    """Where one (rule, asset) alarm stands; the idle state is `AlarmState()`.

    `abnormal` is the process condition after the on- and off-delays. It is followed while the
    alarm is shelved or suppressed too, so that unshelving can announce a condition still present.
    An occurrence (`alarm_id`) begins when the alarm leaves normal and ends when it is normal again.
    """

    state: LifecycleState = "normal"
    abnormal: bool = False
    streak: int = 0  # consecutive windows towards the next change of `abnormal` (on- or off-delay)
    first_abnormal_source_ts_ns: int = 0  # source time of the first window of the onset streak
    alarm_id: str | None = None
    seq: int = 0  # transitions of the occurrence so far
    raised_value: float | None = None
    raised_at_ns: int = 0
    shelved_until_ns: int = 0  # wall clock ns at which a shelve ends by itself

    @property
    def active(self) -> bool:
        """True while the alarm is annunciated: active and not shelved or suppressed."""
        return self.state in ANNUNCIATED


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
                off_delay=r.off_delay,
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
    """One window's value through the rule's delays and hysteresis and the alarm's lifecycle."""
    if not math.isfinite(value):
        return state, None
    above = rule.direction == "above"
    if not state.abnormal:
        if not ((value >= rule.high) if above else (value <= rule.high)):
            return (replace(state, streak=0) if state.streak else state), None
        first = state.first_abnormal_source_ts_ns if state.streak else source_ts_ns
        if state.streak + 1 < rule.on_delay:
            return replace(state, streak=state.streak + 1, first_abnormal_source_ts_ns=first), None
        onset = replace(state, abnormal=True, streak=0, first_abnormal_source_ts_ns=first)
        if state.state == "normal":
            # Without PLC timestamps, the decision time keeps distinct occurrences distinct.
            alarm_id = alarm_id_for(gateway_id, asset, rule.name, first or now_ns)
            onset = replace(onset, alarm_id=alarm_id, seq=0)
        elif state.state != "rtn_unack":
            return onset, None  # shelved or suppressed: followed, not announced
        # From rtn_unack the occurrence, still unacknowledged, is active again under its id.
        raised = replace(onset, state="unack", raised_value=value, raised_at_ns=now_ns)
        return _transition(rule, raised, "raised", value, rule.high, gateway_id, asset, now_ns, "process")
    if not ((value < rule.low) if above else (value > rule.low)):
        return (replace(state, streak=0) if state.streak else state), None
    if state.streak + 1 < rule.off_delay:
        return replace(state, streak=state.streak + 1), None
    offset = replace(state, abnormal=False, streak=0)
    if state.state not in ANNUNCIATED:
        return offset, None  # shelved or suppressed
    after: LifecycleState = "rtn_unack" if state.state == "unack" else "normal"
    return _transition(
        rule, replace(offset, state=after), "cleared", value, rule.low, gateway_id, asset, now_ns, "process"
    )


def _transition(
    rule: AlarmRule,
    state: AlarmState,
    event: EventType,
    value: float,
    threshold: float,
    gateway_id: str,
    asset: str,
    now_ns: int,
    cause: str,
) -> tuple[AlarmState, AlarmEvent]:
    """The next transition of `state`'s occurrence: the new state (the occurrence over once normal) and its event."""
    assert state.alarm_id is not None
    seq = state.seq + 1
    ev = AlarmEvent(
        alarm_id=state.alarm_id,
        event_id=f"{state.alarm_id}:{seq}",
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
        state=state.state,
        seq=seq,
        cause=cause,
        shelved_until_ns=state.shelved_until_ns,
    )
    if state.state == "normal":
        return AlarmState(), ev
    return replace(state, seq=seq), ev


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

    def _rule(self, rule: str, asset: str) -> AlarmRule:
        """The rule called `rule` covering `asset`; CommandError if there is none."""
        for r in self.rules:
            if r.name == rule and asset in r.assets:
                return r
        raise CommandError(f"no alarm {rule!r} on asset {asset!r}")

    def _operator(
        self, rule: AlarmRule, asset: str, state: AlarmState, event: EventType, cause: str, now_ns: int
    ) -> AlarmEvent:
        """Record an operator or system transition of (rule, asset) to `state`; an occurrence starts if none runs."""
        if state.alarm_id is None:
            state = replace(state, alarm_id=alarm_id_for(self.gateway_id, asset, rule.name, now_ns), seq=0)
        value = state.raised_value if state.raised_value is not None else math.nan
        new, ev = _transition(rule, state, event, value, rule.high, self.gateway_id, asset, now_ns, cause)
        self.states[(rule.name, asset)] = new
        return ev

    def acknowledge(self, alarm_id: str, *, by: str, now_ns: int) -> AlarmEvent:
        """An operator acknowledges an unacknowledged alarm: active -> acked, returned -> normal."""
        key = next((k for k, st in self.states.items() if st.alarm_id == alarm_id), None)
        if key is None:
            raise CommandError(f"no open alarm with id {alarm_id!r}")
        (name, asset), state = key, self.states[key]
        if state.state not in ("unack", "rtn_unack"):
            raise CommandError(f"alarm {alarm_id} is {state.state}, not unacknowledged")
        after: LifecycleState = "acked" if state.state == "unack" else "normal"
        rule = self._rule(name, asset)
        return self._operator(rule, asset, replace(state, state=after), "acknowledged", f"operator:{by}", now_ns)

    def shelve(self, rule: str, asset: str, *, until_ns: int, by: str, now_ns: int) -> AlarmEvent:
        """An operator shelves an alarm until `until_ns` (wall clock): it is followed but not announced."""
        r = self._rule(rule, asset)
        state = self.states.get((rule, asset), IDLE)
        if state.state == "suppressed":
            raise CommandError(f"alarm {rule!r} on {asset!r} is suppressed by design; shelving it changes nothing")
        if until_ns <= now_ns:
            raise CommandError("the shelve must end in the future")
        shelved = replace(state, state="shelved", shelved_until_ns=until_ns)
        return self._operator(r, asset, shelved, "shelved", f"operator:{by}", now_ns)

    def unshelve(self, rule: str, asset: str, *, by: str, now_ns: int) -> AlarmEvent:
        """An operator unshelves an alarm: announced again (unacknowledged) if its condition is present."""
        r = self._rule(rule, asset)
        state = self.states.get((rule, asset), IDLE)
        if state.state != "shelved":
            raise CommandError(f"alarm {rule!r} on {asset!r} is {state.state}, not shelved")
        return self._operator(r, asset, self._resumed(state), "unshelved", f"operator:{by}", now_ns)

    def expire_shelves(self, now_ns: int) -> list[AlarmEvent]:
        """Unshelve every alarm whose shelve has run out by `now_ns`."""
        due = [k for k, st in self.states.items() if st.state == "shelved" and st.shelved_until_ns <= now_ns]
        return [
            self._operator(self._rule(*key), key[1], self._resumed(self.states[key]), "unshelved", "shelve_expired", now_ns)
            for key in sorted(due)
        ]

    def set_suppressed(self, asset: str, suppressed: bool, *, reason: str, now_ns: int) -> list[AlarmEvent]:
        """Suppress by design (e.g. the asset is stopped) every alarm of `asset`, or lift the suppression."""
        events = []
        for rule in self.rules:
            # System alarms (comm_loss) are about the gateway's view of the plant, not the machine.
            if asset not in rule.assets or rule.kind == "system":
                continue
            state = self.states.get((rule.name, asset), IDLE)
            if suppressed and state.state != "suppressed":
                new = replace(state, state="suppressed", shelved_until_ns=0)
                events.append(self._operator(rule, asset, new, "suppressed", f"design:{reason}", now_ns))
            elif not suppressed and state.state == "suppressed":
                events.append(
                    self._operator(rule, asset, self._resumed(state), "unsuppressed", f"design:{reason}", now_ns)
                )
        return events

    @staticmethod
    def _resumed(state: AlarmState) -> AlarmState:
        """Back from shelved or suppressed: unacknowledged if the condition is present, else normal."""
        return replace(state, state="unack" if state.abnormal else "normal", shelved_until_ns=0)

    def active(self) -> list[tuple[AlarmRule, str, AlarmState]]:
        """Active alarms as (rule, asset, state), sorted by rule name and asset."""
        rules = {r.name: r for r in self.rules}
        return [
            (rules[name], asset, state)
            for (name, asset), state in sorted(self.states.items(), key=lambda kv: kv[0])
            if state.active and name in rules
        ]
