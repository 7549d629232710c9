"""Alarm decisions: pure functions of (rule, previous state, value, time), apart from scoring."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from gateway.config import GatewayConfig
from gateway.errors import ConfigError
from gateway.manifest import ModelManifest

if TYPE_CHECKING:
    from gateway.flood import FloodTracker

logger = logging.getLogger(__name__)

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
    command_id: str | None = None  # the operator command that caused it, when that command had an id


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
        # Cleared as soon as the source is back (0 s disconnected).
        system_rule(
            COMM_LOSS, model=comm_loss_model(s.name), output="disconnected_s", level=s.comm_loss.delay_s,
            severity=s.comm_loss.severity, version=version, assets=frozenset(targets[s.name]),
        )  # fmt: skip
        for s in cfg.sources
        if s.name in targets
    ]


def system_rule(
    name: str, *, model: str, output: str, level: float, severity: str, version: str, assets: frozenset[str]
) -> AlarmRule:
    """A gateway's own alarm on one value: raised when it reaches `level`, cleared below it, no delays."""
    return AlarmRule(
        name=name, model=model, output=output, value_index=0, high=level, low=level, direction="above",
        on_delay=1, severity=severity, kind="system", model_version=version, assets=assets,
    )  # fmt: skip


FLOOD = "flood"
# Why an asset's model alarms are suppressed by design, with the word that ends each reason (the
# cause of the `unsuppressed` event when it was the last): the running tag, and flood control.
SUPPRESSION_REASONS: Mapping[str, str] = {"stopped": "running", FLOOD: "flood_ended"}
# A model runs on a lesser inference backend than it should (its rules: gateway.degraded).
INFERENCE_DEGRADED = "inference_degraded"


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
    followed = follow(rule, state, value, source_ts_ns=source_ts_ns)
    if followed.abnormal == state.abnormal:
        return followed, None
    return announce(rule, followed, value, gateway_id=gateway_id, asset=asset, now_ns=now_ns)


def follow(rule: AlarmRule, state: AlarmState, value: float, *, source_ts_ns: int) -> AlarmState:
    """The process condition (`abnormal`) after one window's value, its delays and hysteresis; the
    lifecycle state is left alone. The same object comes back when nothing changed."""
    if not math.isfinite(value):
        return state
    above = rule.direction == "above"
    if not state.abnormal:
        if not ((value >= rule.high) if above else (value <= rule.high)):
            return replace(state, streak=0) if state.streak else state
        first = state.first_abnormal_source_ts_ns if state.streak else source_ts_ns
        if state.streak + 1 < rule.on_delay:
            return replace(state, streak=state.streak + 1, first_abnormal_source_ts_ns=first)
        return replace(state, abnormal=True, streak=0, first_abnormal_source_ts_ns=first)
    if not ((value < rule.low) if above else (value > rule.low)):
        return replace(state, streak=0) if state.streak else state
    if state.streak + 1 < rule.off_delay:
        return replace(state, streak=state.streak + 1)
    return replace(state, abnormal=False, streak=0)


def announce(
    rule: AlarmRule, state: AlarmState, value: float, *, gateway_id: str, asset: str, now_ns: int
) -> tuple[AlarmState, AlarmEvent | None]:
    """The lifecycle's answer to the condition having just begun (`state.abnormal`) or ended."""
    if state.abnormal:
        if state.state == "normal":
            # Without PLC timestamps, the decision time keeps distinct occurrences distinct.
            alarm_id = alarm_id_for(gateway_id, asset, rule.name, state.first_abnormal_source_ts_ns or now_ns)
            state = replace(state, alarm_id=alarm_id, seq=0)
        elif state.state != "rtn_unack":
            return state, None  # shelved or suppressed: followed, not announced
        # From rtn_unack the occurrence, still unacknowledged, is active again under its id.
        raised = replace(state, state="unack", raised_value=value, raised_at_ns=now_ns)
        return _transition(rule, raised, "raised", value, rule.high, gateway_id, asset, now_ns, "process")
    if state.state not in ANNUNCIATED:
        return state, None  # shelved or suppressed
    after: LifecycleState = "rtn_unack" if state.state == "unack" else "normal"
    return _transition(
        rule, replace(state, state=after), "cleared", value, rule.low, gateway_id, asset, now_ns, "process"
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
        suppressed: Mapping[str, Collection[str]] | None = None,
        flood: FloodTracker | None = None,
        now_ns: int | None = None,
    ) -> None:
        """`states` and `suppressed` as restore_alarms gives them; `now_ns`: a restored flood's calm starts."""
        self.gateway_id = gateway_id
        self.rules = list(rules)
        self._by_model: dict[str, list[AlarmRule]] = {}
        for rule in self.rules:
            self._by_model.setdefault(rule.model, []).append(rule)
        # Restored states let an active alarm survive a restart and clear under its original id.
        self.states: dict[tuple[str, str], AlarmState] = dict(states or {})
        # Per asset, why its model alarms are suppressed by design (SUPPRESSION_REASONS); restored
        # with the states, so that one reason ending cannot lift a suppression another still holds.
        self.suppressed: dict[str, set[str]] = {a: set(r) for a, r in (suppressed or {}).items() if r}
        self._flood_rule = next((r for r in self.rules if r.name == FLOOD and r.kind == "system"), None)
        # Without the flood rule (flood_rules: off, or no model rules) there is nothing to flood.
        self.flood = flood if self._flood_rule is not None else None
        if self.flood is not None:
            start = time.time_ns() if now_ns is None else now_ns
            for asset in sorted(a for a, reasons in self.suppressed.items() if FLOOD in reasons):
                self.flood.restore(asset, start)

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
            value = float(values[rule.value_index])
            followed = follow(rule, state, value, source_ts_ns=source_ts_ns)
            if followed is state:
                continue
            self.states[key] = followed
            if followed.abnormal == state.abnormal:
                continue
            if followed.abnormal and rule.kind != "system" and self.flood is not None:
                # Counted before it is announced: the onset that starts a flood is summarized by the
                # flood alarm, its own alarm suppressed with the others.
                events += self._count_onset(asset, now_ns)
            new, event = announce(
                rule, self.states[key], value, gateway_id=self.gateway_id, asset=asset, now_ns=now_ns
            )
            self.states[key] = new
            if event is not None:
                events.append(event)
        return events

    def _count_onset(self, asset: str, now_ns: int) -> list[AlarmEvent]:
        """Count an onset on `asset`; if it starts a flood: the flood alarm, then the suppressions."""
        assert self.flood is not None
        count = self.flood.onset(asset, now_ns)
        if count is None:
            return []
        logger.warning("alarm flood on %s: %d onsets within %g s", asset, count, self.flood.cfg.window_s)
        return self._flood(asset, True, count, now_ns)

    def end_floods(self, now_ns: int) -> list[AlarmEvent]:
        """End the flood of each asset calm for `calm_s`: its flood alarm clears, its suppression lifts."""
        if self.flood is None:
            return []
        return [e for asset, n in self.flood.calmed(now_ns) for e in self._flood(asset, False, n, now_ns)]

    def _flood(self, asset: str, present: bool, value: int, now_ns: int) -> list[AlarmEvent]:
        """The flood alarm's condition begins or ends on `asset`, and with it the flood's suppression."""
        assert self._flood_rule is not None
        key = (FLOOD, asset)
        state = self.states.get(key, IDLE)
        changed = replace(state, abnormal=present, streak=0, first_abnormal_source_ts_ns=0)
        self.states[key], event = announce(
            self._flood_rule, changed, float(value), gateway_id=self.gateway_id, asset=asset, now_ns=now_ns
        )
        return ([event] if event is not None else []) + self.set_suppressed(
            asset, present, reason=FLOOD, now_ns=now_ns
        )

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
        """Add or lift one reason (SUPPRESSION_REASONS) to suppress the model alarms of `asset` by design.

        They are suppressed while any reason holds: the first reason suppresses them (cause
        `design:<reason>`), lifting the last resumes them (cause `design:<its lifted word>`), and
        lifting one while another holds changes nothing.
        """
        if reason not in SUPPRESSION_REASONS:
            raise ValueError(
                f"unknown suppression reason {reason!r}; known: {', '.join(SUPPRESSION_REASONS)}"
            )
        reasons = self.suppressed.get(asset, set())
        if suppressed:
            self.suppressed[asset] = reasons | {reason}
            cause = f"design:{reason}"
        else:
            if reason in reasons:
                reasons = reasons - {reason}
                self.suppressed[asset] = reasons
            if reasons:
                return []
            self.suppressed.pop(asset, None)
            cause = f"design:{SUPPRESSION_REASONS[reason]}"
        events = []
        for rule in self.rules:
            # System alarms (comm_loss, flood) are about the gateway's view of the plant, not the machine.
            if asset not in rule.assets or rule.kind == "system":
                continue
            state = self.states.get((rule.name, asset), IDLE)
            if suppressed and state.state != "suppressed":
                new = replace(state, state="suppressed", shelved_until_ns=0)
                events.append(self._operator(rule, asset, new, "suppressed", cause, now_ns))
            elif not suppressed and state.state == "suppressed":
                resumed = self._resumed(state)
                events.append(self._operator(rule, asset, resumed, "unsuppressed", cause, now_ns))
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
