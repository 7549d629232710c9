"""Windows, normalization statistics and test scenarios from the demo pump signals (NumPy only)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from gateway.demo.signals import PumpFleet

# The standard deviation of a channel that never moves would be 0; floor it so normalizing is defined.
_MIN_STD = 1e-6


def window_view(series: np.ndarray, length: int, hop: int = 1) -> np.ndarray:
    """Read-only [N, L, C] view of every `hop`-th window of a [T, C] series (no copy)."""
    if series.ndim != 2 or series.shape[0] < length:
        raise ValueError(f"need a [T >= {length}, C] series, got shape {series.shape}")
    return sliding_window_view(series, length, axis=0)[::hop].transpose(0, 2, 1)


def fleet_windows(history: np.ndarray, length: int, hop: int) -> np.ndarray:
    """[N, L, C] float32 copy of the windows of every pump of a [T, P, C] history, pump by pump."""
    return np.concatenate([window_view(history[:, p], length, hop) for p in range(history.shape[1])]).astype(
        np.float32
    )


def fit_normalization(history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) in float64 over every sample of a [..., C] history."""
    flat = history.reshape(-1, history.shape[-1]).astype(np.float64)
    return flat.mean(axis=0), np.maximum(flat.std(axis=0), _MIN_STD)


def normalize(windows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """C-contiguous float32 (windows - mean) / std, the way the gateway feeds the model."""
    return np.ascontiguousarray((windows - mean) / std, dtype=np.float32)


def fault_ramp_history(
    n_pumps: int, *, rate_hz: float, healthy_s: float, ramp_s: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """[T, P, C] history whose bearing fault ramps 0 -> 1 after `healthy_s`, and the [T] severity."""
    fleet = PumpFleet(n_pumps, seed)
    dt = 1.0 / rate_hz
    steps = int((healthy_s + ramp_s) * rate_hz)
    severity = np.clip((np.arange(1, steps + 1) * dt - healthy_s) / ramp_s, 0.0, 1.0)
    rows = []
    for s in severity:
        fleet.fault[:] = s
        rows.append(fleet.step(dt))
    return np.stack(rows), severity


def hold_last_value(windows: np.ndarray, channels: list[int], *, start: int, samples: int) -> np.ndarray:
    """Copy of [N, L, C] windows where `channels` repeat the value at `start - 1` for `samples` steps.

    This is what the gateway's sampler feeds the model while a tag is briefly Bad: the last good value.
    """
    if not 1 <= start <= windows.shape[1] - samples:
        raise ValueError(f"hold of {samples} samples at {start} does not fit a window of {windows.shape[1]}")
    held = np.array(windows, copy=True)
    for c in channels:
        held[:, start : start + samples, c] = held[:, start - 1 : start, c]
    return held
