"""Small in-process measurements the gateway reports in its status and the benchmark reads."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

import numpy as np


class LatencyReservoir:
    """The most recent `size` latencies in a fixed numpy ring; percentiles on demand."""

    def __init__(self, size: int = 8192) -> None:
        self._values = np.zeros(size, dtype=np.float64)
        self._n = 0

    def add(self, seconds: float) -> None:
        """Record one latency in seconds."""
        self._values[self._n % len(self._values)] = seconds
        self._n += 1

    def __len__(self) -> int:
        return min(self._n, len(self._values))

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) in seconds, or None when nothing was recorded."""
        n = len(self)
        return float(np.percentile(self._values[:n], q)) if n else None

    def clear(self) -> None:
        """Forget everything recorded (e.g. after a warm-up period)."""
        self._n = 0


# Upper bounds (seconds) of the inference latency histogram: from a TensorRT call on a Jetson (well
# under a millisecond) to a CPU model stuck behind other work on the one inference thread.
INFERENCE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class ModelInference:
    """One model's figures since start: windows inferred, and its calls' latency as a histogram."""

    windows: int = 0
    calls: int = 0
    seconds_sum: float = 0.0
    # Calls per bucket of INFERENCE_BUCKETS_S (not cumulative); the last counts those above every bound.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(INFERENCE_BUCKETS_S) + 1))


class InferenceStats:
    """Per model: windows inferred and a latency histogram of inference calls (fed by the inference loop)."""

    def __init__(self) -> None:
        self.models: dict[str, ModelInference] = {}

    def observe(self, model: str, seconds: float, windows: int) -> None:
        """Record one successful inference call of `model` that took `seconds` for `windows` windows."""
        m = self.models.setdefault(model, ModelInference())
        m.windows += windows
        m.calls += 1
        m.seconds_sum += seconds
        m.buckets[bisect.bisect_left(INFERENCE_BUCKETS_S, seconds)] += 1

    def snapshot(self) -> dict[str, ModelInference]:
        """A copy, consistent per model, to read on another thread."""
        return {name: replace(m, buckets=list(m.buckets)) for name, m in self.models.items()}
