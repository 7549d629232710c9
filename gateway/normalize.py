"""From raw PLC numbers to model input: engineering scaling, channel order, and z-score normalization."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from gateway.config import TagConfig
from gateway.errors import ModelError
from gateway.manifest import ModelManifest

logger = logging.getLogger(__name__)


class EngineeringScaling:
    """Per-tag linear scaling `raw * scale + offset`, turning PLC counts into engineering units."""

    def __init__(self, scale: np.ndarray, offset: np.ndarray) -> None:
        self.scale = np.ascontiguousarray(scale, dtype=np.float64)
        self.offset = np.ascontiguousarray(offset, dtype=np.float64)
        if self.scale.shape != self.offset.shape or self.scale.ndim != 1:
            raise ValueError(
                f"scale {self.scale.shape} and offset {self.offset.shape} must be equal 1-D shapes"
            )

    @classmethod
    def from_tags(cls, tags: Sequence[TagConfig]) -> EngineeringScaling:
        """Scaling for an asset's channels, in the asset's channel order (an array's elements share its tag's)."""
        widths = [len(t.channels) for t in tags]
        return cls(
            np.repeat([t.scale for t in tags], widths).astype(np.float64),
            np.repeat([t.offset for t in tags], widths).astype(np.float64),
        )

    def apply(self, raw_row: np.ndarray) -> np.ndarray:
        """Engineering values (float64) of one row of raw values in tag order; a new array."""
        out = np.multiply(raw_row, self.scale, dtype=np.float64)
        out += self.offset
        return out


def channel_permutation(
    asset_channels: Sequence[str], channels: Sequence[str], *, model: str, asset: str
) -> np.ndarray:
    """Indices into the asset's channel order that give the manifest's channel order (`data[:, perm]`)."""
    position = {name: i for i, name in enumerate(asset_channels)}
    missing = [c for c in channels if c not in position]
    if missing:
        raise ModelError(
            f"model {model!r} needs channel(s) {', '.join(missing)} that asset {asset!r} does not have; "
            f"asset channels: {_summary(asset_channels)}"
        )
    return np.array([position[c] for c in channels], dtype=np.intp)


def _summary(names: Sequence[str], limit: int = 20) -> str:
    """The names comma-separated, cut after `limit` with a count (array tags make long lists)."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


class Normalizer:
    """z-score normalization `(x - mean) / std` per channel into a reused float32 buffer.

    The array returned by `apply` is a view of that buffer and is overwritten by the next call, so
    one Normalizer belongs to one inference worker that consumes each batch before normalizing the
    next; pass `out=` to keep a result.
    """

    def __init__(self, manifest: ModelManifest) -> None:
        self.model = manifest.name
        self.length = manifest.input.window_length
        self.channels = len(manifest.input.channels)
        self.mean = np.array(manifest.normalization.mean, dtype=np.float64)
        self.std = np.array(manifest.normalization.std, dtype=np.float64)
        # The same statistics repeated over the window ([L*C]): numpy then runs one contiguous inner
        # loop per window instead of broadcasting an 8-wide vector, about twice as fast, same result.
        self._mean_lc = np.tile(self.mean, self.length)
        self._std_lc = np.tile(self.std, self.length)
        self._scratch = np.empty((0, self.length * self.channels), dtype=np.float64)
        self._out = np.empty((0, self.length, self.channels), dtype=np.float32)

    def apply(self, batch: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[B, L, C] engineering units in manifest channel order -> contiguous float32 model input."""
        if batch.ndim != 3 or batch.shape[1:] != (self.length, self.channels):
            raise ModelError(
                f"model {self.model!r} takes windows of shape [B, {self.length}, {self.channels}], "
                f"got {list(batch.shape)}"
            )
        n = batch.shape[0]
        if len(self._scratch) < n:
            logger.debug("model %s: normalization buffer grows to %d windows", self.model, n)
            self._scratch = np.empty((n, self.length * self.channels), dtype=np.float64)
            self._out = np.empty((n, self.length, self.channels), dtype=np.float32)
        if out is None:
            out = self._out[:n]
        elif out.shape != batch.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous float32 array of shape {batch.shape}")
        # Subtract and divide in float64 and round once, so the input matches training's arithmetic.
        scratch = self._scratch[:n]
        np.subtract(batch.reshape(n, -1), self._mean_lc, out=scratch)
        np.divide(scratch, self._std_lc, out=out.reshape(n, -1), casting="same_kind")
        return out
