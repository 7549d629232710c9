"""FP16 copies: conversion, the documented tolerance, stale copies in `check`, and `verify-engines`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from sqlite_utils import Database

from edge_models.cli import main as edge_models_main
from edge_models.data import fault_ramp_history, fleet_windows
from edge_models.fp16 import Fp16Error, convert_fp16, make_fp16
from gateway.cli import main as gateway_main
from gateway.demo.run import MODEL_DIR, demo_config, write_config
from gateway.demo.signals import normal_history
from gateway.inference.onnxruntime import file_sha256, load_onnxruntime
from gateway.manifest import ModelManifest, load_manifest
from gateway.model_checks import SOURCE_SHA256_KEY, read_onnx_metadata
from gateway.normalize import Normalizer
from gateway.schema import create_schema
from gateway.verify import RTOL, compare

MANIFEST = load_manifest(MODEL_DIR / "pump_ae.manifest.json")


def _model_dir(tmp_path: Path) -> Path:
    """The demo model and its manifest, without the FP16 copy that ships beside them."""
    return Path(
        shutil.copytree(MODEL_DIR, tmp_path / "model", ignore=shutil.ignore_patterns("*.fp16.onnx"))
    )


def _physics_windows() -> np.ndarray:
    """Normalized windows of healthy pumps and of a bearing fault ramping up: scores on both sides of the thresholds."""
    healthy = normal_history(2, 60.0, 10.0, seed=5)
    fault, _ = fault_ramp_history(2, rate_hz=10.0, healthy_s=10.0, ramp_s=60.0, seed=6)
    raw = np.concatenate([fleet_windows(healthy, 32, 4), fleet_windows(fault, 32, 4)]).astype(np.float64)
    return Normalizer(MANIFEST).apply(raw, out=np.empty(raw.shape, dtype=np.float32))


def _other_version(src: Path, dst: Path) -> Path:
    """`src` with its first weight matrix changed by 1%: another version of the same model."""
    model = onnx.load(str(src))
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def test_the_fp16_copy_of_the_demo_model_agrees_with_fp32_within_the_tolerance(tmp_path: Path) -> None:
    src = _model_dir(tmp_path) / "pump_ae.onnx"
    windows = _physics_windows()
    scores = load_onnxruntime(src, MANIFEST).run(windows)["score"]
    # The windows exercise both decisions: healthy below `low`, the faulty pumps above `high`.
    assert (scores < MANIFEST.thresholds.low).any() and (scores >= MANIFEST.thresholds.high).any()

    report = make_fp16(src, recorded=windows, windows=64)
    assert report.path == src.with_name("pump_ae.fp16.onnx") and report.path.is_file()
    assert report.parity is not None and report.parity.passed, report.parity
    assert report.parity.windows == len(windows) + 64
    assert report.parity.decisions == 2 * report.parity.windows  # every window against high and low
    assert report.parity.differ == 0
    assert {o.name for o in report.parity.outputs} == {"score", "channel_error"}
    assert all(o.max_rel <= RTOL and o.nonfinite == 0 for o in report.parity.outputs)
    assert 0 < report.peak < 65504

    copy = onnx.load(str(report.path))
    onnx.checker.check_model(copy)  # nodes topologically sorted, as TensorRT's parser needs
    assert {t.data_type for t in copy.graph.initializer} == {onnx.TensorProto.FLOAT16}
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("window", "tensor(float)")]
    assert {o.type for o in session.get_outputs()} == {"tensor(float)"}
    assert read_onnx_metadata(report.path)[SOURCE_SHA256_KEY] == file_sha256(src) == report.source_sha256
    assert sorted(p.name for p in src.parent.iterdir()) == [
        "pump_ae.fp16.onnx",
        "pump_ae.manifest.json",
        "pump_ae.onnx",
    ]


def test_edge_models_fp16_prints_the_parity_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _model_dir(tmp_path) / "pump_ae.onnx"
    out = tmp_path / "elsewhere" / "half.onnx"
    assert edge_models_main(["-q", "fp16", str(src), "--out", str(out), "--windows", "32"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out}: FP16 copy of {src}")
    assert "score            max " in printed and "decisions: 64 compared, 0 differ" in printed
    assert "PASS (|FP16 - FP32| <= 0.01 x max(|FP32|, 1))" in printed
    assert out.is_file() and not src.with_name("pump_ae.fp16.onnx").exists()


def test_an_activation_beyond_the_fp16_range_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    src = _model_dir(tmp_path) / "pump_ae.onnx"
    model = onnx.load(str(src))
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * 1e5, first.name))
    onnx.save(model, str(src))
    with pytest.raises(
        Fp16Error, match=r"tensor '/Pow_output_0' reaches .* beyond FP16's largest finite value 65504"
    ):
        make_fp16(src, windows=16)
    assert sorted(p.name for p in src.parent.iterdir()) == ["pump_ae.manifest.json", "pump_ae.onnx"]


def test_compare_names_a_non_finite_output_and_tells_decision_flips_from_borderline_ones() -> None:
    ref = {"score": np.array([0.10, 0.50, 0.6675, 2.0]), "channel_error": np.ones((4, 8))}
    # Window 2 crosses `high` (0.667) by less than the tolerance: allowed, and counted.
    near = {"score": ref["score"] + [0.0, 0.0, -0.001, 0.0], "channel_error": ref["channel_error"]}
    parity = compare(ref, near, MANIFEST)
    assert parity.passed and (parity.decisions, parity.differ, parity.borderline) == (8, 0, 1)

    overflow = {"score": ref["score"], "channel_error": np.where(np.eye(4, 8) > 0, np.inf, 1.0)}
    parity = compare(ref, overflow, MANIFEST)
    assert not parity.passed
    assert parity.problems[0].startswith(
        "output 'channel_error' is not finite under FP16 in 4 of 4 window(s)"
    )

    flipped = {"score": ref["score"] + [0.0, 0.2, 0.0, 0.0], "channel_error": ref["channel_error"]}
    parity = compare(ref, flipped, MANIFEST, [("score", 0.667)])
    assert not parity.passed and parity.differ == 1
    assert any("differs by up to 0.2" in p for p in parity.problems)
    assert "score >= 0.667 is decided otherwise in 1 window(s), clear of the threshold" in parity.problems


def test_compare_checks_a_classifier_by_argmax() -> None:
    classifier = ModelManifest.model_validate(
        MANIFEST.model_dump()
        | {"output": {"kind": "class_probabilities", "name": "probs", "classes": ["ok", "worn", "broken"]}}
    )
    ref = {"probs": np.array([[0.7, 0.2, 0.1], [0.49, 0.50, 0.01], [0.1, 0.1, 0.8]])}
    close = {"probs": ref["probs"] + [[0, 0, 0], [0.006, -0.006, 0], [0, 0, 0]]}  # the near tie may swap
    parity = compare(ref, close, classifier)
    assert parity.passed and (parity.decisions, parity.borderline) == (3, 1)
    swapped = {"probs": ref["probs"][:, [1, 0, 2]]}
    parity = compare(ref, swapped, classifier)
    # Window 0 swaps clear of any tie: a failure; window 1 is the near tie again.
    assert not parity.passed and (parity.differ, parity.borderline) == (1, 1)
    assert "the most probable class differs in 1 window(s)" in parity.problems


def test_check_reports_an_fp16_copy_of_another_model_version(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    other = _other_version(model_dir / "pump_ae.onnx", tmp_path / "v2" / "pump_ae.onnx")
    convert_fp16(other, model_dir / "pump_ae.fp16.onnx")
    raw = demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "gw.db")
    raw["models"][0]["path"] = str(model_dir / "pump_ae.onnx")
    config = write_config(raw, tmp_path / "config.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert [line for line in result.stderr.splitlines() if "error" in line.lower()] == [
        "error: models[0] (pump_ae): pump_ae.fp16.onnx was made from another version of pump_ae.onnx; "
        f"run edge-models fp16 {model_dir / 'pump_ae.onnx'}"
    ]


def _record_history(db_path: Path, assets: list[str]) -> None:
    """Tag history rows as the gateway writes them: per asset, {channel: engineering value or null}."""
    history = normal_history(len(assets), 30.0, 10.0, seed=8)
    rows = [
        {
            "ts_ns": t * 100_000_000,
            "asset": asset,
            "values_json": json.dumps(dict(zip(MANIFEST.input.channels, v, strict=True))),
        }
        for t, sample in enumerate(history.tolist())
        for asset, v in zip(assets, sample, strict=True)
    ]
    db = Database(str(db_path))
    create_schema(db)
    db["samples"].insert_all(rows)
    db.close()


def test_verify_engines_passes_on_the_demo_config_with_the_fp16_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = _model_dir(tmp_path)
    convert_fp16(model_dir / "pump_ae.onnx")
    raw = demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "gw.db")
    raw["models"][0]["path"] = str(model_dir / "pump_ae.onnx")
    config = write_config(raw, tmp_path / "config.yaml")

    assert gateway_main(["verify-engines", str(config), "--windows", "64"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("pump_ae: PASS\n  FP16: FP16 copy ")
    assert "windows: 64 random normalized" in printed
    assert "  score            max " in printed and "  channel_error    max " in printed
    assert "decisions: 128 compared, 0 differ" in printed

    _record_history(tmp_path / "gw.db", raw["models"][0]["assets"])
    assert gateway_main(["verify-engines", str(config), "--windows", "64", "--from-db", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [model] = doc["models"]
    assert doc["passed"] and model["status"] == "PASS" and model["parity"]["windows"] == 64
    assert model["windows"].startswith("64 recorded (tag history of pump01, pump02, pump03, pump04)")

    # Another version of the FP32 file beside the old copy: the copy no longer stands for the model.
    _other_version(model_dir / "pump_ae.onnx", model_dir / "pump_ae.onnx.new")
    (model_dir / "pump_ae.onnx.new").replace(model_dir / "pump_ae.onnx")
    assert gateway_main(["verify-engines", str(config)]) == 3
    assert "pump_ae: FAIL: pump_ae.fp16.onnx was made from another version" in capsys.readouterr().out
