"""ONNX Runtime backends: one InferenceSession per model on the CPU, or on the GPU (TensorRT/CUDA providers).

Tuned on purpose for small models on an edge box that also runs acquisition: sessions are created
once, at load; each tick runs one batch per model; intra-op threads stay at 1 or 2 and never spin.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from gateway.config import InferenceSection, ModelConfig
from gateway.errors import ModelError
from gateway.inference import BackendUnavailable
from gateway.inference.engines import Profile, file_sha256, profile_shapes
from gateway.manifest import ModelManifest

logger = logging.getLogger(__name__)

_FLOAT = "tensor(float)"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
# ORT errors that mean the file itself is bad, whichever provider reads it; anything else raised while
# a GPU session is created is the provider's failure, and the model may still run on the CPU.
_BAD_MODEL = (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.NoSuchFile, ort_errors.NoModel)


def _reason(exc: Exception) -> str:
    """ORT's message without its '[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :' prefix, on one line."""
    text = " ".join(str(exc).split())
    return text.rsplit(" : ", 1)[-1] if text.startswith("[ONNXRuntimeError]") else text


def session_options(threads: int) -> ort.SessionOptions:
    """Session options for a small model in a long-running daemon; each choice says why."""
    so = ort.SessionOptions()
    # One or two intra-op threads: a model of a few hundred kB gains little from more, and the cores
    # are shared with acquisition and MQTT. With 1, ORT creates no pool thread at all.
    so.intra_op_num_threads = threads
    # Sequential execution: the graphs are chains, so an inter-op pool would only add idle threads.
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    # Spinning workers burn a whole core between runs (measured: 102% of a core with a run every
    # 10 ms, 1-2% without); the gateway runs one batch per model every few hundred ms.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # All graph optimizations: paid once at load, repaid on every run of a long-lived session.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # session.set_denormal_as_zero is left off: it sets flush-to-zero on the thread that creates the
    # session, which leaks into everything else that thread computes (NumPy included).
    return so


def open_session(
    model_path: Path, *, threads: int = 1, providers: list[str | tuple[str, dict[str, str]]] | None = None
) -> ort.InferenceSession:
    """An InferenceSession with session_options(threads) on `providers` (default: the CPU only).

    A bad file is a ModelError; any other failure with explicit (GPU) providers is BackendUnavailable.
    """
    if threads < 1:
        raise ModelError(f"{model_path}: threads must be >= 1, got {threads}")
    if not model_path.is_file():
        raise ModelError(f"{model_path}: model file not found")
    try:
        return ort.InferenceSession(
            str(model_path), sess_options=session_options(threads), providers=providers or [CPU]
        )
    except Exception as exc:  # ORT raises pybind classes (InvalidProtobuf, Fail, ...) with no common base
        reason = _reason(exc).replace(f"Load model from {model_path} failed:", "").strip()
        if providers and not isinstance(exc, _BAD_MODEL):
            raise BackendUnavailable(f"{model_path}: cannot create the session: {reason}") from exc
        raise ModelError(f"{model_path}: cannot load ONNX model: {reason}") from exc


def _fixed(dim: object) -> int | None:
    """A static dimension, or None for a symbolic/unknown one."""
    return dim if isinstance(dim, int) else None


def check_signature(session: ort.InferenceSession, model_path: Path, manifest: ModelManifest) -> int | None:
    """Fail at load, not at the first window, when the graph does not match the manifest; the fixed batch or None."""
    where = f"{model_path}: model does not match its manifest:"
    name, window = manifest.input.name, (manifest.input.window_length, len(manifest.input.channels))
    inputs = {i.name: i for i in session.get_inputs()}
    spec = inputs.get(name)
    if spec is None:
        raise ModelError(f"{where} no input {name!r}; the model has {sorted(inputs)}")
    if spec.type != _FLOAT:
        raise ModelError(f"{where} input {name!r} is {spec.type}, expected {_FLOAT}")
    if len(spec.shape) != 3:
        raise ModelError(f"{where} input {name!r} has shape {spec.shape}, expected [batch, L, C]")
    length, channels = (_fixed(d) for d in spec.shape[1:])
    if length is not None and length != window[0]:
        raise ModelError(f"{where} model window length is {length}, manifest says {window[0]}")
    if channels is not None and channels != window[1]:
        raise ModelError(f"{where} model has {channels} channels, manifest lists {window[1]}")
    have = {o.name for o in session.get_outputs()}
    missing = [o for o in manifest.output_names() if o not in have]
    if missing:
        raise ModelError(f"{where} no output(s) {missing}; the model has {sorted(have)}")
    return _fixed(spec.shape[0])


class OnnxRuntimeBackend:
    """An ONNX Runtime session plus the manifest that says how to feed it; see InferenceBackend."""

    def __init__(
        self,
        session: ort.InferenceSession,
        model_path: Path,
        manifest: ModelManifest,
        *,
        name: str = "onnxruntime-cpu",
        precision: str = "fp32",
        sha256: str | None = None,
    ) -> None:
        self.name = name
        self.model_path = model_path
        self.manifest = manifest
        self.precision = precision
        # Public for benchmarks and tests that time or inspect the bare session under the backend.
        self.session = session
        self._input = manifest.input.name
        self._window = (manifest.input.window_length, len(manifest.input.channels))
        self._outputs = manifest.output_names()
        self._batch = check_signature(session, model_path, manifest)
        # Once, at load: describe() is called for status and `check`, and must not read the file again.
        self._sha256 = sha256 or file_sha256(model_path)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on [B, L, C] float32 normalized windows; returns {output name: array}."""
        if batch.dtype != np.float32:
            raise ModelError(f"{self.model_path}: batch dtype is {batch.dtype}, expected float32")
        if batch.ndim != 3 or batch.shape[1:] != self._window or batch.shape[0] < 1:
            raise ModelError(
                f"{self.model_path}: batch shape {batch.shape} does not fit [B, {self._window[0]}, {self._window[1]}]"
            )
        if self._batch is not None and batch.shape[0] != self._batch:
            raise ModelError(
                f"{self.model_path}: model takes batches of exactly {self._batch}, got {batch.shape[0]}"
            )
        try:
            results = self.session.run(self._outputs, {self._input: np.ascontiguousarray(batch)})
        except Exception as exc:  # a runtime failure inside the graph; keep ORT's text for the log
            raise ModelError(f"{self.model_path}: inference failed: {_reason(exc)}") from exc
        return dict(zip(self._outputs, results, strict=True))

    def describe(self) -> dict[str, Any]:
        """Backend name, the providers the session really uses, precision, threads, versions and the file."""
        return {
            "backend": self.name,
            "providers": self.session.get_providers(),
            "precision": self.precision,
            "threads": self.session.get_session_options().intra_op_num_threads,
            "onnxruntime": ort.__version__,
            "model": str(self.model_path),
            "sha256": self._sha256,
        }


def load_onnxruntime(model_path: Path, manifest: ModelManifest, *, threads: int = 1) -> OnnxRuntimeBackend:
    """Load `model_path` for CPU inference and check it against `manifest`; raises ModelError."""
    backend = OnnxRuntimeBackend(open_session(model_path, threads=threads), model_path, manifest)
    logger.info(
        "loaded model %s %s from %s (onnxruntime %s on the CPU, %d thread(s))",
        manifest.name,
        manifest.version,
        model_path,
        ort.__version__,
        threads,
    )
    return backend


def load_onnxruntime_cpu(
    model_cfg: ModelConfig, manifest: ModelManifest, inference_cfg: InferenceSection
) -> OnnxRuntimeBackend:
    """The `onnxruntime-cpu` backend of a configured model; raises ModelError."""
    return load_onnxruntime(model_cfg.path, manifest, threads=model_cfg.threads)


def cuda_provider_available() -> bool:
    """Whether this onnxruntime build has the CUDA execution provider (not whether a GPU is there)."""
    return CUDA in ort.get_available_providers()


def trt_profile(input_name: str, profile: Profile) -> dict[str, str]:
    """ORT's explicit TensorRT profile options ("window:1x32x8") for the profile's dynamic batch."""

    def shape(batch: int) -> str:
        return f"{input_name}:" + "x".join(str(d) for d in profile.shape(batch))

    return {
        "trt_profile_min_shapes": shape(profile.min_batch),
        "trt_profile_opt_shapes": shape(profile.opt_batch),
        "trt_profile_max_shapes": shape(profile.max_batch),
    }


def trt_engine_cache_dir(model_cfg: ModelConfig, inference_cfg: InferenceSection, sha256: str) -> Path:
    """Where ORT's TensorRT provider keeps this model file's engines: <cache_dir>/ort-trt/<model>/<sha256[:16]>."""
    return inference_cfg.cache_dir / "ort-trt" / model_cfg.name / sha256[:16]


def gpu_providers(
    model_cfg: ModelConfig,
    manifest: ModelManifest,
    inference_cfg: InferenceSection,
    *,
    available: list[str],
    fixed_batch: int | None,
    sha256: str,
) -> list[str | tuple[str, dict[str, str]]]:
    """The provider list for `onnxruntime-gpu`, best first: TensorRT (when built in), CUDA, then CPU."""
    providers: list[str | tuple[str, dict[str, str]]] = []
    if TENSORRT in available:
        trt = {
            # The builder's FP16 flag on the FP32 graph (weakly typed): what ORT's provider offers. The
            # strongly typed FP16 engine from the FP16 ONNX copy is the `tensorrt` backend's job.
            "trt_fp16_enable": "1" if model_cfg.precision == "fp16" else "0",
            "trt_max_workspace_size": str(inference_cfg.workspace_mb * 2**20),
            # Engines keyed by the file's hash: ORT names its cache files by the graph's structure,
            # not its weights, so a retrained model with the same layers would reuse a stale engine.
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": str(trt_engine_cache_dir(model_cfg, inference_cfg, sha256)),
            # Kernel timings depend on the GPU and TensorRT, not the model: one cache serves every model.
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": str(inference_cfg.cache_dir / "ort-trt"),
        }
        if fixed_batch is None:
            # min 1, opt = the assets sharing the model (one batch per tick), max = max_batch.
            profile = profile_shapes(manifest, model_cfg.max_batch, len(model_cfg.assets))
            trt.update(trt_profile(manifest.input.name, profile))
        providers.append((TENSORRT, trt))
    # Grow the CUDA arena by what is asked, not to the next power of two: a Jetson's GPU shares its RAM.
    providers.append((CUDA, {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}))
    providers.append(CPU)
    return providers


def load_onnxruntime_gpu(
    model_cfg: ModelConfig, manifest: ModelManifest, inference_cfg: InferenceSection
) -> OnnxRuntimeBackend:
    """The `onnxruntime-gpu` backend; BackendUnavailable when no CUDA provider can serve, ModelError for a bad model."""
    available = ort.get_available_providers()
    if CUDA not in available:
        raise BackendUnavailable(f"no CUDA execution provider in onnxruntime {ort.__version__}")
    path = model_cfg.path
    # A plain CPU session first: a bad file or manifest is then a ModelError, never a GPU fallback,
    # and the input's batch dimension (static or dynamic) decides the TensorRT profile.
    fixed_batch = check_signature(open_session(path), path, manifest)
    sha256 = file_sha256(path)
    if TENSORRT in available:
        cache = trt_engine_cache_dir(model_cfg, inference_cfg, sha256)
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # Without its cache the TensorRT provider would rebuild every engine at each start, on the
            # inference thread; CUDA alone starts at once.
            logger.warning(
                "model %s: no TensorRT provider, cannot create %s: %s", model_cfg.name, cache, exc.strerror
            )
            available = [p for p in available if p != TENSORRT]
    providers = gpu_providers(
        model_cfg, manifest, inference_cfg, available=available, fixed_batch=fixed_batch, sha256=sha256
    )
    session = open_session(path, threads=model_cfg.threads, providers=providers)
    used = session.get_providers()
    # ORT does not raise when the CUDA provider fails to load (missing libraries, no device): it logs
    # and runs on the CPU. Only the session's own list tells.
    if CUDA not in used:
        raise BackendUnavailable(
            f"the CUDA execution provider did not load (session providers: {', '.join(used)})"
        )
    if TENSORRT in available and TENSORRT not in used:
        logger.warning(
            "model %s: ONNX Runtime's TensorRT provider did not load; running on CUDA", model_cfg.name
        )
    precision = model_cfg.precision if TENSORRT in used else "fp32"
    backend = OnnxRuntimeBackend(
        session, path, manifest, name="onnxruntime-gpu", precision=precision, sha256=sha256
    )
    logger.info(
        "loaded model %s %s from %s (onnxruntime %s on %s, %s)",
        manifest.name,
        manifest.version,
        path,
        ort.__version__,
        ", ".join(used),
        precision,
    )
    return backend
