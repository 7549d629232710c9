"""Choosing a model's backend: the configured one first, then the lesser ones, each skip recorded with its reason.

Order: `auto` tries tensorrt, onnxruntime-gpu, onnxruntime-cpu; a named backend is tried first and
only the backends after it in BACKENDS follow (onnxruntime-gpu never falls "up" to tensorrt). A
`BackendUnavailable` moves on to the next and becomes a `Fallback`; any other `ModelError` (a
corrupt file, a manifest that does not fit) fails the model, since no backend would do better.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

from gateway.config import InferenceSection, ModelConfig
from gateway.errors import ModelError
from gateway.inference import BACKENDS, BackendUnavailable, Fallback, InferenceBackend
from gateway.inference.onnxruntime import cuda_provider_available, load_onnxruntime_cpu, load_onnxruntime_gpu
from gateway.manifest import ModelManifest

logger = logging.getLogger(__name__)

Loader = Callable[[ModelConfig, ModelManifest, InferenceSection], InferenceBackend]

# A CUDA-capable device: a discrete GPU's driver (/dev/nvidia0, /proc/driver/nvidia) or a Jetson's
# integrated GPU (/dev/nvgpu on L4T 32+, /dev/nvhost-gpu before it).
_CUDA_DEVICE_PATHS = ("/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/nvgpu", "/dev/nvhost-gpu")


@functools.cache
def tensorrt_present() -> bool:
    """Whether TensorRT's Python bindings are installed (found, not imported: importing costs seconds)."""
    return importlib.util.find_spec("tensorrt") is not None


@functools.cache
def cuda_device_present() -> bool:
    """Whether this machine has a CUDA device driver (discrete GPU or Jetson), without initializing CUDA."""
    return any(Path(p).exists() for p in _CUDA_DEVICE_PATHS)


def prerequisites_present(backend: str) -> bool:
    """Whether this machine has what `backend` needs, so that its failure is a fault and not the platform."""
    if backend == "tensorrt":
        return tensorrt_present() and cuda_device_present()
    if backend == "onnxruntime-gpu":
        return cuda_provider_available() and cuda_device_present()
    return True


def backend_order(configured: str) -> tuple[str, ...]:
    """The backends to try for `configured`, in order: all for auto, else it and those after it."""
    return BACKENDS if configured == "auto" else BACKENDS[BACKENDS.index(configured) :]


def _load_tensorrt(
    model_cfg: ModelConfig, manifest: ModelManifest, inference_cfg: InferenceSection
) -> InferenceBackend:
    """The TensorRT backend, imported only when TensorRT is installed (its import pulls in CUDA)."""
    if not tensorrt_present():
        raise BackendUnavailable("TensorRT is not installed")
    try:
        from gateway.inference.tensorrt import load_tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT backend not available: {exc}") from exc
    return load_tensorrt(model_cfg, manifest, inference_cfg)


_LOADERS: dict[str, Loader] = {
    "tensorrt": _load_tensorrt,
    "onnxruntime-gpu": load_onnxruntime_gpu,
    "onnxruntime-cpu": load_onnxruntime_cpu,
}


def load_backend(
    model_cfg: ModelConfig, manifest: ModelManifest, inference_cfg: InferenceSection
) -> tuple[InferenceBackend, list[Fallback]]:
    """Load the model on the best backend that serves; the backend and the ones skipped, best first.

    Blocking (engine builds, file loads): call it on the inference worker. Raises ModelError when the
    model itself is bad, whichever backend found out.
    """
    fallbacks: list[Fallback] = []
    for name in backend_order(model_cfg.backend):
        try:
            backend = _LOADERS[name](model_cfg, manifest, inference_cfg)
        except BackendUnavailable as exc:
            reason = str(exc)
        except ModelError:
            raise
        except Exception as exc:
            # A GPU stack fails in ways no loader foresees (driver, bindings); the model must still be
            # scored on the CPU. The CPU backend's own surprises are bugs: let them through.
            if name == BACKENDS[-1]:
                raise
            logger.warning("model %s: %s failed unexpectedly", model_cfg.name, name, exc_info=True)
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        else:
            return backend, fallbacks
        degraded = model_cfg.backend != "auto" or prerequisites_present(name)
        fallbacks.append(Fallback(backend=name, reason=reason, degraded=degraded))
        logger.log(
            logging.WARNING if degraded else logging.INFO,
            "model %s: %s skipped%s: %s",
            model_cfg.name,
            name,
            " (degraded)" if degraded else "",
            reason,
        )
    raise ModelError(f"model {model_cfg.name!r}: no backend can run it: {choice_reasons(fallbacks)}")


def choice_reasons(fallbacks: list[Fallback]) -> str:
    """The skipped backends and why, on one line: 'tensorrt: TensorRT is not installed, onnxruntime-gpu: ...'."""
    return ", ".join(f"{f.backend}: {f.reason}" for f in fallbacks)


def choice_summary(backend: InferenceBackend, fallbacks: list[Fallback]) -> str:
    """Which backend runs a model and why not the better ones, e.g. 'onnxruntime-cpu (tensorrt: ...)'."""
    return f"{backend.name} ({choice_reasons(fallbacks)})" if fallbacks else backend.name
