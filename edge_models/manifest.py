"""Build and write the manifest that travels beside an exported anomaly model (no PyTorch needed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.manifest import (
    ManifestInput,
    ManifestOutput,
    ModelManifest,
    Normalization,
    Thresholds,
    load_manifest,
)


def anomaly_manifest(
    *,
    name: str,
    version: str,
    channels: Sequence[str],
    window_length: int,
    mean: Sequence[float],
    std: Sequence[float],
    high: float,
    low: float,
    sample_rate_hz: float,
    training: dict[str, Any],
    input_name: str = "window",
    score_name: str = "score",
    channel_error_name: str = "channel_error",
) -> ModelManifest:
    """A validated manifest for a window -> (score, channel_error) autoencoder."""
    if not high > low > 0:
        raise ValueError(f"thresholds must satisfy high > low > 0, got high={high} low={low}")
    return ModelManifest(
        name=name,
        version=version,
        input=ManifestInput(name=input_name, window_length=window_length, channels=list(channels)),
        output=ManifestOutput(kind="anomaly_score", name=score_name, channel_scores=channel_error_name),
        normalization=Normalization(mean=[float(m) for m in mean], std=[float(s) for s in std]),
        thresholds=Thresholds(high=high, low=low),
        sample_rate_hz=sample_rate_hz,
        training=training,
    )


def write_manifest(manifest: ModelManifest, path: Path) -> ModelManifest:
    """Write `manifest` as indented JSON and read it back through the gateway's own loader."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
    return load_manifest(path)
