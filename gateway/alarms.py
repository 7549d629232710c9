"""Alarm decisions: pure functions of (rule, previous state, value, time). Filled in by the alarms work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
