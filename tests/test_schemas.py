"""The MQTT contract: the payloads the code builds, and docs/mqtt.md's examples, against docs/schemas/."""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import numpy as np
import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from gateway import __version__
from gateway.alarms import (
    AlarmEngine,
    AlarmEvent,
    AlarmRule,
    EventType,
    LifecycleState,
    comm_loss_model,
    comm_loss_rules,
)
from gateway.config import GatewaySection, Severity
from gateway.inference import BACKENDS
from gateway.manifest import OutputKind
from gateway.sinks.payloads import (
    ALARM_SCHEMA,
    SCORE_SCHEMA,
    STATUS_SCHEMA,
    MessageIds,
    alarm_payload,
    iso_utc,
    score_payload,
    status_payload,
    status_stats,
)
from gateway.store import StoreStats
from tests.fixtures_config import pumps_config

DOCS = Path(__file__).resolve().parent.parent / "docs"
SCHEMAS = ("alarm-event", "status", "score")
GW = "gw01"
SITE = "plant1"
T0 = 1_764_060_000 * 10**9  # 2025-11-25T08:40:00Z: a realistic wall clock, so times format as they do live
S = 10**9


@functools.cache
def _schema(name: str) -> dict[str, Any]:
    return json.loads((DOCS / "schemas" / f"{name}.schema.json").read_text(encoding="utf-8"))


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    schema = _schema(name)
    Draft202012Validator.check_schema(schema)  # the file itself is valid draft 2020-12
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _valid(name: str, payload: bytes | dict[str, Any]) -> dict[str, Any]:
    """Validate a payload (bytes as sent, or a parsed object) against a schema; return the object."""
    obj = json.loads(payload) if isinstance(payload, bytes) else payload
    _validator(name).validate(obj)
    if name == "alarm-event":  # the one rule a JSON Schema cannot express
        assert obj["event_id"] == f"{obj['alarm_id']}:{obj['seq']}"
    return obj


def _rule() -> AlarmRule:
    return AlarmRule(
        name="bearing", model="pump_ae", output="score", value_index=0, high=0.8, low=0.6,
        direction="above", on_delay=1, severity="high", kind="anomaly_score", model_version="1.2.0",
        assets=frozenset({"P-101"}),
    )  # fmt: skip


def _lifecycle() -> list[AlarmEvent]:
    """Drive a real engine through every operation, returning every event it produced, in order."""
    engine = AlarmEngine([_rule()], gateway_id=GW)
    out: list[AlarmEvent] = []

    def feed(value: float, t: int) -> None:
        out.extend(
            engine.decide("pump_ae", "P-101", np.array([value]), source_ts_ns=T0 + t * S, now_ns=T0 + t * S)
        )

    feed(0.9, 1)  # raised: normal -> unack
    out.append(engine.acknowledge(out[-1].alarm_id, by="alice", now_ns=T0 + 2 * S))  # -> acked
    feed(0.1, 3)  # cleared: acked -> normal, the occurrence ends
    feed(0.9, 4)  # raised, a new occurrence
    feed(0.1, 5)  # cleared: unack -> rtn_unack
    feed(0.9, 6)  # raised again from rtn_unack, same occurrence
    out.append(engine.shelve("bearing", "P-101", until_ns=T0 + 100 * S, by="carol", now_ns=T0 + 7 * S))
    out.append(engine.unshelve("bearing", "P-101", by="carol", now_ns=T0 + 8 * S))  # by command -> unack
    out.append(engine.shelve("bearing", "P-101", until_ns=T0 + 20 * S, by="carol", now_ns=T0 + 9 * S))
    out.extend(engine.expire_shelves(T0 + 20 * S))  # by expiry -> unack
    out.extend(engine.set_suppressed("P-101", True, reason="stopped", now_ns=T0 + 21 * S))
    out.extend(engine.set_suppressed("P-101", False, reason="stopped", now_ns=T0 + 22 * S))  # -> unack
    feed(0.1, 23)  # cleared -> rtn_unack
    out.append(engine.acknowledge(out[-1].alarm_id, by="bob", now_ns=T0 + 24 * S))  # -> normal
    # A quiet alarm shelved opens an occurrence that was never raised: value is NaN, sent as null.
    out.append(engine.shelve("bearing", "P-101", until_ns=T0 + 99 * S, by="dan", now_ns=T0 + 25 * S))
    out.append(engine.unshelve("bearing", "P-101", by="dan", now_ns=T0 + 26 * S))  # -> normal
    return out


def _comm_loss_events() -> list[AlarmEvent]:
    """The comm_loss system alarm raised and cleared, decided as the gateway does (no source times)."""
    cfg = pumps_config(["P-101"], source={"comm_loss": {"delay_s": 10}}, gateway={"id": GW})
    engine = AlarmEngine(comm_loss_rules(cfg, version=__version__), gateway_id=cfg.gateway.id)
    model = comm_loss_model("plc1")
    raised = engine.decide(model, "P-101", np.array([12.5]), source_ts_ns=0, now_ns=T0)
    cleared = engine.decide(model, "P-101", np.array([0.0]), source_ts_ns=0, now_ns=T0 + S)
    return raised + cleared


IDS = MessageIds(GW)
# A model configured for ONNX Runtime on the GPU that runs on the CPU, and one that runs as configured
# (the shape gateway.degraded.inference_status gives).
INFERENCE: dict[str, Any] = {
    "pump_ae": {
        "backend": "onnxruntime-cpu",
        "fallbacks": [
            {"backend": "onnxruntime-gpu", "reason": "onnxruntime has no CUDAExecutionProvider", "degraded": True}
        ],
    },
    "fan_cls": {"backend": "onnxruntime-cpu", "fallbacks": []},
}


def _status(
    state: Literal["online", "offline"] = "online",
    stats: dict[str, Any] | None = None,
    inference: dict[str, Any] | None = INFERENCE,
) -> bytes:
    message_id = IDS.named(state) if stats is None else IDS.next()
    return status_payload(
        state, message_id=message_id, gateway_id=GW, version=__version__, started_at=iso_utc(T0),
        inference=inference, stats=stats,
    )  # fmt: skip


def _stats() -> dict[str, Any]:
    store = StoreStats(
        outbox_alarm_events=3, outbox_messages=40, outbox_bytes=51_200, outbox_quota_bytes=2**20,
        outbox_dropped_scores=7, outbox_expired=2,
    )  # fmt: skip
    return status_stats(at_ns=T0 + 60 * S, active_alarms=1, store=store, scores_published=90, scores_dropped=1)


def _score(values: dict[str, float] | None = None, source_ts_ns: int = T0) -> bytes:
    return score_payload(
        message_id=IDS.next(),
        asset="P-101", model="pump_ae", model_version="1.2.0", values=values or {"score": 0.12},
        source_ts_ns=source_ts_ns, decided_at_ns=T0 + 5_000_000,
    )  # fmt: skip


def test_every_alarm_event_of_the_lifecycle_validates() -> None:
    events = _lifecycle()
    payloads = [_valid("alarm-event", alarm_payload(e, site=SITE)) for e in events]
    # The scenario covers every event type, state and kind of cause the engine can produce.
    assert {p["event"] for p in payloads} == set(get_args(EventType))
    assert {p["state"] for p in payloads} == set(get_args(LifecycleState))
    assert {p["cause"].split(":")[0] for p in payloads} == {"process", "operator", "shelve_expired", "design"}
    assert [(p["event"], p["cause"]) for p in payloads if p["event"] == "unshelved"] == [
        ("unshelved", "operator:carol"),
        ("unshelved", "shelve_expired"),
        ("unshelved", "operator:dan"),
    ]
    reraised = [p for p in payloads if p["event"] == "raised"][-1]
    assert (reraised["seq"], reraised["alarm_id"]) == (3, payloads[3]["alarm_id"])  # from rtn_unack
    shelved = [p for p in payloads if p["event"] == "shelved"]
    assert shelved[0]["shelved_until"] == iso_utc(T0 + 100 * S)
    assert shelved[-1]["value"] is None and shelved[-1]["first_abnormal_source_ts"] is None


def test_comm_loss_system_event_validates() -> None:
    raised, cleared = (_valid("alarm-event", alarm_payload(e, site=SITE)) for e in _comm_loss_events())
    assert (raised["rule"], raised["kind"], raised["model"], raised["output"]) == (
        "comm_loss",
        "system",
        "source:plc1",
        "disconnected_s",
    )
    assert (raised["value"], raised["threshold"], raised["first_abnormal_source_ts"]) == (12.5, 10.0, None)
    assert (cleared["event"], cleared["state"]) == ("cleared", "rtn_unack")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_sent_as_null_and_validate(bad: float) -> None:
    event = replace(_lifecycle()[0], value=bad, threshold=bad)
    payload = _valid("alarm-event", alarm_payload(event, site=SITE))
    assert (payload["value"], payload["threshold"]) == (None, None)
    score = _valid("score", _score({"score": bad, "normal": 0.25}))
    assert score["values"] == {"score": None, "normal": 0.25}


@pytest.mark.parametrize("state", ["online", "offline"])
def test_status_payload_validates(state: Literal["online", "offline"]) -> None:
    status = _valid("status", _status(state))
    assert (status["state"], status["stats"], status["message_id"]) == (state, None, f"{IDS.prefix}:{state}")
    assert status["inference"] == INFERENCE


def test_status_without_inference_validates() -> None:
    """A publisher whose models were never named (no models loaded yet) sends inference: null."""
    assert _valid("status", _status(inference=None))["inference"] is None


def test_periodic_status_with_outbox_stats_validates() -> None:
    stats = _valid("status", _status(stats=_stats()))["stats"]
    assert stats["outbox"] == {
        "alarm_events": 3, "messages": 40, "bytes": 51_200, "quota_bytes": 2**20,
        "dropped_scores": 7, "dropped_status": 0, "dropped_alarm_events": 0, "expired": 2,
    }  # fmt: skip
    assert (stats["active_alarms"], stats["scores"], stats["at"]) == (
        1,
        {"published": 90, "dropped": 1},
        iso_utc(T0 + 60 * S),
    )


def test_message_ids_are_unique_and_stable_per_process() -> None:
    other = MessageIds(GW)
    ids = [IDS.next() for _ in range(3)]
    assert len(set(ids)) == 3 and all(i.startswith(f"{GW}:") for i in ids)
    assert other.prefix != IDS.prefix  # a restart never reuses the ids of the last run
    assert IDS.named("online") == IDS.named("online")


def test_an_event_caused_by_a_command_carries_its_id() -> None:
    acked = replace(_lifecycle()[1], command_id="scada-42")
    assert _valid("alarm-event", alarm_payload(acked, site=SITE))["command_id"] == "scada-42"
    assert _valid("alarm-event", alarm_payload(_lifecycle()[0], site=SITE))["command_id"] is None


def test_score_payload_validates_with_and_without_source_times() -> None:
    assert _valid("score", _score())["window_end_source_ts"] == iso_utc(T0)
    assert _valid("score", _score(source_ts_ns=0))["window_end_source_ts"] is None


def _base(name: str) -> dict[str, Any]:
    """A valid payload of each kind, built by the code."""
    if name == "alarm-event":
        return json.loads(alarm_payload(_lifecycle()[0], site=SITE))
    return json.loads(_status() if name == "status" else _score())


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda p: p.pop(key)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda p: p.update({key: value})


REJECTED: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    ("alarm-event", "missing event_id", _drop("event_id")),
    ("alarm-event", "missing shelved_until", _drop("shelved_until")),
    ("alarm-event", "unknown field", _set("note", "hi")),
    ("alarm-event", "unknown event", _set("event", "exploded")),
    ("alarm-event", "unknown state", _set("state", "limbo")),
    ("alarm-event", "unknown severity", _set("severity", "urgent")),
    ("alarm-event", "unknown kind", _set("kind", "magic")),
    ("alarm-event", "unknown cause", _set("cause", "whim")),
    ("alarm-event", "seq as string", _set("seq", "1")),
    ("alarm-event", "seq zero", _set("seq", 0)),
    ("alarm-event", "value as string", _set("value", "0.9")),
    ("alarm-event", "NaN as string", _set("value", "NaN")),
    ("alarm-event", "decided_at null", _set("decided_at", None)),
    ("alarm-event", "offset instead of Z", _set("decided_at", "2026-11-25T09:15:12.345+00:00")),
    ("alarm-event", "seconds only", _set("first_abnormal_source_ts", "2026-11-25T09:15:12Z")),
    ("alarm-event", "schema 1 event_id", lambda p: p.update(event_id=f"{p['alarm_id']}:raised")),
    ("alarm-event", "schema 1", _set("schema", 1)),
    ("alarm-event", "empty asset", _set("asset", "")),
    ("alarm-event", "schema 2", _set("schema", 2)),
    ("alarm-event", "missing command_id", _drop("command_id")),
    ("alarm-event", "empty command_id", _set("command_id", "")),
    ("status", "missing message_id", _drop("message_id")),
    ("status", "missing inference", _drop("inference")),
    ("status", "inference as a list", _set("inference", [])),
    ("status", "unknown backend", lambda p: p["inference"]["pump_ae"].update(backend="cuda")),
    ("status", "model without fallbacks", lambda p: p["inference"]["pump_ae"].pop("fallbacks")),
    ("status", "fallback without reason", lambda p: p["inference"]["pump_ae"]["fallbacks"][0].pop("reason")),
    ("status", "fallback with empty reason", lambda p: p["inference"]["pump_ae"]["fallbacks"][0].update(reason="")),
    ("status", "degraded as string", lambda p: p["inference"]["pump_ae"]["fallbacks"][0].update(degraded="yes")),
    ("status", "model name not a name", lambda p: p["inference"].update({"a/b": p["inference"]["fan_cls"]})),
    ("status", "schema 2", _set("schema", 2)),
    ("status", "missing stats", _drop("stats")),
    ("status", "stats as a string", _set("stats", "ok")),
    ("status", "schema 1", _set("schema", 1)),
    ("status", "missing started_at", _drop("started_at")),
    ("status", "unknown field", _set("pid", 42)),
    ("status", "unknown state", _set("state", "sleeping")),
    ("status", "schema as string", _set("schema", "1")),
    ("status", "started_at not a time", _set("started_at", "bench")),
    ("score", "missing values", _drop("values")),
    ("score", "missing message_id", _drop("message_id")),
    ("score", "message_id of another form", _set("message_id", "42")),
    ("score", "unknown field", _set("window", 3)),
    ("score", "value as string", _set("values", {"score": "high"})),
    ("score", "no values", _set("values", {})),
    ("score", "source time as number", _set("window_end_source_ts", 123)),
]


@pytest.mark.parametrize(("name", "mutate"), [pytest.param(n, m, id=f"{n}: {c}") for n, c, m in REJECTED])
def test_schemas_reject_a_broken_payload(name: str, mutate: Callable[[dict[str, Any]], None]) -> None:
    payload = _base(name)
    _valid(name, payload)  # valid before the change, so the change alone is what is refused
    mutate(payload)
    with pytest.raises(ValidationError):
        _validator(name).validate(payload)


def _doc_examples() -> list[tuple[str, dict[str, Any]]]:
    """Every ```json block of docs/mqtt.md as (schema tag, object); the tag follows the language."""
    text = (DOCS / "mqtt.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```json([^\n]*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [(tag.strip(), json.loads(body)) for tag, body in blocks]


def test_every_example_in_the_docs_validates() -> None:
    examples = _doc_examples()
    assert {tag for tag, _ in examples} == set(SCHEMAS), "each json block is tagged with its schema"
    for tag, obj in examples:
        _valid(tag, obj)
    # One example per event type at least, so the page cannot silently lose one.
    assert {obj["event"] for tag, obj in examples if tag == "alarm-event"} == set(get_args(EventType))


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_fields_are_exactly_the_payload_fields(name: str) -> None:
    schema = _schema(name)
    sent = set(_base(name))
    assert set(schema["properties"]) == sent
    assert set(schema["required"]) == sent
    assert schema["additionalProperties"] is False


def test_schema_enums_and_versions_match_the_code() -> None:
    alarm, status, score = (_schema(n) for n in SCHEMAS)
    props = alarm["properties"]
    assert props["event"]["enum"] == list(get_args(EventType))
    assert props["state"]["enum"] == list(get_args(LifecycleState))
    assert props["severity"]["enum"] == list(get_args(Severity))
    assert props["kind"]["enum"] == [*get_args(OutputKind), "system"]
    assert status["properties"]["state"]["enum"] == list(get_args(get_type_hints(status_payload)["state"]))
    assert props["schema"]["const"] == ALARM_SCHEMA
    assert status["properties"]["schema"]["const"] == STATUS_SCHEMA
    assert score["properties"]["schema"]["const"] == SCORE_SCHEMA
    assert status["$defs"]["backend"]["enum"] == list(BACKENDS)
    # Names in payloads are config names: the schemas carry the config's rule for them.
    name = GatewaySection.model_json_schema()["properties"]["id"]
    for rule in (
        alarm["$defs"]["name"],
        status["properties"]["gateway_id"],
        status["$defs"]["name"],
        *(score["properties"][k] for k in ("asset", "model")),
    ):
        assert (rule["pattern"], rule["maxLength"]) == (name["pattern"], name["maxLength"])
