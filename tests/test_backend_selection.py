"""Backend selection and fallback on a machine without TensorRT or a GPU; ONNX Runtime tuned and checked.

Real ONNX Runtime sessions throughout. The order and `degraded` rules are asserted as they come out
on this CPU-only machine (TensorRT not installed, onnxruntime without CUDA): skipped elsewhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import gateway.demo
from gateway.config import InferenceSection, ModelConfig
from gateway.demo.run import demo_config, write_config
from gateway.errors import ModelError
from gateway.inference import BackendUnavailable, Fallback
from gateway.inference.onnxruntime import (
    CPU,
    CUDA,
    TENSORRT,
    OnnxRuntimeBackend,
    cuda_provider_available,
    gpu_providers,
)
from gateway.inference.select import backend_order, load_backend, tensorrt_present
from gateway.manifest import ModelManifest, load_manifest, manifest_path_for
from gateway.service import validate_config

MODEL = Path(gateway.demo.__file__).parent / "model" / "pump_ae.onnx"
NO_CUDA = f"no CUDA execution provider in onnxruntime {ort.__version__}"

cpu_only = pytest.mark.skipif(
    tensorrt_present() or cuda_provider_available(),
    reason="asserts the fallbacks of a machine without TensorRT/CUDA",
)


@pytest.fixture(scope="module")
def manifest() -> ModelManifest:
    """The committed demo manifest."""
    return load_manifest(manifest_path_for(MODEL))


def _model(path: Path = MODEL, **changes: Any) -> ModelConfig:
    return ModelConfig(
        **{"name": "pump_ae", "path": path, "assets": ["pump01", "pump02", "pump03", "pump04"], **changes}
    )


def _load(model: ModelConfig, manifest: ModelManifest, tmp_path: Path) -> tuple[Any, list[Fallback]]:
    return load_backend(model, manifest, InferenceSection(cache_dir=tmp_path / "cache"))


@cpu_only
def test_auto_ends_on_the_cpu_with_two_fallbacks_that_are_not_degraded(
    manifest: ModelManifest, tmp_path: Path
) -> None:
    backend, fallbacks = _load(_model(), manifest, tmp_path)
    assert backend.name == "onnxruntime-cpu"
    assert fallbacks == [
        Fallback("tensorrt", "TensorRT is not installed", degraded=False),
        Fallback("onnxruntime-gpu", NO_CUDA, degraded=False),
    ]
    assert backend.run(np.zeros((2, 32, 8), np.float32))["score"].shape == (2,)
    # Absent by platform: nothing was written to the cache directory.
    assert not (tmp_path / "cache").exists()


@cpu_only
@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        ("onnxruntime-gpu", [Fallback("onnxruntime-gpu", NO_CUDA, degraded=True)]),
        (
            "tensorrt",
            [
                Fallback("tensorrt", "TensorRT is not installed", degraded=True),
                Fallback("onnxruntime-gpu", NO_CUDA, degraded=True),
            ],
        ),
        ("onnxruntime-cpu", []),
    ],
)
def test_a_configured_backend_that_cannot_serve_is_a_degraded_fallback(
    manifest: ModelManifest, tmp_path: Path, configured: str, expected: list[Fallback]
) -> None:
    backend, fallbacks = _load(_model(backend=configured), manifest, tmp_path)
    assert backend.name == "onnxruntime-cpu"
    assert fallbacks == expected


def test_order_starts_at_the_configured_backend_and_never_goes_up() -> None:
    assert backend_order("auto") == ("tensorrt", "onnxruntime-gpu", "onnxruntime-cpu")
    assert backend_order("tensorrt") == ("tensorrt", "onnxruntime-gpu", "onnxruntime-cpu")
    assert backend_order("onnxruntime-gpu") == ("onnxruntime-gpu", "onnxruntime-cpu")
    assert backend_order("onnxruntime-cpu") == ("onnxruntime-cpu",)


@pytest.mark.parametrize("configured", ["auto", "tensorrt", "onnxruntime-gpu", "onnxruntime-cpu"])
def test_a_corrupt_model_fails_the_model_instead_of_falling_back(
    manifest: ModelManifest, tmp_path: Path, configured: str
) -> None:
    bad = tmp_path / "pump_ae.onnx"
    bad.write_bytes(MODEL.read_bytes()[:1000])
    with pytest.raises(ModelError, match="cannot load ONNX model") as info:
        _load(_model(bad, backend=configured), manifest, tmp_path)
    assert not isinstance(info.value, BackendUnavailable)


def test_a_manifest_that_does_not_fit_fails_the_model(manifest: ModelManifest, tmp_path: Path) -> None:
    wrong = ModelManifest.model_validate(
        {**manifest.model_dump(), "input": {**manifest.input.model_dump(), "window_length": 64}}
    )
    with pytest.raises(ModelError, match="window length is 32, manifest says 64") as info:
        _load(_model(), wrong, tmp_path)
    assert not isinstance(info.value, BackendUnavailable)


def test_session_options_are_applied(manifest: ModelManifest, tmp_path: Path) -> None:
    backend, _ = _load(_model(backend="onnxruntime-cpu", threads=2), manifest, tmp_path)
    assert isinstance(backend, OnnxRuntimeBackend)
    so = backend.session.get_session_options()
    assert so.intra_op_num_threads == 2
    assert so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_describe_says_what_runs_the_model(manifest: ModelManifest, tmp_path: Path) -> None:
    backend, _ = _load(_model(backend="onnxruntime-cpu"), manifest, tmp_path)
    assert backend.describe() == {
        "backend": "onnxruntime-cpu",
        "providers": [CPU],
        "precision": "fp32",
        "threads": 1,
        "onnxruntime": ort.__version__,
        "model": str(MODEL),
        "sha256": hashlib.sha256(MODEL.read_bytes()).hexdigest(),
    }


def _dense_model(path: Path, w: np.ndarray, b: np.ndarray, length: int) -> None:
    """window [B, L, C] -> score [B] = mean(relu(window @ w + b)) over L and the hidden units."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["window", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("ReduceMean", ["r"], ["score"], axes=[1, 2], keepdims=0),
        ],
        "dense",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", length, w.shape[0]])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    # IR 8 / opset 13: loadable by every onnxruntime the gateway supports (>= 1.17).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_onnxruntime_equals_a_numpy_reference(manifest: ModelManifest, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    length, channels, hidden = 16, 3, 5
    w = rng.standard_normal((channels, hidden)).astype(np.float32)
    b = rng.standard_normal(hidden).astype(np.float32)
    path = tmp_path / "dense.onnx"
    _dense_model(path, w, b, length)
    names = ["a", "b", "c"]
    dense = ModelManifest.model_validate(
        {
            **manifest.model_dump(),
            "name": "dense",
            "input": {"name": "window", "window_length": length, "channels": names},
            "output": {"kind": "anomaly_score", "name": "score"},
            "normalization": {"mean": [0.0] * channels, "std": [1.0] * channels},
        }
    )
    backend, _ = _load(_model(path, assets=["pump01"]), dense, tmp_path)
    windows = rng.standard_normal((9, length, channels)).astype(np.float32)
    expected = np.maximum(windows.astype(np.float64) @ w + b, 0.0).mean(axis=(1, 2))
    got = backend.run(windows)["score"]
    assert got.shape == (9,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The ReLU must matter, or the comparison would not tell a wrong activation apart.
    assert not np.allclose(expected, (windows.astype(np.float64) @ w + b).mean(axis=(1, 2)))


def _gpu_plan(tmp_path: Path, manifest: ModelManifest, **kw: Any) -> list[Any]:
    return gpu_providers(
        _model(max_batch=64),
        manifest,
        InferenceSection(cache_dir=tmp_path, workspace_mb=128),
        sha256="ab" * 32,
        **kw,
    )


def test_gpu_providers_give_tensorrt_explicit_profiles_and_caches(
    manifest: ModelManifest, tmp_path: Path
) -> None:
    plan = _gpu_plan(tmp_path, manifest, available=[TENSORRT, CUDA, CPU], fixed_batch=None)
    assert [p if isinstance(p, str) else p[0] for p in plan] == [TENSORRT, CUDA, CPU]
    trt = plan[0][1]
    # min 1, opt = the model's 4 assets, max = max_batch; window 32 x 8 channels.
    assert trt["trt_profile_min_shapes"] == "window:1x32x8"
    assert trt["trt_profile_opt_shapes"] == "window:4x32x8"
    assert trt["trt_profile_max_shapes"] == "window:64x32x8"
    assert trt["trt_fp16_enable"] == "1"
    assert trt["trt_max_workspace_size"] == str(128 * 2**20)
    assert trt["trt_engine_cache_enable"] == trt["trt_timing_cache_enable"] == "1"
    assert trt["trt_engine_cache_path"] == str(tmp_path / "ort-trt" / "pump_ae" / ("ab" * 8))
    assert trt["trt_timing_cache_path"] == str(tmp_path / "ort-trt")


def test_gpu_providers_without_tensorrt_or_a_dynamic_batch(manifest: ModelManifest, tmp_path: Path) -> None:
    cuda_only = _gpu_plan(tmp_path, manifest, available=[CUDA, CPU], fixed_batch=None)
    assert [p if isinstance(p, str) else p[0] for p in cuda_only] == [CUDA, CPU]
    static = _gpu_plan(tmp_path, manifest, available=[TENSORRT, CUDA, CPU], fixed_batch=1)
    assert not any(k.startswith("trt_profile") for k in static[0][1])


@cpu_only
def test_check_names_each_models_backend_and_why(tmp_path: Path) -> None:
    raw = demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "x.db")
    raw["inference"] = {"cache_dir": str(tmp_path / "cache")}
    _, summary = validate_config(write_config(raw, tmp_path / "c.yaml"))
    assert summary.endswith(
        f"; pump_ae on onnxruntime-cpu (tensorrt: TensorRT is not installed, onnxruntime-gpu: {NO_CUDA})"
    )
