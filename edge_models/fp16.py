"""FP16 copies of ONNX models for TensorRT: `edge-models fp16 MODEL.onnx [--out PATH]`.

The copy keeps FP32 inputs and outputs (the gateway feeds it the same float32 batch) and records
the sha256 of the FP32 file it was made from, so `edge-gateway check` tells a stale copy by content.
Before it is moved into place it must pass two checks on random and, when given, recorded windows:
- every float tensor of the FP32 graph stays inside FP16's range (65504), since TensorRT keeps
  activations in FP16 and one beyond it becomes inf;
- the copy agrees with FP32 in ONNX Runtime within gateway.verify's tolerance, decisions included
  (skipped, and said so, where ONNX Runtime has no CPU kernel for a node of the FP16 graph).
Needs the `onnx` package (`pip install 'edge-gateway[train]'`); the gateway itself never imports it.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.transformers.float16 import convert_float_to_float16

from gateway.errors import ModelError
from gateway.inference import BackendUnavailable
from gateway.inference.engines import atomic_write
from gateway.inference.onnxruntime import CPU, load_onnxruntime, session_options
from gateway.manifest import load_manifest, manifest_path_for
from gateway.model_checks import SOURCE_SHA256_KEY, read_onnx_metadata
from gateway.verify import (
    FP16_MAX,
    TOLERANCE_TEXT,
    Parity,
    compare,
    open_fp16_backend,
    random_windows,
    run_batches,
)

logger = logging.getLogger(__name__)

SOURCE_NAME_KEY = "edge_models.fp16.source"
BATCH = 256


class Fp16Error(Exception):
    """The FP16 copy could not be made or failed a check; nothing was written."""


@dataclass(frozen=True)
class Fp16Report:
    """What `make_fp16` wrote and what its checks measured."""

    path: Path
    source_sha256: str
    windows: str  # what the windows were
    peak_tensor: str  # the FP32 graph's float tensor with the largest |value| on the windows
    peak: float
    parity: Parity | None  # None when ONNX Runtime cannot run the FP16 graph on the CPU
    skipped: str = ""  # why parity was not checked


def default_fp16_path(src: Path) -> Path:
    """`pump_ae.onnx` -> `pump_ae.fp16.onnx` beside it, where ModelConfig.fp16_model_path looks by default."""
    return src.with_name(f"{src.stem}.fp16.onnx")


def _read(src: Path) -> tuple[bytes, onnx.ModelProto]:
    """The file's bytes and the model they hold; Fp16Error when unreadable."""
    try:
        data = src.read_bytes()
        return data, onnx.load_model_from_string(data)
    except OSError as exc:
        raise Fp16Error(f"{src}: cannot read: {exc.strerror}") from exc
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no useful base
        raise Fp16Error(f"{src}: not an ONNX model: {exc}") from exc


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Order the nodes so each follows the producers of its inputs, keeping the original order otherwise.

    The ONNX IR requires it, and parsers that read a graph in one pass (TensorRT's, OpenVINO's) fail
    on a node whose input is made later: the converter appends the Cast nodes it adds at the end.
    """
    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    needs = [{producer[x] for x in n.input if x in producer} for n in nodes]
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(needs):
        for d in deps:
            users.setdefault(d, []).append(i)
    waiting = [len(d) for d in needs]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise Fp16Error("the FP16 graph has a cycle: its nodes cannot be ordered")
    graph.ClearField("node")
    graph.node.extend(nodes[i] for i in order)


def convert_fp16(src: Path, dst: Path | None = None) -> Path:
    """Write the FP16 copy of `src` (FP32 inputs and outputs kept, source sha256 recorded) to `dst`."""
    dst = dst or default_fp16_path(src)
    data, model = _read(src)
    # The default op block list keeps ops without FP16 kernels (TopK, Range, ML ops ...) in FP32.
    fp16 = convert_float_to_float16(model, keep_io_types=True)
    _sort_nodes(fp16.graph)
    props = {p.key: p.value for p in fp16.metadata_props}
    props.update({SOURCE_SHA256_KEY: hashlib.sha256(data).hexdigest(), SOURCE_NAME_KEY: src.name})
    onnx.helper.set_model_props(fp16, props)
    try:
        onnx.checker.check_model(fp16)
    except onnx.checker.ValidationError as exc:
        raise Fp16Error(f"{src}: the FP16 graph is not valid ONNX: {exc}") from exc
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, fp16.SerializeToString(), mode=src.stat().st_mode & 0o777)
    logger.debug("wrote %s (%d bytes) from %s", dst, dst.stat().st_size, src)
    return dst


def activation_peak(src: Path, windows: np.ndarray, input_name: str) -> tuple[str, float]:
    """The float tensor of the FP32 model (input included) with the largest |value| on `windows`, and that value."""
    model = onnx.shape_inference.infer_shapes(_read(src)[1])
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(
        vi
        for vi in model.graph.value_info
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and vi.name not in outputs
    )
    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=session_options(1), providers=[CPU]
    )
    names = [o.name for o in session.get_outputs() if o.type == "tensor(float)"]
    peak = (input_name, float(np.max(np.abs(windows), initial=0.0)))
    for start in range(0, len(windows), BATCH):
        values = session.run(names, {input_name: windows[start : start + BATCH]})
        for name, value in zip(names, values, strict=True):
            top = float(np.max(np.abs(value), initial=0.0))
            top = math.inf if math.isnan(top) else top  # a NaN is as broken as an overflow
            if top > peak[1]:
                peak = (name, top)
    return peak


def make_fp16(
    src: Path,
    dst: Path | None = None,
    *,
    manifest_path: Path | None = None,
    recorded: np.ndarray | None = None,
    windows: int = BATCH,
    seed: int = 0,
) -> Fp16Report:
    """Convert `src`, check the copy, and move it into place; Fp16Error (nothing written) when a check fails.

    The checks run on `windows` random normalized windows plus the `recorded` ones ([N, L, C], normalized).
    """
    dst = dst or default_fp16_path(src)
    try:
        manifest = load_manifest(manifest_path or manifest_path_for(src))
    except ModelError as exc:
        raise Fp16Error(str(exc)) from exc
    shape = (manifest.input.window_length, len(manifest.input.channels))
    batch = random_windows(windows, *shape, seed=seed)
    note = f"{windows} random normalized"
    if recorded is not None:
        if recorded.ndim != 3 or recorded.shape[1:] != shape:
            raise Fp16Error(
                f"recorded windows have shape {list(recorded.shape)}, the model takes [N, {shape[0]}, {shape[1]}]"
            )
        batch = np.concatenate([np.ascontiguousarray(recorded, dtype=np.float32), batch])
        note = f"{len(recorded)} recorded, {note}"
    peak_tensor, peak = activation_peak(src, batch, manifest.input.name)
    if not peak < FP16_MAX:
        raise Fp16Error(
            f"{src}: tensor {peak_tensor!r} reaches {peak:.4g} on these windows, beyond FP16's largest finite "
            f"value {FP16_MAX:g}: under TensorRT FP16 it becomes inf; keep this model FP32 (precision: fp32)"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".fp16-") as tmp:
        candidate = convert_fp16(src, Path(tmp) / dst.name)
        try:
            fp16 = open_fp16_backend(candidate, manifest)
        except BackendUnavailable as exc:
            parity, skipped = None, str(exc)
        else:
            reference = load_onnxruntime(src, manifest)
            parity = compare(run_batches(reference, batch, BATCH), run_batches(fp16, batch, BATCH), manifest)
            skipped = ""
            if not parity.passed:
                raise Fp16Error(f"{dst.name} not written: " + "; ".join(parity.problems))
        os.replace(candidate, dst)
    source = read_onnx_metadata(dst)[SOURCE_SHA256_KEY]
    return Fp16Report(dst, source, note, peak_tensor, peak, parity, skipped)


def run(args: argparse.Namespace) -> int:
    """`edge-models fp16` from its parsed arguments; prints what was written and the parity figures."""
    try:
        recorded = np.load(args.recorded) if args.recorded is not None else None
    except (OSError, ValueError) as exc:
        raise Fp16Error(f"{args.recorded}: cannot read recorded windows: {exc}") from exc
    report = make_fp16(
        args.model, args.out, manifest_path=args.manifest, recorded=recorded, windows=args.windows
    )
    print(
        f"{report.path}: FP16 copy of {args.model} (FP32 inputs and outputs; source sha256 {report.source_sha256[:16]}...)"
    )
    print(
        f"  largest activation on {report.windows} windows: {report.peak:.4g} in {report.peak_tensor!r} "
        f"(FP16 ends at {FP16_MAX:g})"
    )
    if report.parity is None:
        print(
            f"  parity not checked here: {report.skipped}; check it on the device with edge-gateway verify-engines"
        )
        return 0
    print("  parity with FP32 in ONNX Runtime CPU:")
    print("\n".join(report.parity.lines()))
    print(f"  PASS ({TOLERANCE_TEXT})")
    return 0
