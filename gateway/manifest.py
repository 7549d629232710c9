"""Model manifest: the JSON file beside an ONNX model that says how to feed it and read it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import ModelError

OutputKind = Literal["anomaly_score", "class_probabilities", "rul"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManifestInput(_Frozen):
    name: str = "window"
    window_length: int = Field(gt=1)
    channels: list[str] = Field(min_length=1)


class ManifestOutput(_Frozen):
    kind: OutputKind
    name: str
    classes: list[str] | None = None
    # Optional second output [B, C]: per-channel contribution, so an alarm can say which tags drove it.
    channel_scores: str | None = None


class Normalization(_Frozen):
    mean: list[float]
    std: list[float]


class Thresholds(_Frozen):
    high: float
    low: float


class ModelManifest(_Frozen):
    """Everything the gateway must know about a model; written by edge_models at export time."""

    name: str
    version: str
    input: ManifestInput
    output: ManifestOutput
    normalization: Normalization
    thresholds: Thresholds
    sample_rate_hz: float | None = None
    training: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ModelManifest:
        n = len(self.input.channels)
        if len(self.normalization.mean) != n or len(self.normalization.std) != n:
            raise ValueError(f"normalization mean/std must have {n} entries, one per channel")
        if any(not s > 0 for s in self.normalization.std):
            raise ValueError("normalization std must be > 0 for every channel")
        if len(set(self.input.channels)) != n:
            raise ValueError("input.channels has duplicate names")
        if self.output.kind == "class_probabilities" and not self.output.classes:
            raise ValueError("output.classes is required for class_probabilities")
        return self

    def output_names(self) -> list[str]:
        """The graph outputs a backend fetches: the value output and, when the model has them, its channel scores."""
        return [self.output.name, *([self.output.channel_scores] if self.output.channel_scores else [])]

    def value_names(self) -> list[str]:
        """Names of the scalar values each window yields, which alarm rules refer to."""
        if self.output.kind == "class_probabilities":
            assert self.output.classes is not None
            return list(self.output.classes)
        return ["score" if self.output.kind == "anomaly_score" else "rul"]

    def values(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """[B, V] array of the scalar values named by value_names(), from raw backend outputs."""
        raw = np.asarray(outputs[self.output.name], dtype=np.float64)
        if self.output.kind == "class_probabilities":
            return raw.reshape(raw.shape[0], -1)
        return raw.reshape(raw.shape[0], 1)


def manifest_path_for(model_path: Path) -> Path:
    """Default manifest location: `pump_ae.onnx` -> `pump_ae.manifest.json`."""
    return model_path.with_suffix(".manifest.json")


def load_manifest(path: Path) -> ModelManifest:
    """Read and validate a manifest; every failure is a ModelError naming the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model manifest: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}:{exc.lineno} manifest is not valid JSON: {exc.msg}") from exc
    try:
        return ModelManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ModelError(f"{path}: manifest {loc}: {first['msg']}") from exc
