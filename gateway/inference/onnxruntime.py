"""ONNX Runtime CPU backend: one InferenceSession per model, checked against its manifest at load."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gateway.errors import ModelError
from gateway.manifest import ModelManifest

logger = logging.getLogger(__name__)

_FLOAT = "tensor(float)"


def _reason(exc: Exception) -> str:
    """ORT's message without its '[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :' prefix, on one line."""
    text = " ".join(str(exc).split())
    return text.rsplit(" : ", 1)[-1] if text.startswith("[ONNXRuntimeError]") else text


def open_session(model_path: Path, *, threads: int = 1) -> ort.InferenceSession:
    """A CPU InferenceSession that does not spin idle threads; any load failure is a ModelError."""
    if threads < 1:
        raise ModelError(f"{model_path}: threads must be >= 1, got {threads}")
    if not model_path.is_file():
        raise ModelError(f"{model_path}: model file not found")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Spinning workers burn a whole core between runs; the gateway runs a batch every few hundred ms.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises pybind classes (InvalidProtobuf, Fail, ...) with no common base
        reason = _reason(exc).replace(f"Load model from {model_path} failed:", "").strip()
        raise ModelError(f"{model_path}: cannot load ONNX model: {reason}") from exc


def _fixed(dim: object) -> int | None:
    """A static dimension, or None for a symbolic/unknown one."""
    return dim if isinstance(dim, int) else None


class OnnxRuntimeBackend:
    """An ONNX Runtime session plus the manifest that says how to feed it; see InferenceBackend."""

    name = "onnxruntime-cpu"

    def __init__(self, session: ort.InferenceSession, model_path: Path, manifest: ModelManifest) -> None:
        self.model_path = model_path
        self.manifest = manifest
        self._session = session
        self._input = manifest.input.name
        self._window = (manifest.input.window_length, len(manifest.input.channels))
        outputs = [manifest.output.name]
        if manifest.output.channel_scores:
            outputs.append(manifest.output.channel_scores)
        self._outputs = outputs
        self._check_signature()

    def _check_signature(self) -> None:
        """Fail at load, not at the first window, when the graph does not match the manifest."""
        where = f"{self.model_path}: model does not match its manifest:"
        inputs = {i.name: i for i in self._session.get_inputs()}
        spec = inputs.get(self._input)
        if spec is None:
            raise ModelError(f"{where} no input {self._input!r}; the model has {sorted(inputs)}")
        if spec.type != _FLOAT:
            raise ModelError(f"{where} input {self._input!r} is {spec.type}, expected {_FLOAT}")
        if len(spec.shape) != 3:
            raise ModelError(f"{where} input {self._input!r} has shape {spec.shape}, expected [batch, L, C]")
        length, channels = (_fixed(d) for d in spec.shape[1:])
        if length is not None and length != self._window[0]:
            raise ModelError(f"{where} model window length is {length}, manifest says {self._window[0]}")
        if channels is not None and channels != self._window[1]:
            raise ModelError(f"{where} model has {channels} channels, manifest lists {self._window[1]}")
        self._batch = _fixed(spec.shape[0])
        have = {o.name for o in self._session.get_outputs()}
        missing = [o for o in self._outputs if o not in have]
        if missing:
            raise ModelError(f"{where} no output(s) {missing}; the model has {sorted(have)}")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on [B, L, C] float32 normalized windows; returns {output name: array}."""
        if batch.dtype != np.float32:
            raise ModelError(f"{self.model_path}: batch dtype is {batch.dtype}, expected float32")
        if batch.ndim != 3 or batch.shape[1:] != self._window or batch.shape[0] < 1:
            raise ModelError(
                f"{self.model_path}: batch shape {batch.shape} does not fit [B, {self._window[0]}, {self._window[1]}]"
            )
        if self._batch is not None and batch.shape[0] != self._batch:
            raise ModelError(
                f"{self.model_path}: model takes batches of exactly {self._batch}, got {batch.shape[0]}"
            )
        try:
            results = self._session.run(self._outputs, {self._input: np.ascontiguousarray(batch)})
        except Exception as exc:  # a runtime failure inside the graph; keep ORT's text for the log
            raise ModelError(f"{self.model_path}: inference failed: {_reason(exc)}") from exc
        return dict(zip(self._outputs, results, strict=True))


def load_onnxruntime(model_path: Path, manifest: ModelManifest, *, threads: int = 1) -> OnnxRuntimeBackend:
    """Load `model_path` for CPU inference and check it against `manifest`; raises ModelError."""
    backend = OnnxRuntimeBackend(open_session(model_path, threads=threads), model_path, manifest)
    logger.info(
        "loaded model %s %s from %s (onnxruntime %s, %d thread(s))",
        manifest.name,
        manifest.version,
        model_path,
        ort.__version__,
        threads,
    )
    return backend
