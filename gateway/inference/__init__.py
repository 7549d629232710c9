"""Inference backends: run a model on a batch of normalized windows and return its raw outputs."""

from __future__ import annotations

from typing import Protocol

import numpy as np


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
