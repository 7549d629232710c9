"""Train, export, calibrate and check the demo pump model: `python -m edge_models.demo_model --out DIR`.

Same seed, same machine -> the same ONNX bytes and the same thresholds. The files are written to a
temporary folder first and moved into place only when every check passed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from edge_models.autoencoder import TrainConfig, train_autoencoder
from edge_models.data import fault_ramp_history, fit_normalization, fleet_windows, normalize, window_view
from edge_models.evaluate import (
    Evaluation,
    calibrate_thresholds,
    evaluate,
    hold_windows,
    quantiles,
    score_history,
    window_scorer,
)
from edge_models.export import OPSET, export_onnx, verify_export
from edge_models.manifest import anomaly_manifest, write_manifest
from gateway.demo.signals import TAGS, normal_history
from gateway.inference.onnxruntime import load_onnxruntime
from gateway.manifest import ModelManifest

logger = logging.getLogger(__name__)

COMMAND = "python -m edge_models.demo_model --out gateway/demo/model"


class ModelQualityError(Exception):
    """The trained model failed an acceptance check; nothing was written."""


@dataclass(frozen=True)
class DemoSpec:
    """Data sizes and seeds of the demo model; the defaults reproduce the committed files."""

    name: str = "pump_ae"
    version: str = "1.0.0"
    window_length: int = 32
    rate_hz: float = 10.0
    pumps: int = 8
    train_seconds: float = 1800.0
    train_hop: int = 2
    calibration_seconds: float = 1800.0
    eval_seconds: float = 3600.0
    fault_healthy_s: float = 60.0
    fault_ramp_s: float = 600.0
    # The gateway holds a Bad tag's last good value for up to max_gap_s (1 s by default).
    hold_s: float = 1.0
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)


def _r(x: Any) -> Any:
    """Floats (also inside lists) to four significant digits: enough to read, stable against float noise."""
    if isinstance(x, list):
        return [_r(v) for v in x]
    return float(f"{x:.4g}") if isinstance(x, float) else x


def _today() -> str:
    """UTC date of the build; SOURCE_DATE_EPOCH pins it for byte-identical rebuilds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = (
        dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch else dt.datetime.now(dt.timezone.utc)
    )
    return now.date().isoformat()


def build_demo_model(
    out_dir: Path, spec: DemoSpec | None = None, *, require_quality: bool = True
) -> ModelManifest:
    """Train and export `<name>.onnx` + `<name>.manifest.json` into out_dir; returns the written manifest.

    Raises ModelQualityError (when require_quality) or export.ExportError and leaves out_dir untouched.
    """
    spec = spec or DemoSpec()
    length, rate = spec.window_length, spec.rate_hz
    hold_samples = round(spec.hold_s * rate)
    started = time.perf_counter()
    train = normal_history(spec.pumps, spec.train_seconds, rate, seed=spec.seed)
    calibration = normal_history(spec.pumps, spec.calibration_seconds, rate, seed=spec.seed + 1)
    unseen = normal_history(spec.pumps, spec.eval_seconds, rate, seed=spec.seed + 2)
    fault, severity = fault_ramp_history(
        spec.pumps, rate_hz=rate, healthy_s=spec.fault_healthy_s, ramp_s=spec.fault_ramp_s, seed=spec.seed + 3
    )
    mean, std = fit_normalization(train)
    windows = normalize(fleet_windows(train, length, spec.train_hop), mean, std)
    logger.info("training on %d windows [%d x %d]", len(windows), length, len(TAGS))
    scorer, losses = train_autoencoder(windows, spec.train)
    train_s = time.perf_counter() - started
    logger.info("trained in %.1f s, final loss %.5f", train_s, losses[-1])

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        onnx_path = Path(tmp) / f"{spec.name}.onnx"
        export_onnx(scorer, onnx_path, length, len(TAGS))
        unseen_windows = normalize(window_view(unseen[:, 0], length, 64), mean, std)
        real = np.concatenate([windows[:: max(1, len(windows) // 256)], unseen_windows])
        max_diff = verify_export(scorer, onnx_path, real, seed=spec.seed)

        def manifest(high: float, low: float, training: dict[str, Any]) -> ModelManifest:
            return anomaly_manifest(
                name=spec.name,
                version=spec.version,
                channels=TAGS,
                window_length=length,
                mean=mean,
                std=std,
                high=high,
                low=low,
                sample_rate_hz=rate,
                training=training,
            )

        # Load exactly as the gateway will; the provisional thresholds are never written.
        backend = load_onnxruntime(onnx_path, manifest(math.inf, 1.0, {}), threads=spec.train.threads)
        score = window_scorer(backend, backend.manifest)
        normal_scores = score_history(score, calibration, length)
        all_channels = list(range(len(TAGS)))
        held_scores = np.concatenate(
            [score(w) for w in hold_windows(calibration, length, 4, hold_samples, all_channels)]
        )
        high, low = calibrate_thresholds(normal_scores, held_scores)
        logger.info("thresholds: high %.4g, low %.4g", high, low)
        ev = evaluate(
            score,
            high,
            length=length,
            rate_hz=rate,
            normal=unseen,
            fault=fault,
            severity=severity,
            hold_samples=hold_samples,
        )
        logger.info("evaluation: %s", ev)
        problems = ev.problems()
        if problems and require_quality:
            raise ModelQualityError("demo model rejected: " + "; ".join(problems))

        training = _training_record(spec, windows.shape[0], losses, normal_scores, held_scores, ev, max_diff)
        written = write_manifest(manifest(high, low, training), Path(tmp) / f"{spec.name}.manifest.json")
        for part in (onnx_path, Path(tmp) / f"{spec.name}.manifest.json"):
            os.replace(part, out_dir / part.name)
    logger.info(
        "wrote %s (%d bytes) in %.1f s",
        out_dir / onnx_path.name,
        (out_dir / onnx_path.name).stat().st_size,
        time.perf_counter() - started,
    )
    return written


def _command(spec: DemoSpec) -> str:
    """The command line that rebuilds this model, or a pointer to the spec when no flag expresses it."""
    if spec == DemoSpec(seed=spec.seed, train=TrainConfig(seed=spec.seed)):
        return COMMAND + (f" --seed {spec.seed}" if spec.seed else "")
    return f"build_demo_model(out, DemoSpec(**spec)) with `spec` below; not the shipped recipe ({COMMAND})"


def _training_record(
    spec: DemoSpec,
    n_windows: int,
    losses: list[float],
    normal_scores: np.ndarray,
    held_scores: np.ndarray,
    ev: Evaluation,
    max_diff: float,
) -> dict[str, Any]:
    """The manifest's `training` section: what data, how it was split, and what the checks measured."""
    tc = spec.train
    seeds = {
        "train": spec.seed,
        "calibration": spec.seed + 1,
        "evaluation": spec.seed + 2,
        "fault": spec.seed + 3,
    }
    return {
        "command": _command(spec),
        "date": _today(),
        "data": "gateway.demo.signals.normal_history: simulated healthy pumps incl. operator speed setpoint changes",
        "seeds": seeds,
        **(
            {}
            if spec == DemoSpec(seed=spec.seed, train=TrainConfig(seed=spec.seed))
            else {"spec": asdict(spec)}
        ),
        "train": {
            "pumps": spec.pumps,
            "seconds": spec.train_seconds,
            "hop": spec.train_hop,
            "windows": n_windows,
        },
        "model": f"dense autoencoder {spec.window_length * len(TAGS)}-{tc.hidden}-{tc.bottleneck}-{tc.hidden}-"
        f"{spec.window_length * len(TAGS)}, ReLU; score = mean squared reconstruction error",
        "optimizer": {
            "name": "Adam",
            "epochs": tc.epochs,
            "batch_size": tc.batch_size,
            "learning_rate": tc.learning_rate,
            "schedule": "cosine to lr/10",
            "torch_threads": tc.threads,
            "final_loss": _r(losses[-1]),
        },
        "calibration": {
            "pumps": spec.pumps,
            "seconds": spec.calibration_seconds,
            "windows": int(normal_scores.size),
            "rule": "high = max(1.5 x p99.99, 1.2 x max) over normal and held-value windows; low = normal p99",
            "normal_scores": {k: _r(v) for k, v in quantiles(normal_scores).items()},
            "held_value_scores": {k: _r(v) for k, v in quantiles(held_scores).items()},
            "held_value": f"all channels hold their last value for {spec.hold_s:g} s",
        },
        "evaluation": {
            "fault": f"bearing fault ramping 0 -> 1 over {spec.fault_ramp_s:g} s after {spec.fault_healthy_s:g} s",
            **{k: _r(v) for k, v in asdict(ev).items()},
        },
        "export": {
            "opset": OPSET,
            "max_abs_diff_ort_vs_torch": float(f"{max_diff:.2g}"),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def run(args: argparse.Namespace) -> int:
    """Build the demo model from `edge-models demo-model` arguments; returns the process exit code."""
    spec = DemoSpec(seed=args.seed, train=TrainConfig(seed=args.seed))
    m = build_demo_model(args.out, spec)
    print(f"{args.out / (m.name + '.onnx')}: thresholds high={m.thresholds.high} low={m.thresholds.low}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m edge_models.demo_model ARGS` is `edge-models demo-model ARGS`."""
    from edge_models.cli import main as cli_main

    return cli_main(["demo-model", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
