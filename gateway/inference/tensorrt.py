"""TensorRT backend (TensorRT 10+ API): engines built from the model's ONNX, cached, run on one CUDA stream.

fp16 engines are built from the FP16 ONNX copy (FP32 inputs and outputs kept) as a strongly typed
network, the one FP16 path that works from TensorRT 10.3 (JetPack 6) to 11, where the FP16 builder
flag is gone; fp32 engines likewise, from the FP32 file. Engines are looked up by a key covering
everything they depend on (gateway.inference.engines), deserialized at start, and rebuilt when
missing, damaged or refused. Everything that needs no TensorRT lives in engines.py, where CPU
tests reach it; this module stays a thin layer over TensorRT's calls.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from gateway.config import InferenceSection, ModelConfig
from gateway.errors import GatewayError, ModelError
from gateway.inference import BackendUnavailable
from gateway.inference.cuda import CudaApi, CudaError, load_cuda
from gateway.inference.engines import (
    EngineKey,
    Platform,
    Profile,
    TensorSpec,
    atomic_write,
    buffer_sizes,
    engine_path,
    engine_source,
    file_sha256,
    load_cached,
    profile_shapes,
    read_l4t_release,
    timing_cache_path,
    write_engine,
)
from gateway.manifest import ModelManifest

logger = logging.getLogger(__name__)

# TensorRT's own messages go to this logger; WARNING and above only (INFO is a build's chatter).
trt_logger = logging.getLogger("gateway.inference.tensorrt.trt")


def import_tensorrt() -> ModuleType:
    """The tensorrt module; BackendUnavailable when it is not installed or its libraries do not load."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(
            f"tensorrt is not installed ({exc}); on a Jetson it comes with JetPack (python3-libnvinfer)"
        ) from exc
    return tensorrt


@contextlib.contextmanager
def _tensorrt_errors(what: str) -> Iterator[None]:
    """TensorRT's Python exceptions (RuntimeError, TypeError, ... from pybind11) as BackendUnavailable."""
    try:
        yield
    except GatewayError:
        raise
    except Exception as exc:  # pybind11 raises several unrelated classes; each means "cannot serve here"
        raise BackendUnavailable(f"{what}: {exc}") from exc


@functools.cache
def _logger_for(trt: ModuleType) -> Any:
    """One TensorRT logger per process: TensorRT keeps it for every object built through it."""

    base: Any = trt.ILogger

    class _Logger(base):
        """Routes TensorRT's WARNING and worse to Python logging; keeps the last errors for messages."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: deque[str] = deque(maxlen=8)

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                trt_logger.error("%s", msg)
            elif severity == trt.ILogger.WARNING:
                trt_logger.warning("%s", msg)

    return _Logger()


@functools.cache
def _runtime_for(trt: ModuleType) -> Any:
    """One runtime per process, alive as long as the engines it deserialized."""
    return trt.Runtime(_logger_for(trt))


@dataclass(frozen=True)
class TensorRtHere:
    """TensorRT, CUDA and the platform facts of this machine, probed once."""

    trt: ModuleType
    cuda: CudaApi
    platform: Platform


def open_tensorrt() -> TensorRtHere:
    """Import TensorRT and CUDA and probe the GPU; BackendUnavailable when any of them is missing."""
    trt = import_tensorrt()
    cuda = load_cuda()
    gpu, capability = cuda.device_properties()
    return TensorRtHere(trt, cuda, Platform(str(trt.__version__), gpu, capability, read_l4t_release()))


@dataclass
class PreparedEngine:
    """A deserialized engine and where it came from."""

    key: EngineKey
    path: Path
    source: Path
    engine: Any  # trt.ICudaEngine
    built: bool  # False: taken from the cache
    build_s: float | None
    size: int


def prepare_engine(
    here: TensorRtHere,
    model_cfg: ModelConfig,
    manifest: ModelManifest,
    inference_cfg: InferenceSection,
    *,
    force: bool = False,
    on_build: Callable[[EngineKey], None] | None = None,
) -> PreparedEngine:
    """The model's engine from the cache, or built (and cached) when missing, damaged or refused.

    `force` rebuilds regardless; `on_build(key)` is called before a build starts (progress output).
    """
    source = engine_source(model_cfg)
    profile = profile_shapes(manifest, model_cfg.max_batch, len(model_cfg.assets))
    key = EngineKey(model_cfg.name, file_sha256(source), model_cfg.precision, profile, here.platform)
    path = engine_path(key, inference_cfg.cache_dir)
    runtime = _runtime_for(here.trt)
    data = None if force else load_cached(path, key)
    if data is not None:
        with _tensorrt_errors(f"cannot deserialize {path}"):
            engine = runtime.deserialize_cuda_engine(data)
        if engine is not None:
            return PreparedEngine(key, path, source, engine, False, None, len(data))
        # No pre-flight check exists: a refused engine is rebuilt, never trusted.
        logger.warning("model %s: TensorRT refused the cached engine %s: rebuilding", key.model, path)
    if on_build is not None:
        on_build(key)
    started = time.monotonic()
    data = _build(here.trt, source, manifest.input.name, profile, inference_cfg, key)
    build_s = time.monotonic() - started
    logger.info(
        "model %s: built %s engine in %.1f s (%d bytes)", key.model, key.precision, build_s, len(data)
    )
    try:
        write_engine(path, data, key, source=source, build_s=build_s)
    except OSError as exc:  # the engine still serves from memory; the next start builds again
        logger.warning("model %s: cannot cache the engine in %s: %s", key.model, path.parent, exc)
    with _tensorrt_errors(f"cannot deserialize the engine just built from {source}"):
        engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise BackendUnavailable(f"TensorRT cannot deserialize the engine it just built from {source}")
    return PreparedEngine(key, path, source, engine, True, build_s, len(data))


def _build(
    trt: ModuleType,
    source: Path,
    input_name: str,
    profile: Profile,
    inference_cfg: InferenceSection,
    key: EngineKey,
) -> bytes:
    """Parse `source`, build a serialized engine for `profile`, and persist the updated timing cache."""
    log = _logger_for(trt)
    with _tensorrt_errors(f"engine build from {source} failed"):
        builder = trt.Builder(log)
        # Strongly typed: precision comes from the ONNX graph's own types (the FP16 copy for fp16).
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, log)
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailable(f"TensorRT cannot parse {source}: {errors or 'no error text'}")
        inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        if input_name not in inputs:
            raise ModelError(
                f"{source}: model does not match its manifest: no input {input_name!r}; it has {inputs}"
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, inference_cfg.workspace_mb << 20)
        opt = builder.create_optimization_profile()
        opt.set_shape(
            input_name,
            profile.shape(profile.min_batch),
            profile.shape(profile.opt_batch),
            profile.shape(profile.max_batch),
        )
        config.add_optimization_profile(opt)
        timing_path = timing_cache_path(key.platform, inference_cfg.cache_dir)
        try:
            timing = timing_path.read_bytes()
        except FileNotFoundError:
            timing = b""
        if not config.set_timing_cache(config.create_timing_cache(timing), False):
            logger.warning(
                "timing cache %s does not fit this TensorRT/GPU: starting an empty one", timing_path
            )
            config.set_timing_cache(config.create_timing_cache(b""), False)
        log.errors.clear()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            # "Could not find any implementation" here often means the workspace or the GPU memory ran out.
            errors = "; ".join(log.errors) or "no error text"
            raise BackendUnavailable(
                f"engine build from {source} failed (workspace {inference_cfg.workspace_mb} MB): {errors}"
            )
        timing = bytes(config.get_timing_cache().serialize())
    try:
        atomic_write(timing_path, timing)
    except OSError as exc:
        logger.warning("cannot save the timing cache %s: %s", timing_path, exc)
    return bytes(serialized)


def _tensor_specs(trt: ModuleType, engine: Any) -> list[TensorSpec]:
    specs = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        specs.append(
            TensorSpec(
                name=name,
                shape=tuple(engine.get_tensor_shape(name)),
                dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
                is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
            )
        )
    return specs


def _release(cuda: CudaApi, buffers: list[np.ndarray | int], stream: int) -> None:
    """Free a backend's CUDA resources (its finalizer: there is no close() in the backend protocol)."""
    for buffer in buffers:
        cuda.free(buffer)
    cuda.stream_destroy(stream)


class TensorRtBackend:
    """A TensorRT engine, buffers for its profile's max batch, its own CUDA stream; see InferenceBackend."""

    name = "tensorrt"

    def __init__(self, here: TensorRtHere, prepared: PreparedEngine, manifest: ModelManifest) -> None:
        self._here = here
        self._prepared = prepared
        self._cuda = here.cuda
        self.manifest = manifest
        profile = prepared.key.profile
        self._max_batch = profile.max_batch
        self._window = (profile.window_length, profile.channels)
        self._input = manifest.input.name
        self._outputs = manifest.output_names()
        with _tensorrt_errors(f"{prepared.path}: unsupported I/O tensors"):
            specs = {t.name: t for t in _tensor_specs(here.trt, prepared.engine)}
        self._check_signature(specs)
        sizes = buffer_sizes(list(specs.values()), self._max_batch)
        with _tensorrt_errors("cannot create an execution context"):
            self._context = prepared.engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailable(
                f"{prepared.path}: TensorRT cannot create an execution context (GPU memory?)"
            )
        self._stream = self._cuda.stream_create()
        owned: list[np.ndarray | int] = []
        # Not at exit: CUDA may be unloading by then, and the process's end frees everything anyway.
        weakref.finalize(self, _release, self._cuda, owned, self._stream).atexit = False
        # Pinned host views shaped [max_batch, *row] per tensor, and device pointers; allocated once.
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, int] = {}
        for name, spec in specs.items():
            raw = self._cuda.alloc_host_pinned(sizes[name])
            owned.append(raw)
            self._host[name] = raw.view(spec.dtype).reshape((self._max_batch, *spec.row_shape))
            self._device[name] = self._cuda.alloc_device(sizes[name])
            owned.append(self._device[name])
            if not self._context.set_tensor_address(name, self._device[name]):
                raise BackendUnavailable(f"{prepared.path}: TensorRT refused the address of tensor {name!r}")
        self._specs = specs
        self._rows: int | None = None  # the batch size the context's input shape is set for

    def _check_signature(self, specs: dict[str, TensorSpec]) -> None:
        """The engine must have the manifest's input ([B, L, C]) and outputs, like the ONNX Runtime check."""
        where = f"{self._prepared.source}: model does not match its manifest:"
        spec = specs.get(self._input)
        if spec is None or not spec.is_input:
            raise ModelError(f"{where} no input {self._input!r}; the engine has {sorted(specs)}")
        if spec.row_shape != self._window:
            raise ModelError(
                f"{where} input {self._input!r} has rows {spec.row_shape}, manifest says {self._window}"
            )
        missing = [o for o in self._outputs if o not in specs or specs[o].is_input]
        if missing:
            raise ModelError(f"{where} no output(s) {missing}; the engine has {sorted(specs)}")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run [B, L, C] float32 windows, B >= 1, in chunks of at most the profile's max batch."""
        where = self._prepared.source
        if batch.dtype != np.float32:
            raise ModelError(f"{where}: batch dtype is {batch.dtype}, expected float32")
        if batch.ndim != 3 or batch.shape[1:] != self._window or batch.shape[0] < 1:
            raise ModelError(
                f"{where}: batch shape {batch.shape} does not fit [B, {self._window[0]}, {self._window[1]}]"
            )
        n = batch.shape[0]
        results = {o: np.empty((n, *self._specs[o].row_shape), self._specs[o].dtype) for o in self._outputs}
        for start in range(0, n, self._max_batch):
            self._run_chunk(batch[start : start + self._max_batch], results, start)
        return results

    def _run_chunk(self, chunk: np.ndarray, results: dict[str, np.ndarray], start: int) -> None:
        rows = chunk.shape[0]
        if rows != self._rows:
            if not self._context.set_input_shape(self._input, (rows, *self._window)):
                raise ModelError(
                    f"{self._prepared.source}: TensorRT refused input shape {(rows, *self._window)}"
                )
            self._rows = rows
        host_in = self._host[self._input][:rows]
        np.copyto(host_in, chunk, casting="same_kind")
        # Only the rows of this batch cross the bus, both ways.
        self._cuda.memcpy_htod_async(self._device[self._input], host_in, self._stream)
        if not self._context.execute_async_v3(self._stream):
            errors = "; ".join(_logger_for(self._here.trt).errors) or "no error text"
            raise ModelError(f"{self._prepared.source}: TensorRT execution failed: {errors}")
        for name in self._outputs:
            self._cuda.memcpy_dtoh_async(self._host[name][:rows], self._device[name], self._stream)
        self._cuda.stream_synchronize(self._stream)
        for name in self._outputs:
            results[name][start : start + rows] = self._host[name][:rows]

    def describe(self) -> dict[str, Any]:
        """Backend, TensorRT version, GPU, precision, engine file, key and profile."""
        key, platform = self._prepared.key, self._here.platform
        return {
            "backend": self.name,
            "tensorrt": platform.tensorrt_version,
            "gpu": platform.gpu_name,
            "compute_capability": platform.compute_capability,
            "l4t": platform.l4t_release,
            "cuda": self._cuda.name,
            "precision": key.precision,
            "source": str(self._prepared.source),
            "engine": str(self._prepared.path),
            "engine_bytes": self._prepared.size,
            "key": key.digest,
            "profile": {
                "min": key.profile.min_batch,
                "opt": key.profile.opt_batch,
                "max": key.profile.max_batch,
            },
            "built": self._prepared.built,
            "build_s": self._prepared.build_s,
        }


def load_tensorrt(
    model_cfg: ModelConfig, manifest: ModelManifest, inference_cfg: InferenceSection
) -> TensorRtBackend:
    """Load (building if needed) the model's engine; BackendUnavailable when TensorRT cannot serve it here.

    Blocking, and a build can take minutes: call it on the inference worker, or ahead of time with
    `edge-gateway build-engines`. A CUDA failure while loading (out of GPU memory) or an unreadable
    engine cache is BackendUnavailable too; a manifest that does not fit the model is a ModelError.
    """
    here = open_tensorrt()
    try:
        backend = TensorRtBackend(here, prepare_engine(here, model_cfg, manifest, inference_cfg), manifest)
    except (CudaError, OSError) as exc:
        raise BackendUnavailable(f"model {model_cfg.name}: {exc}") from exc
    logger.info(
        "loaded model %s on TensorRT %s, %s engine %s",
        model_cfg.name,
        here.platform.tensorrt_version,
        model_cfg.precision,
        backend.describe()["engine"],
    )
    return backend
