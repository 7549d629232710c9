"""ONNX Runtime backend against the committed demo model: real sessions, no PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gateway.demo
from edge_models.data import window_view
from gateway.demo.signals import PumpFleet, normal_history
from gateway.errors import ModelError
from gateway.inference.onnxruntime import OnnxRuntimeBackend, load_onnxruntime
from gateway.manifest import ModelManifest, load_manifest, manifest_path_for
from gateway.normalize import Normalizer

MODEL = Path(gateway.demo.__file__).parent / "model" / "pump_ae.onnx"


@pytest.fixture(scope="module")
def manifest() -> ModelManifest:
    """The committed demo manifest."""
    return load_manifest(manifest_path_for(MODEL))


@pytest.fixture(scope="module")
def backend(manifest: ModelManifest) -> OnnxRuntimeBackend:
    """The committed demo model loaded as the gateway loads it."""
    return load_onnxruntime(MODEL, manifest)


def _windows(manifest: ModelManifest, history: np.ndarray, hop: int) -> np.ndarray:
    """Normalized [N, L, C] windows of every pump of a [T, P, C] history."""
    raw = np.concatenate(
        [window_view(history[:, p], manifest.input.window_length, hop) for p in range(history.shape[1])]
    )
    return Normalizer(manifest).apply(raw, out=np.empty(raw.shape, np.float32))


def _with(manifest: ModelManifest, **changes: Any) -> ModelManifest:
    """A copy of the manifest with top-level sections replaced, validated like a file would be."""
    return ModelManifest.model_validate({**manifest.model_dump(), **changes})


def test_outputs_named_by_manifest(backend: OnnxRuntimeBackend, manifest: ModelManifest) -> None:
    windows = _windows(manifest, normal_history(1, 10, 10.0, seed=5), hop=50)
    out = backend.run(windows[:1])
    assert backend.name == "onnxruntime-cpu"
    assert set(out) == {"score", "channel_error"}
    assert out["score"].shape == (1,) and out["score"].dtype == np.float32
    assert out["channel_error"].shape == (1, len(manifest.input.channels))
    # The score is the mean of the per-channel errors, computed inside the graph.
    np.testing.assert_allclose(out["score"], out["channel_error"].mean(axis=1), rtol=1e-5)


@pytest.mark.parametrize("size", [1, 17])
def test_batch_equals_one_by_one(backend: OnnxRuntimeBackend, manifest: ModelManifest, size: int) -> None:
    windows = _windows(manifest, normal_history(2, 60, 10.0, seed=11), hop=30)[:size]
    assert len(windows) == size
    batched = backend.run(windows)
    singles = [backend.run(windows[i : i + 1]) for i in range(size)]
    for name in ("score", "channel_error"):
        np.testing.assert_allclose(
            batched[name], np.concatenate([s[name] for s in singles]), rtol=1e-5, atol=1e-7
        )
    # Distinct windows must give distinct scores, or the comparison above proves nothing.
    assert len(np.unique(batched["score"])) == size


def test_normal_below_high_fault_far_above(backend: OnnxRuntimeBackend, manifest: ModelManifest) -> None:
    high = manifest.thresholds.high
    normal = backend.run(_windows(manifest, normal_history(4, 300, 10.0, seed=42), hop=4))["score"]
    assert normal.max() < high

    fleet = PumpFleet(4, seed=43)
    fleet.fault[:] = 0.6
    faulty = np.stack([fleet.step(0.1) for _ in range(300)])
    scores = backend.run(_windows(manifest, faulty[100:], hop=8))["score"]
    assert scores.min() > 10 * high


def test_missing_file(manifest: ModelManifest, tmp_path: Path) -> None:
    path = tmp_path / "absent.onnx"
    with pytest.raises(ModelError, match="absent.onnx: model file not found"):
        load_onnxruntime(path, manifest)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_one_line_model_error(manifest: ModelManifest, tmp_path: Path, damage: str) -> None:
    data = MODEL.read_bytes()
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x07not an onnx model\xff" * 100 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ModelError) as info:
        load_onnxruntime(path, manifest)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot load ONNX model")
    assert "\n" not in message and "ONNXRuntimeError" not in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("length", "window length is 32, manifest says 64"),
        ("channels", "model has 8 channels, manifest lists 7"),
        ("input_name", "no input 'x'"),
        ("output_name", "no output"),
    ],
)
def test_manifest_that_does_not_fit_the_model(manifest: ModelManifest, change: str, expected: str) -> None:
    inp = manifest.input.model_dump()
    if change == "length":
        bad = _with(manifest, input={**inp, "window_length": 64})
    elif change == "channels":
        norm = manifest.normalization
        bad = _with(
            manifest,
            input={**inp, "channels": inp["channels"][:7]},
            normalization={"mean": norm.mean[:7], "std": norm.std[:7]},
        )
    elif change == "input_name":
        bad = _with(manifest, input={**inp, "name": "x"})
    else:
        bad = _with(manifest, output={**manifest.output.model_dump(), "name": "anomaly"})
    with pytest.raises(ModelError, match=expected):
        load_onnxruntime(MODEL, bad)


@pytest.mark.parametrize(
    "batch",
    [
        np.zeros((2, 31, 8), np.float32),
        np.zeros((2, 32, 9), np.float32),
        np.zeros((32, 8), np.float32),
        np.zeros((0, 32, 8), np.float32),
        np.zeros((2, 32, 8), np.float64),
    ],
    ids=["short", "wide", "rank2", "empty", "float64"],
)
def test_bad_batch_is_model_error(backend: OnnxRuntimeBackend, batch: np.ndarray) -> None:
    with pytest.raises(ModelError, match="batch"):
        backend.run(batch)
    # The session survives a rejected batch.
    assert backend.run(np.zeros((3, 32, 8), np.float32))["score"].shape == (3,)


def test_threads_must_be_positive(manifest: ModelManifest) -> None:
    with pytest.raises(ModelError, match="threads must be >= 1"):
        load_onnxruntime(MODEL, manifest, threads=0)
