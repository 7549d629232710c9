"""TensorRT on a real GPU: build from the shipped demo model, reuse from the cache, parity with ONNX Runtime,
throughput. Skipped without TensorRT and a CUDA device (run them on a Jetson: `pytest -m gpu -s`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from gateway.config import InferenceSection, ModelConfig
from gateway.demo.run import MODEL_DIR
from gateway.inference import BackendUnavailable
from gateway.inference.engines import sidecar_path
from gateway.inference.onnxruntime import load_onnxruntime
from gateway.inference.tensorrt import TensorRtHere, load_tensorrt, open_tensorrt
from gateway.manifest import ModelManifest, load_manifest
from gateway.verify import compare

pytestmark = pytest.mark.gpu

# Against ONNX Runtime FP32 on the FP32 file: |trt - ort| <= atol + rtol * |ort|. fp32 engines may use
# TF32 tensor cores (10-bit mantissa, TensorRT's default on Ampere and later, Orin included); fp16
# engines compute in FP16 (10-bit mantissa, so ~1e-3 relative per operation, accumulated over layers).
MAX_BATCH = 64
ASSETS = [f"pump{i:02d}" for i in range(1, 5)]


@pytest.fixture(scope="module")
def here() -> TensorRtHere:
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT is not installed")
    try:
        return open_tensorrt()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model and manifest in a folder of their own (the FP16 copy is written beside them)."""
    folder = tmp_path_factory.mktemp("model")
    for name in ("pump_ae.onnx", "pump_ae.manifest.json"):
        shutil.copy(MODEL_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def manifest(model_dir: Path) -> ModelManifest:
    return load_manifest(model_dir / "pump_ae.manifest.json")


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def precision(request: pytest.FixtureRequest, model_dir: Path, here: TensorRtHere) -> str:
    if request.param == "fp16" and not (model_dir / "pump_ae.fp16.onnx").exists():
        fp16 = pytest.importorskip(
            "edge_models.fp16", reason="the FP16 conversion needs edge_models.fp16 and onnx"
        )
        fp16.convert_fp16(model_dir / "pump_ae.onnx")
    return str(request.param)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _cfg(model_dir: Path, precision: str) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "pump_ae",
            "path": model_dir / "pump_ae.onnx",
            "assets": ASSETS,
            "precision": precision,
            "max_batch": MAX_BATCH,
        }
    )


def _windows(n: int, manifest: ModelManifest, seed: int = 0) -> np.ndarray:
    """Normalized windows: what the pipeline feeds a model (zero mean, unit spread per channel)."""
    shape = (n, manifest.input.window_length, len(manifest.input.channels))
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_an_engine_is_built_once_then_taken_from_the_cache(
    here: TensorRtHere, model_dir: Path, manifest: ModelManifest, precision: str, cache_dir: Path
) -> None:
    inference = InferenceSection(cache_dir=cache_dir)
    first = load_tensorrt(_cfg(model_dir, precision), manifest, inference).describe()
    assert first["backend"] == "tensorrt" and first["precision"] == precision
    assert first["built"] and first["profile"] == {"min": 1, "opt": len(ASSETS), "max": MAX_BATCH}
    engine = Path(first["engine"])
    assert engine.is_file() and sidecar_path(engine).is_file()
    assert list((cache_dir / "engines").glob("timing-*.cache"))
    second = load_tensorrt(_cfg(model_dir, precision), manifest, inference).describe()
    assert not second["built"] and second["key"] == first["key"] and second["engine"] == first["engine"]


def test_a_damaged_or_refused_engine_is_rebuilt(
    here: TensorRtHere, model_dir: Path, manifest: ModelManifest, tmp_path: Path
) -> None:
    inference = InferenceSection(cache_dir=tmp_path)
    cfg = _cfg(model_dir, "fp32")
    built = load_tensorrt(cfg, manifest, inference).describe()
    engine = Path(built["engine"])
    engine.write_bytes(engine.read_bytes()[: engine.stat().st_size // 2])  # cut short
    assert load_tensorrt(cfg, manifest, inference).describe()["built"]
    # Bytes its sidecar vouches for but TensorRT refuses (deserialize returns None): rebuilt, not trusted.
    garbage = b"not an engine" * 100
    engine.write_bytes(garbage)
    sidecar = json.loads(sidecar_path(engine).read_text(encoding="utf-8"))
    sidecar.update(engine_bytes=len(garbage), engine_sha256=hashlib.sha256(garbage).hexdigest())
    sidecar_path(engine).write_text(json.dumps(sidecar), encoding="utf-8")
    again = load_tensorrt(cfg, manifest, inference)
    assert again.describe()["built"]
    assert np.isfinite(again.run(_windows(2, manifest))[manifest.output.name]).all()


def test_results_match_onnx_runtime_fp32_within_the_tolerance(
    here: TensorRtHere, model_dir: Path, manifest: ModelManifest, precision: str, cache_dir: Path
) -> None:
    trt = load_tensorrt(_cfg(model_dir, precision), manifest, InferenceSection(cache_dir=cache_dir))
    ort = load_onnxruntime(model_dir / "pump_ae.onnx", manifest)
    # The tolerance `edge-gateway verify-engines` documents and applies (gateway/verify.py): values
    # within RTOL of FP32, threshold decisions equal away from the threshold. FP32 engines meet it
    # too (TF32 on Ampere and later stays well inside it).
    for n in (1, 8, MAX_BATCH, 2 * MAX_BATCH + 3):  # the last one runs in three chunks
        batch = _windows(n, manifest, seed=n)
        got, want = trt.run(batch), ort.run(batch)
        assert set(got) == set(want)
        parity = compare(want, got, manifest)
        assert parity.passed, f"batch {n}: " + "; ".join(parity.lines())


def test_throughput_at_batch_1_8_64(
    here: TensorRtHere,
    model_dir: Path,
    manifest: ModelManifest,
    precision: str,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    trt = load_tensorrt(_cfg(model_dir, precision), manifest, InferenceSection(cache_dir=cache_dir))
    ort = load_onnxruntime(model_dir / "pump_ae.onnx", manifest)
    lines = [f"{here.platform.gpu_name}, TensorRT {here.platform.tensorrt_version}, {precision} engine:"]
    for n in (1, 8, 64):
        batch = _windows(n, manifest)
        per_window = {}
        for label, backend in (("tensorrt", trt), ("onnxruntime-cpu", ort)):
            for _ in range(20):  # warm-up
                out = backend.run(batch)
            runs = 200
            started = time.perf_counter()
            for _ in range(runs):
                out = backend.run(batch)
            per_window[label] = (time.perf_counter() - started) / runs / n * 1e6
            assert np.isfinite(out[manifest.output.name]).all() and out[manifest.output.name].shape[0] == n
        lines.append(
            f"  batch {n:3d}: tensorrt {per_window['tensorrt']:8.1f} µs/window, "
            f"onnxruntime-cpu {per_window['onnxruntime-cpu']:8.1f} µs/window"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
