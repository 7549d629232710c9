"""MQTT topics and payloads: what the gateway publishes, as bytes, independent of the client.

Alarm payload (JSON, schema 2): alarm_id, event_id (alarm_id:seq), event (raised, cleared,
acknowledged, shelved, unshelved, suppressed, unsuppressed), gateway_id, site, asset, rule, kind,
output, severity, value, threshold, model, model_version, first_abnormal_source_ts (ISO 8601 UTC,
ms, "Z"; null when the PLC sends no timestamps), decided_at, state (after the transition), seq,
cause, shelved_until (or null), command_id (or null), schema.
Non-finite numbers are sent as null. Consumers dedupe on event_id: delivery is at least once.

Score payload (only with mqtt.publish_scores; schema 2): message_id, asset, model, model_version,
values {name: number}, window_end_source_ts, decided_at, schema.

Status payload (retained, also the Last Will; schema 3): message_id, state ("online" | "offline"),
gateway_id, version, started_at, inference ({model: {backend, fallbacks: [{backend, reason,
degraded}]}}, or null before the models are loaded), stats (periodic statuses only, else null), schema.

Every message carries a stable id: an alarm event's event_id, the others' message_id (MessageIds).
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from gateway.alarms import AlarmEvent
from gateway.config import MqttConfig
from gateway.store import StoreStats

# Each payload kind has its own version: alarm events became 2 with the alarm lifecycle and 3 with
# command_id; scores and status became 2 together, with message_id (and status with stats); status
# became 3 with inference.
ALARM_SCHEMA = 3
STATUS_SCHEMA = 3
SCORE_SCHEMA = 2
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class MessageIds:
    """Ids for messages that are not alarm events, unique per gateway process: `{gateway_id}:{boot}:{n}`.

    A message keeps its id when it is re-sent (from the outbox, after a reconnect), so a consumer can
    drop the duplicates at-least-once delivery produces. The boot part is random rather than the
    start time: a Jetson without a battery-backed clock may start twice at the same wall time.
    """

    def __init__(self, gateway_id: str) -> None:
        self.prefix = f"{gateway_id}:{uuid.uuid4().hex[:12]}"
        self._counter = itertools.count(1)

    def next(self) -> str:
        """A new id."""
        return f"{self.prefix}:{next(self._counter)}"

    def named(self, name: str) -> str:
        """The id of a message that is the same for the whole process (the birth and the will)."""
        return f"{self.prefix}:{name}"


def iso_utc_or_none(ns: int) -> str | None:
    """Like iso_utc, but None for 0, which means the PLC sent no timestamp (not 1970)."""
    return iso_utc(ns) if ns else None


def iso_utc(ns: int) -> str:
    """Nanoseconds since the epoch as ISO 8601 UTC with milliseconds and 'Z'."""
    dt = _EPOCH + timedelta(microseconds=ns // 1000)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alarm_topic(cfg: MqttConfig, *, gateway_id: str, event: AlarmEvent) -> str:
    """The topic an alarm event is published to."""
    return cfg.alarm_topic.format(
        prefix=cfg.topic_prefix, site=cfg.site, gateway_id=gateway_id,
        asset=event.asset, rule=event.rule, severity=event.severity,
    )  # fmt: skip


def status_topic(cfg: MqttConfig, gateway_id: str) -> str:
    """The topic of the gateway's retained online/offline status."""
    return cfg.status_topic.format(prefix=cfg.topic_prefix, site=cfg.site, gateway_id=gateway_id)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def alarm_payload(event: AlarmEvent, *, site: str) -> bytes:
    """The compact JSON for one alarm event (field list in the module docstring)."""
    return _dumps({
        "alarm_id": event.alarm_id, "event_id": event.event_id, "event": event.event,
        "gateway_id": event.gateway_id, "site": site, "asset": event.asset, "rule": event.rule,
        "kind": event.kind, "output": event.output, "severity": event.severity,
        "value": _finite(event.value), "threshold": _finite(event.threshold),
        "model": event.model, "model_version": event.model_version,
        "first_abnormal_source_ts": iso_utc_or_none(event.first_abnormal_source_ts_ns),
        "decided_at": iso_utc(event.decided_at_ns), "state": event.state, "seq": event.seq,
        "cause": event.cause, "shelved_until": iso_utc_or_none(event.shelved_until_ns),
        "command_id": event.command_id, "schema": ALARM_SCHEMA,
    })  # fmt: skip


def score_topic(cfg: MqttConfig, *, gateway_id: str, asset: str, model: str) -> str:
    """The topic of one asset's per-window model outputs."""
    return cfg.score_topic.format(
        prefix=cfg.topic_prefix, site=cfg.site, gateway_id=gateway_id, asset=asset, model=model
    )


def score_payload(
    *,
    message_id: str,
    asset: str,
    model: str,
    model_version: str,
    values: dict[str, float],
    source_ts_ns: int,
    decided_at_ns: int,
) -> bytes:
    """The compact JSON of one window's model outputs."""
    return _dumps({
        "message_id": message_id, "asset": asset, "model": model, "model_version": model_version,
        "values": {k: _finite(v) for k, v in values.items()},
        "window_end_source_ts": iso_utc_or_none(source_ts_ns), "decided_at": iso_utc(decided_at_ns),
        "schema": SCORE_SCHEMA,
    })  # fmt: skip


def status_payload(
    state: Literal["online", "offline"], *, message_id: str, gateway_id: str, version: str, started_at: str,
    inference: dict[str, Any] | None = None, stats: dict[str, Any] | None = None,
) -> bytes:  # fmt: skip
    """The compact JSON of the retained status message; `inference` as gateway.degraded.inference_status
    gives it, `stats` in the periodic ones (see status_stats)."""
    return _dumps({
        "message_id": message_id, "state": state, "gateway_id": gateway_id, "version": version,
        "started_at": started_at, "inference": inference, "stats": stats, "schema": STATUS_SCHEMA,
    })  # fmt: skip


def status_stats(
    *, at_ns: int, active_alarms: int, store: StoreStats, scores_published: int, scores_dropped: int
) -> dict[str, Any]:
    """The `stats` object of a periodic status: outbox depth, quota and every drop, counted since start."""
    return {
        "at": iso_utc(at_ns),
        "active_alarms": active_alarms,
        "outbox": {
            "alarm_events": store.outbox_alarm_events,
            "messages": store.outbox_messages,
            "bytes": store.outbox_bytes,
            "quota_bytes": store.outbox_quota_bytes,
            "dropped_scores": store.outbox_dropped_scores,
            "dropped_status": store.outbox_dropped_status,
            "dropped_alarm_events": store.outbox_dropped_alarm_events,
            "expired": store.outbox_expired,
        },
        "scores": {"published": scores_published, "dropped": scores_dropped},
    }
