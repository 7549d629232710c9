"""Export an AnomalyScorer to ONNX and prove that ONNX Runtime computes what PyTorch computes."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from edge_models.autoencoder import AnomalyScorer, torch_scores
from gateway.inference.onnxruntime import open_session

logger = logging.getLogger(__name__)

INPUT_NAME = "window"
SCORE_NAME = "score"
CHANNEL_ERROR_NAME = "channel_error"
OPSET = 17
TOLERANCE = 1e-4


class ExportError(Exception):
    """The exported graph does not reproduce the PyTorch model."""


def export_onnx(scorer: AnomalyScorer, path: Path, window_length: int, channels: int) -> None:
    """Write `scorer` as ONNX: input 'window' [batch, L, C] -> 'score' [batch], 'channel_error' [batch, C]."""
    scorer.eval()
    example = torch.zeros(1, window_length, channels, dtype=torch.float32)
    batch = {0: "batch"}
    with warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation; dynamo=False is still the small, exact path.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            scorer,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[SCORE_NAME, CHANNEL_ERROR_NAME],
            dynamic_axes={INPUT_NAME: batch, SCORE_NAME: batch, CHANNEL_ERROR_NAME: batch},
        )
    logger.info("exported %s (%d bytes)", path, path.stat().st_size)


def verify_export(scorer: AnomalyScorer, path: Path, windows: np.ndarray, *, seed: int = 0) -> float:
    """Max |ORT - torch| over both outputs on `windows` and on random windows; raises ExportError above 1e-4."""
    session = open_session(path)
    rng = np.random.default_rng(seed)
    random = rng.standard_normal((64, *windows.shape[1:])).astype(np.float32)
    worst = 0.0
    for name, batch in (("random", random), ("real", np.ascontiguousarray(windows, dtype=np.float32))):
        expected = torch_scores(scorer, batch)
        got = session.run([SCORE_NAME, CHANNEL_ERROR_NAME], {INPUT_NAME: batch})
        diff = max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected, strict=True))
        logger.info("ORT vs torch on %d %s windows: max abs diff %.2e", len(batch), name, diff)
        if not diff <= TOLERANCE:
            raise ExportError(
                f"{path}: ORT differs from torch by {diff:.3g} on {name} windows (> {TOLERANCE})"
            )
        worst = max(worst, diff)
    return worst
