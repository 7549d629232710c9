"""Bad model files found before the daemon starts: one line per problem, naming the model and the mismatch."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from gateway.config import GatewayConfig, load_config
from gateway.demo.run import MODEL_DIR, demo_config, write_config
from gateway.errors import ModelError
from gateway.model_checks import SOURCE_SHA256_KEY, check_model_files, fp16_copy_problem, read_onnx_metadata
from gateway.models import load_manifests
from gateway.service import validate_config


def _model_dir(tmp_path: Path, name: str = "model") -> Path:
    """A copy of the shipped demo model (ONNX + manifest) that a test may damage."""
    return Path(shutil.copytree(MODEL_DIR, tmp_path / name))


def _config(tmp_path: Path, model_dir: Path, **model: Any) -> Path:
    raw = demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "gw.db")
    raw["models"][0].update(path=str(model_dir / "pump_ae.onnx"), **model)
    return write_config(raw, tmp_path / "config.yaml")


def _problems(path: Path) -> tuple[GatewayConfig, list[str]]:
    cfg = load_config(path)
    return cfg, check_model_files(cfg, load_manifests(cfg))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _with_metadata(model: bytes, key: str, value: str) -> bytes:
    """ONNX bytes plus one metadata_props entry: protobuf lets a repeated field be appended at the end."""
    entry = b"\x0a" + _varint(len(key)) + key.encode() + b"\x12" + _varint(len(value)) + value.encode()
    return model + b"\x72" + _varint(len(entry)) + entry  # 0x72: field 14 (metadata_props), length-delimited


def test_the_shipped_model_has_no_problem(tmp_path: Path) -> None:
    cfg, problems = _problems(_config(tmp_path, _model_dir(tmp_path)))
    assert problems == []
    assert read_onnx_metadata(cfg.models[0].path) == {}


def test_a_missing_file_and_a_corrupt_one_each_give_one_line_naming_the_model(tmp_path: Path) -> None:
    missing, corrupt = _model_dir(tmp_path, "a"), _model_dir(tmp_path, "b")
    (missing / "pump_ae.onnx").unlink()
    (corrupt / "pump_ae.onnx").write_bytes(b"this is not a model\n" * 10)
    raw = demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "gw.db")
    second = dict(raw["models"][0], name="pump_ae_b", path=str(corrupt / "pump_ae.onnx"))
    raw["models"][0]["path"] = str(missing / "pump_ae.onnx")
    raw["models"].append(second)
    path = write_config(raw, tmp_path / "config.yaml")

    _, problems = _problems(path)
    assert len(problems) == 2
    assert problems[0].startswith("models[0] (pump_ae): ") and "model file not found" in problems[0]
    assert problems[1].startswith("models[1] (pump_ae_b): ") and "cannot load ONNX model" in problems[1]
    assert all("\n" not in p for p in problems)
    # `check` and a reload report both at once, before any model is loaded for serving.
    with pytest.raises(ModelError) as err:
        validate_config(path)
    assert str(err.value).splitlines() == problems


def test_a_manifest_with_a_wrong_channel_count_gives_the_mismatch(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    manifest_path = model_dir / "pump_ae.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # One channel fewer than the graph takes; every listed channel still exists on the assets.
    manifest["input"]["channels"].pop()
    for key in ("mean", "std"):
        manifest["normalization"][key].pop()
    manifest_path.write_text(json.dumps(manifest))
    _, problems = _problems(_config(tmp_path, model_dir))
    assert len(problems) == 1
    assert problems[0].startswith("models[0] (pump_ae): ")
    assert "model has 8 channels, manifest lists 7" in problems[0]


def test_a_manifest_naming_another_output_gives_the_mismatch(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    manifest_path = model_dir / "pump_ae.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["output"]["name"] = "anomaly"
    manifest_path.write_text(json.dumps(manifest))
    _, [problem] = _problems(_config(tmp_path, model_dir))
    assert problem.startswith("models[0] (pump_ae): ") and "no output(s) ['anomaly']" in problem


def test_an_fp16_copy_recording_another_source_is_stale(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    source = (model_dir / "pump_ae.onnx").read_bytes()
    copy = model_dir / "pump_ae.fp16.onnx"
    copy.write_bytes(_with_metadata(source, SOURCE_SHA256_KEY, hashlib.sha256(source).hexdigest()))
    cfg, problems = _problems(_config(tmp_path, model_dir))
    assert (
        problems == [] and read_onnx_metadata(copy)[SOURCE_SHA256_KEY] == hashlib.sha256(source).hexdigest()
    )

    copy.write_bytes(
        _with_metadata(source, SOURCE_SHA256_KEY, hashlib.sha256(b"another version").hexdigest())
    )
    # Content decides, not time: the stale copy is newer than its source here.
    os.utime(copy, (copy.stat().st_atime, (model_dir / "pump_ae.onnx").stat().st_mtime + 60))
    _, problems = _problems(_config(tmp_path, model_dir))
    assert problems == [
        "models[0] (pump_ae): pump_ae.fp16.onnx was made from another version of pump_ae.onnx; "
        f"run edge-models fp16 {cfg.models[0].path}"
    ]


def test_an_fp16_copy_without_a_recorded_source_is_judged_by_its_age(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    source = model_dir / "pump_ae.onnx"
    copy = shutil.copyfile(source, model_dir / "pump_ae.fp16.onnx")
    cfg = load_config(_config(tmp_path, model_dir))
    os.utime(copy, (source.stat().st_atime, source.stat().st_mtime + 60))
    assert fp16_copy_problem(cfg.models[0]) is None
    os.utime(copy, (source.stat().st_atime, source.stat().st_mtime - 60))
    problem = fp16_copy_problem(cfg.models[0])
    assert problem is not None and "pump_ae.fp16.onnx is older than pump_ae.onnx" in problem


def test_a_corrupt_fp16_copy_is_a_problem_and_a_configured_path_goes_into_the_command(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    copy = model_dir / "engines" / "pump_ae-half.onnx"
    copy.parent.mkdir()
    copy.write_bytes((model_dir / "pump_ae.onnx").read_bytes()[:5000])
    _, [problem] = _problems(_config(tmp_path, model_dir, fp16_path=str(copy)))
    assert problem.startswith(f"models[0] (pump_ae): {copy}: not an ONNX model (")
    assert problem.endswith(f"run edge-models fp16 {model_dir / 'pump_ae.onnx'} --out {copy}")


def test_an_unused_stale_copy_and_a_missing_copy_for_tensorrt_are_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = _model_dir(tmp_path)
    source = model_dir / "pump_ae.onnx"
    (model_dir / "pump_ae.fp16.onnx").write_bytes(
        _with_metadata(source.read_bytes(), SOURCE_SHA256_KEY, "0" * 64)
    )
    with caplog.at_level(logging.WARNING, logger="gateway.model_checks"):
        _, problems = _problems(_config(tmp_path, model_dir, precision="fp32"))
    assert problems == []
    assert [r.getMessage() for r in caplog.records] == [
        "models[0] (pump_ae): pump_ae.fp16.onnx was made from another version of pump_ae.onnx; "
        f"run edge-models fp16 {source} (unused: precision fp32, backend auto)"
    ]

    caplog.clear()
    (model_dir / "pump_ae.fp16.onnx").unlink()
    with caplog.at_level(logging.WARNING, logger="gateway.model_checks"):
        _, problems = _problems(_config(tmp_path, model_dir, backend="tensorrt"))
    assert problems == []
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("models[0] (pump_ae): no FP16 copy at ") and "TensorRT cannot build" in warning
