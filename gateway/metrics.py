"""Small in-process measurements the gateway reports in its status and the benchmark reads."""

from __future__ import annotations

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
