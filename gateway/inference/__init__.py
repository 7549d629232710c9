"""Inference backends: run a model on a batch of normalized windows and return its raw outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gateway.errors import ModelError

# Backend names, best first: what `models[].backend` names and `auto` tries in this order.
BACKENDS = ("tensorrt", "onnxruntime-gpu", "onnxruntime-cpu")


class BackendUnavailable(ModelError):
    """A backend cannot serve this model here (no TensorRT, no GPU, a failed engine build); try the next."""


@dataclass(frozen=True)
class Fallback:
    """A backend that was tried for a model and skipped, and why.

    `degraded` is True when the skip makes the model run on less than it should: the configured
    backend failed, or under `auto` a backend whose prerequisites this machine has (TensorRT
    importable, a CUDA device) failed. A backend absent by platform (no GPU on an x86 box) is not.
    """

    backend: str
    reason: str
    degraded: bool


class InferenceBackend(Protocol):
    """One loaded model on one device; scoring only, deciding is the alarm engine's job.

    Lifecycle:
    - A backend is created by its loader (e.g. `load_onnxruntime(path, manifest)`), which checks the
      model file against its manifest and raises `gateway.errors.ModelError` (one line naming the
      path) when the file is missing, corrupt or does not match. Loading is blocking: call it off the
      event loop.
    - `run(batch)` is blocking and is called only on the gateway's inference worker thread, never on
      the event loop, and never concurrently for one backend. `batch` is a C-contiguous float32 array
      [B, L, C] of windows already normalized with the manifest's statistics, B >= 1. It returns
      {output name: array with leading dimension B}. A batch whose shape does not fit the model raises
      `ModelError`; the backend stays usable afterwards.
    - There is no close(): dropping the last reference frees the model.
    """

    name: str

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on [B, L, C] normalized windows; returns {output name: [B, ...] array}."""
        ...

    def describe(self) -> dict[str, Any]:
        """What runs the model, for logs, status and `check`: backend, device, precision, versions, files."""
        ...
