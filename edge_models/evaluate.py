"""Threshold calibration and acceptance checks, run through the gateway's own backend (NumPy + ORT)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_models.data import hold_last_value, window_view
from gateway.inference import InferenceBackend
from gateway.manifest import ModelManifest
from gateway.normalize import Normalizer

# Raw (unnormalized) [N, L, C] windows -> [N] anomaly scores.
ScoreFn = Callable[[np.ndarray], np.ndarray]

QUANTILES = (0.5, 0.9, 0.99, 0.999, 0.9999)
_CHUNK = 4096


def window_scorer(backend: InferenceBackend, manifest: ModelManifest) -> ScoreFn:
    """Score raw windows exactly as the gateway does: its Normalizer, then batched backend.run()."""
    normalizer = Normalizer(manifest)

    def score(windows: np.ndarray) -> np.ndarray:
        # Each result is copied out before the next apply() reuses the normalizer's buffer.
        parts = [
            backend.run(normalizer.apply(windows[i : i + _CHUNK]))[manifest.output.name].astype(np.float64)
            for i in range(0, len(windows), _CHUNK)
        ]
        return np.concatenate(parts)

    return score


def score_history(score: ScoreFn, history: np.ndarray, length: int, hop: int = 1) -> np.ndarray:
    """[P, N] scores of every `hop`-th window of each pump of a [T, P, C] history."""
    return np.stack([score(window_view(history[:, p], length, hop)) for p in range(history.shape[1])])


def hold_windows(
    history: np.ndarray, length: int, hop: int, samples: int, channels: list[int]
) -> list[np.ndarray]:
    """Windows of every pump where `channels` hold their last good value for `samples` steps.

    Two placements: at the end (a gap that just began) and in the middle (one sliding through).
    """
    windows = np.concatenate([window_view(history[:, p], length, hop) for p in range(history.shape[1])])
    return [
        hold_last_value(windows, channels, start=start, samples=samples)
        for start in (length - samples, (length - samples) // 2)
    ]


def quantiles(scores: np.ndarray) -> dict[str, float]:
    """Named quantiles ('p99.99': ...) plus max and mean of a set of scores, for the manifest."""
    flat = np.ravel(scores)
    named = {f"p{q * 100:g}": float(v) for q, v in zip(QUANTILES, np.quantile(flat, QUANTILES), strict=True)}
    return {**named, "max": float(flat.max()), "mean": float(flat.mean())}


def _sig3(x: float) -> float:
    """Three significant digits, so retraining on another CPU (last-bit float noise) gives the same file."""
    return float(f"{x:.3g}")


def calibrate_thresholds(normal: np.ndarray, held: np.ndarray, *, margin: float = 1.5) -> tuple[float, float]:
    """(high, low) from held-out scores: high clears normal and held-value windows with `margin`.

    high = margin x the larger p99.99 (and >= 1.2 x the largest score seen); low = normal p99, so an
    alarm clears as soon as the score is back among ordinary normal windows.
    """
    top = max(float(np.quantile(s, 0.9999)) for s in (normal, held))
    high = max(margin * top, 1.2 * max(float(normal.max()), float(held.max())))
    low = float(np.quantile(normal, 0.99))
    return _sig3(high), _sig3(low)


@dataclass(frozen=True)
class Evaluation:
    """What the acceptance checks measured; every ratio is score / high."""

    normal_windows: int
    normal_pump_hours: float
    false_alarm_windows: int
    false_alarm_rate: float
    normal_max_ratio: float
    detect_severity: list[float | None]  # per pump: severity when the score first reached high
    prefault_max_ratio: float
    min_ratio_severity_half: float  # smallest score/high over windows wholly at severity >= 0.5
    hold_max_ratio: float

    def problems(self, *, max_false_alarm_rate: float = 1e-4, min_fault_ratio: float = 10.0) -> list[str]:
        """Failed acceptance checks, as sentences; empty when the model is fit to ship."""
        found = []
        if self.false_alarm_rate > max_false_alarm_rate:
            found.append(f"false-alarm rate {self.false_alarm_rate:.2e} > {max_false_alarm_rate:.0e}")
        if self.prefault_max_ratio >= 1.0:
            found.append(f"healthy windows before the fault reach {self.prefault_max_ratio:.2f} x high")
        missed = [i for i, s in enumerate(self.detect_severity) if s is None or s >= 0.5]
        if missed:
            found.append(f"fault not detected below severity 0.5 on pump(s) {missed}")
        if self.min_ratio_severity_half < min_fault_ratio:
            found.append(
                f"fault windows at severity >= 0.5 reach only {self.min_ratio_severity_half:.1f} x high"
            )
        if self.hold_max_ratio >= 1.0:
            found.append(f"windows holding a value for the max gap reach {self.hold_max_ratio:.2f} x high")
        return found


def evaluate(
    score: ScoreFn,
    high: float,
    *,
    length: int,
    rate_hz: float,
    normal: np.ndarray,
    fault: np.ndarray,
    severity: np.ndarray,
    hold_samples: int,
) -> Evaluation:
    """Score unseen normal operation, a bearing fault ramping 0 -> 1, and held values against `high`."""
    normal_scores = score_history(score, normal, length)
    fault_scores = score_history(score, fault, length)
    window_severity = severity[length - 1 :]  # a window carries the severity of its newest sample
    first_sample_severity = severity[: len(window_severity)]
    detect: list[float | None] = []
    for pump_scores in fault_scores:
        over = np.flatnonzero(pump_scores >= high)
        detect.append(float(window_severity[over[0]]) if len(over) else None)
    # One tag at a time (a single Bad tag) and all at once (a failed read leaves every tag holding).
    n_channels = normal.shape[2]
    hold_max = max(
        float(score(w).max())
        for channels in [[c] for c in range(n_channels)] + [list(range(n_channels))]
        for w in hold_windows(normal, length, length // 2, hold_samples, channels)
    )
    return Evaluation(
        normal_windows=int(normal_scores.size),
        normal_pump_hours=normal.shape[0] * normal.shape[1] / rate_hz / 3600.0,
        false_alarm_windows=int((normal_scores >= high).sum()),
        false_alarm_rate=float((normal_scores >= high).mean()),
        normal_max_ratio=float(normal_scores.max() / high),
        detect_severity=detect,
        prefault_max_ratio=float(fault_scores[:, window_severity == 0].max() / high),
        min_ratio_severity_half=float(fault_scores[:, first_sample_severity >= 0.5].min() / high),
        hold_max_ratio=hold_max / high,
    )
