"""Engineering scaling, manifest channel order and z-score normalization against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.config import TagConfig
from gateway.errors import ModelError
from gateway.manifest import ModelManifest
from gateway.normalize import EngineeringScaling, Normalizer, channel_permutation


def _manifest(length: int = 2, channels: tuple[str, ...] = ("flow", "temp")) -> ModelManifest:
    return ModelManifest.model_validate(
        {
            "name": "pump_ae",
            "version": "1.0.0",
            "input": {"window_length": length, "channels": list(channels)},
            "output": {"kind": "anomaly_score", "name": "score"},
            "normalization": {"mean": [1.0, 10.0], "std": [2.0, 5.0]},
            "thresholds": {"high": 0.8, "low": 0.6},
        }
    )


def test_scaling_from_tags_is_raw_times_scale_plus_offset() -> None:
    tags = [
        TagConfig(name="a", node_id="ns=2;s=a", scale=0.1, offset=-5.0),
        TagConfig(name="b", node_id="ns=2;s=b"),
    ]
    scaling = EngineeringScaling.from_tags(tags)
    out = scaling.apply(np.array([100, 7], dtype=np.int64))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [100 * 0.1 - 5.0, 7.0])


def test_channel_permutation_orders_asset_columns_like_the_manifest() -> None:
    perm = channel_permutation(["a", "b", "c", "d"], ["c", "a"], model="m", asset="p1")
    assert perm.tolist() == [2, 0]
    data = np.array([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]])
    np.testing.assert_array_equal(data[:, perm], [[2.0, 0.0], [12.0, 10.0]])


def test_channel_permutation_names_model_asset_and_every_missing_tag() -> None:
    with pytest.raises(ModelError) as info:
        channel_permutation(["a", "b"], ["a", "speed", "flow"], model="pump_ae", asset="P-101")
    msg = str(info.value)
    for word in ("pump_ae", "P-101", "speed", "flow"):
        assert word in msg


def test_normalizer_matches_hand_computation() -> None:
    norm = Normalizer(_manifest())
    batch = np.array([[[3.0, 20.0], [1.0, 0.0]], [[-1.0, 10.0], [2.0, 12.5]]])
    out = norm.apply(batch)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.array([[[1, 2], [0, -2]], [[-1, 0], [0.5, 0.5]]], dtype=np.float32))


def test_normalizer_reuses_its_buffer_and_honours_out() -> None:
    norm = Normalizer(_manifest())
    first = norm.apply(np.zeros((3, 2, 2)))
    second = norm.apply(np.ones((2, 2, 2)))
    assert np.shares_memory(first, second)
    assert second.shape == (2, 2, 2)
    mine = np.empty((2, 2, 2), dtype=np.float32)
    result = norm.apply(np.full((2, 2, 2), 3.0), out=mine)
    assert result is mine
    np.testing.assert_array_equal(mine[..., 0], 1.0)
    np.testing.assert_array_equal(second[..., 0], 0.0)  # the internal buffer was left alone


@pytest.mark.parametrize("shape", [(1, 3, 2), (1, 2, 3), (2, 2)])
def test_normalizer_rejects_batches_that_do_not_fit_the_manifest(shape: tuple[int, ...]) -> None:
    with pytest.raises(ModelError, match="pump_ae"):
        Normalizer(_manifest()).apply(np.zeros(shape))
