"""edge_models: train a tiny model through the demo recipe, export it, check ORT against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from edge_models.autoencoder import TrainConfig, train_autoencoder
from edge_models.data import fit_normalization, fleet_windows, hold_last_value, normalize
from edge_models.demo_model import DemoSpec, build_demo_model
from edge_models.export import ExportError, export_onnx, verify_export
from gateway.demo.signals import TAGS, normal_history
from gateway.manifest import load_manifest, manifest_path_for

pytestmark = pytest.mark.torch

TINY = DemoSpec(
    pumps=2,
    train_seconds=120.0,
    train_hop=4,
    calibration_seconds=120.0,
    eval_seconds=120.0,
    fault_healthy_s=10.0,
    fault_ramp_s=60.0,
    train=TrainConfig(epochs=2, hidden=32, bottleneck=8, threads=1),
)


def _tiny_windows() -> np.ndarray:
    history = normal_history(2, 60.0, 10.0, seed=3)
    mean, std = fit_normalization(history)
    return normalize(fleet_windows(history, 32, 4), mean, std)


def test_demo_recipe_writes_a_valid_manifest(tmp_path: Path) -> None:
    written = build_demo_model(tmp_path, TINY, require_quality=False)
    onnx_path = tmp_path / "pump_ae.onnx"
    manifest = load_manifest(manifest_path_for(onnx_path))
    assert manifest == written
    assert manifest.input.channels == list(TAGS) and manifest.input.window_length == 32
    assert manifest.thresholds.high > manifest.thresholds.low > 0
    assert manifest.training["export"]["max_abs_diff_ort_vs_torch"] <= 1e-4
    assert manifest.training["train"]["windows"] == 2 * ((1200 - 32) // 4 + 1)
    assert 0 < onnx_path.stat().st_size < 1_000_000
    # Only the two files stay behind: the build folder is gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pump_ae.manifest.json", "pump_ae.onnx"]


def test_same_seed_same_model(tmp_path: Path) -> None:
    first = build_demo_model(tmp_path / "a", TINY, require_quality=False)
    second = build_demo_model(tmp_path / "b", TINY, require_quality=False)
    assert first.thresholds == second.thresholds
    assert (tmp_path / "a" / "pump_ae.onnx").read_bytes() == (tmp_path / "b" / "pump_ae.onnx").read_bytes()


def test_export_matches_torch_and_the_check_can_fail(tmp_path: Path) -> None:
    windows = _tiny_windows()
    scorer, losses = train_autoencoder(windows, TrainConfig(epochs=2, hidden=32, bottleneck=8, threads=1))
    assert losses[-1] < losses[0]
    path = tmp_path / "m.onnx"
    export_onnx(scorer, path, 32, len(TAGS))
    assert verify_export(scorer, path, windows[:64]) <= 1e-4
    other, _ = train_autoencoder(windows, TrainConfig(epochs=1, hidden=32, bottleneck=8, seed=1, threads=1))
    with pytest.raises(ExportError, match="ORT differs from torch"):
        verify_export(other, path, windows[:64])


def test_hold_last_value_repeats_the_last_good_sample() -> None:
    windows = np.arange(2 * 32 * 3, dtype=np.float64).reshape(2, 32, 3)
    held = hold_last_value(windows, [1], start=22, samples=10)
    assert (held[:, 22:, 1] == windows[:, 21:22, 1]).all()
    assert (held[:, :22] == windows[:, :22]).all() and (held[:, :, [0, 2]] == windows[:, :, [0, 2]]).all()
    with pytest.raises(ValueError, match="does not fit"):
        hold_last_value(windows, [0], start=23, samples=10)
