"""The system alarm inference_degraded and the backends in the retained status, on fallback."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from jsonschema import Draft202012Validator

from gateway.alarms import INFERENCE_DEGRADED, AlarmEngine, AlarmEvent
from gateway.config import GatewayConfig, load_config
from gateway.degraded import decide_degraded, degraded_model, degraded_rules, inference_status
from gateway.demo.broker import MosquittoBroker
from gateway.demo.run import demo_config, write_config
from gateway.inference import Fallback
from gateway.models import LoadedModel, load_manifests, load_models
from gateway.sinks.payloads import alarm_payload, status_payload
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_gateway import running_gateway
from tests.fixtures_mqtt import Received, Subscriber
from tests.fixtures_opcua import STILL, running_simulator

SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"
PUMPS = ("pump01", "pump02")
T0 = 1_764_060_000 * 10**9
GPU_FAILED = Fallback("onnxruntime-gpu", "onnxruntime has no CUDAExecutionProvider", degraded=True)
NO_TENSORRT = Fallback("tensorrt", "tensorrt is not installed", degraded=False)


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _valid(name: str, payload: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(payload)
    _validator(name).validate(obj)
    return obj


@functools.cache
def _demo_models() -> dict[str, LoadedModel]:
    """The demo model on two pumps, loaded for real (ONNX Runtime on the CPU)."""
    raw = demo_config(opc_port=1, mqtt_port=1, db_path=Path("unused.db"), pumps=len(PUMPS))
    raw["models"][0]["backend"] = "onnxruntime-cpu"  # the same on a machine with a GPU
    cfg = GatewayConfig.model_validate(raw)
    return load_models(cfg, load_manifests(cfg))


def _models(*fallbacks: Fallback, name: str = "pump_ae") -> dict[str, LoadedModel]:
    """The demo model under `name`, recorded as having skipped `fallbacks` first."""
    model = _demo_models()["pump_ae"]
    return {
        name: dataclasses.replace(
            model, cfg=model.cfg.model_copy(update={"name": name}), fallbacks=list(fallbacks)
        )
    }


def _decide(
    models: dict[str, LoadedModel],
    engine: AlarmEngine | None = None,
    *,
    enabled: bool = True,
    now_ns: int = T0,
) -> tuple[AlarmEngine, list[AlarmEvent]]:
    """A start's decision: a new engine (taking over `engine`'s states, as a restart restores them)."""
    fresh = AlarmEngine(
        degraded_rules(models), gateway_id="gw01", states=engine.states if engine is not None else None
    )
    return fresh, decide_degraded(fresh, models, enabled=enabled, now_ns=now_ns)


def test_a_degraded_model_raises_on_each_asset_and_a_restart_on_its_backend_clears_it() -> None:
    engine, raised = _decide(_models(GPU_FAILED))
    payloads = [_valid("alarm-event", alarm_payload(e, site="plant1")) for e in raised]
    assert [(p["asset"], p["event"], p["state"]) for p in payloads] == [(a, "raised", "unack") for a in PUMPS]
    for p in payloads:
        assert (p["rule"], p["kind"], p["output"], p["severity"], p["cause"]) == (
            INFERENCE_DEGRADED, "system", "fallbacks", "low", "process",
        )  # fmt: skip
        assert (p["model"], p["model_version"], p["value"], p["threshold"]) == (
            degraded_model("pump_ae"), "1.0.0", 1.0, 1.0,
        )  # fmt: skip
    # Decided again on the same backends (a restart still degraded): the alarms stay open, nothing new.
    engine, again = _decide(_models(GPU_FAILED), engine, now_ns=T0 + 10**9)
    assert again == []
    # After a restart on the configured backend, each restored alarm clears under its id.
    _, cleared = _decide(_models(), engine, now_ns=T0 + 2 * 10**9)
    assert [(e.asset, e.event, e.state, e.alarm_id, e.seq) for e in cleared] == [
        (r.asset, "cleared", "rtn_unack", r.alarm_id, 2) for r in raised
    ]


def test_fallbacks_that_are_not_degraded_raise_nothing_and_show_in_the_status() -> None:
    auto = _models(NO_TENSORRT, dataclasses.replace(GPU_FAILED, degraded=False))
    _, events = _decide(auto)
    assert events == []
    status = _valid("status", _status(auto))
    assert status["inference"] == {
        "pump_ae": {
            "backend": "onnxruntime-cpu",
            "fallbacks": [
                {"backend": "tensorrt", "reason": "tensorrt is not installed", "degraded": False},
                {"backend": "onnxruntime-gpu", "reason": GPU_FAILED.reason, "degraded": False},
            ],
        }
    }


def test_with_the_alarm_off_nothing_is_raised_and_an_alarm_open_from_before_clears() -> None:
    engine, raised = _decide(_models(GPU_FAILED))
    assert len(raised) == len(PUMPS)
    _, events = _decide(_models(GPU_FAILED), engine, enabled=False)
    assert {(e.asset, e.event) for e in events} == {(a, "cleared") for a in PUMPS}
    _, events = _decide(_models(GPU_FAILED), enabled=False)
    assert events == []


def test_an_asset_two_models_serve_has_one_alarm_counting_both() -> None:
    models = {**_models(name="fine"), **_models(GPU_FAILED, NO_TENSORRT, name="slow")}
    engine, raised = _decide(models)
    # One alarm per asset (alarms are per rule name and asset), under the degraded model's name.
    assert [(e.asset, e.model, e.value) for e in raised] == [(a, degraded_model("slow"), 1.0) for a in PUMPS]
    # The model that is fine does not clear what the other one raised.
    _, again = _decide(models, engine, now_ns=T0 + 10**9)
    assert again == []


def _status(models: dict[str, LoadedModel]) -> bytes:
    return status_payload(
        "online", message_id="gw01:0123456789ab:online", gateway_id="gw01", version="0.1.0",
        started_at="2026-11-25T08:00:00.123Z", inference=inference_status(models),
    )  # fmt: skip


# ---- the whole gateway: simulator -> gateway (backend selection) -> mosquitto ----------------------


def _gpu_here() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _config(tmp_path: Path, mosquitto: MosquittoBroker, backend: str, opc_port: int) -> GatewayConfig:
    raw = demo_config(
        opc_port=opc_port, mqtt_port=mosquitto.port, db_path=tmp_path / "gw.db", pumps=len(PUMPS)
    )
    raw["models"][0]["backend"] = backend
    raw["sources"][0]["comm_loss"] = {"enabled": False}
    raw["mqtt"]["publish_scores"] = False
    return load_config(write_config(raw, tmp_path / f"{backend}.yaml"))


def _degraded_events(messages: list[Received]) -> list[dict[str, Any]]:
    alarms = (json.loads(m.payload) for m in messages if m.topic.endswith("/alarm"))
    return [a for a in alarms if a["rule"] == INFERENCE_DEGRADED]


def _statuses(messages: list[Received]) -> list[dict[str, Any]]:
    """The statuses this run published (a retained one from an earlier run arrives with retain set)."""
    return [_valid("status", m.payload) for m in messages if m.topic.endswith("/status") and not m.retain]


async def _run_once(cfg: GatewayConfig, sub: Subscriber, until: Any) -> list[Received]:
    """Run the gateway until `until(messages)` holds, stop it; what arrived up to its offline status."""
    async with running_gateway(cfg) as run:
        await wait_for_condition(run.gateway.started.is_set, 60, "the gateway started")
        await sub.await_for(lambda msgs: until(msgs) or run.stopped(), 60)
    assert run.code == 0
    return await sub.await_for(lambda msgs: any(s["state"] == "offline" for s in _statuses(msgs)), 30)


@pytest.mark.skipif(_gpu_here(), reason="this test needs ONNX Runtime without a GPU provider")
def test_gateway_on_a_cpu_machine_configured_for_the_gpu_reports_and_alarms_then_clears_on_the_cpu(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    opc_port = free_port()
    gpu = _config(tmp_path, mosquitto, "onnxruntime-gpu", opc_port)
    cpu = _config(tmp_path, mosquitto, "onnxruntime-cpu", opc_port)

    async def scenario() -> tuple[list[Received], list[Received]]:
        async with running_simulator(opc_port, n_pumps=len(PUMPS), **STILL):
            with Subscriber(mosquitto.port, "edge/demo/#") as sub:
                first = await _run_once(
                    gpu, sub, lambda msgs: {a["asset"] for a in _degraded_events(msgs)} >= set(PUMPS)
                )
            with Subscriber(mosquitto.port, "edge/demo/#") as sub:
                second = await _run_once(
                    cpu,
                    sub,
                    lambda msgs: (
                        {a["asset"] for a in _degraded_events(msgs) if a["event"] == "cleared"} >= set(PUMPS)
                    ),
                )
        return first, second

    first, second = asyncio.run(scenario())
    raised = _degraded_events(first)
    for event in raised:
        _valid("alarm-event", json.dumps(event).encode())
    # The retained birth names the backend the model runs on and the fallback, with its reason.
    statuses = _statuses(first)
    assert [s["state"] for s in statuses] == ["online", "offline"]  # the birth and the clean stop's
    (inference,) = {json.dumps(s["inference"]) for s in statuses}
    model = json.loads(inference)["pump_ae"]
    assert model["backend"] == "onnxruntime-cpu"
    assert model["fallbacks"][0]["backend"] == "onnxruntime-gpu" and model["fallbacks"][0]["degraded"] is True
    assert model["fallbacks"][0]["reason"]
    degraded = sum(f["degraded"] for f in model["fallbacks"])
    assert sorted((a["asset"], a["event"], a["kind"], a["severity"], a["value"]) for a in raised) == [
        (a, "raised", "system", "low", degraded) for a in PUMPS
    ]
    # Restarted on the same SQLite file on the CPU: each restored alarm clears under its id.
    cleared = [a for a in _degraded_events(second) if a["event"] == "cleared"]
    assert sorted((a["alarm_id"], a["seq"], a["state"]) for a in cleared) == sorted(
        (a["alarm_id"], 2, "rtn_unack") for a in raised
    )
    statuses = _statuses(second)
    assert statuses and all(
        s["inference"]["pump_ae"] == {"backend": "onnxruntime-cpu", "fallbacks": []} for s in statuses
    )


@pytest.mark.skipif(_gpu_here(), reason="this test needs ONNX Runtime without a GPU provider")
def test_gateway_with_backend_auto_on_a_cpu_machine_lists_its_fallbacks_and_raises_nothing(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    opc_port = free_port()
    cfg = _config(tmp_path, mosquitto, "auto", opc_port)

    async def scenario() -> tuple[list[Received], int, bool]:
        async with running_simulator(opc_port, n_pumps=len(PUMPS), **STILL):
            with Subscriber(mosquitto.port, "edge/demo/#") as sub:
                async with running_gateway(cfg) as run:
                    # Decided in start(), before `started`: whatever it raised is counted by now.
                    await wait_for_condition(run.gateway.started.is_set, 60, "the gateway started")
                    events = run.gateway.counters.alarm_events
                    assert run.gateway.engine is not None
                    open_degraded = any(rule == INFERENCE_DEGRADED for rule, _ in run.gateway.engine.states)
                    await sub.await_for(lambda msgs: bool(_statuses(msgs)) or run.stopped(), 60)
                assert run.code == 0
                return sub.messages, events, open_degraded

    messages, events, open_degraded = asyncio.run(scenario())
    assert events == 0 and not open_degraded and _degraded_events(messages) == []
    fallbacks = _statuses(messages)[0]["inference"]["pump_ae"]["fallbacks"]
    assert [f["backend"] for f in fallbacks] == ["tensorrt", "onnxruntime-gpu"]
    assert all(not f["degraded"] and f["reason"] for f in fallbacks)
