"""Model files checked before the daemon starts (`edge-gateway check`, reload): each problem one line.

The FP32 file is loaded as the gateway loads it, so a missing or corrupt file and a graph that
disagrees with its manifest give the loader's own message. The FP16 copy (the source of TensorRT
FP16 engines) records the sha256 of the FP32 file it was made from (`edge-models fp16`); a copy
made from another version is stale. Its metadata is read straight from the ONNX protobuf: the
gateway does not depend on the `onnx` package, and ONNX Runtime on a CPU may lack kernels to open
an FP16 graph at all.
"""

from __future__ import annotations

import io
import logging
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from gateway.config import GatewayConfig, ModelConfig
from gateway.errors import ModelError
from gateway.inference.engines import file_sha256
from gateway.inference.onnxruntime import load_onnxruntime
from gateway.inference.select import tensorrt_present
from gateway.manifest import ModelManifest

logger = logging.getLogger(__name__)

# onnx ModelProto.metadata_props key under which `edge-models fp16` records the FP32 file's sha256.
SOURCE_SHA256_KEY = "edge_models.fp16.source_sha256"
# ModelProto field numbers: graph (7) and metadata_props (14); StringStringEntryProto key (1), value (2).
_GRAPH, _METADATA = 7, 14
_KEY, _VALUE = 1, 2


def _varint(f: BinaryIO) -> int | None:
    """A protobuf varint from `f`; None at a clean end of file."""
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            if shift:
                raise ValueError("truncated varint")
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(f: BinaryIO, end: int, keep: frozenset[int]) -> dict[int, list[bytes]]:
    """Length-delimited fields of one protobuf message up to offset `end`; only those in `keep` are read
    (the graph, with the weights, is skipped), the others are listed with empty content."""
    found: dict[int, list[bytes]] = {}
    while f.tell() < end and (tag := _varint(f)) is not None:
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            if _varint(f) is None:
                raise ValueError("truncated varint")
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, 1)
        elif wire == 2:
            size = _varint(f)
            if size is None or f.tell() + size > end:
                raise ValueError("field runs past the end of the file")
            if field in keep:
                found.setdefault(field, []).append(f.read(size))
            else:
                found.setdefault(field, []).append(b"")
                f.seek(size, 1)
        else:
            raise ValueError(f"wire type {wire}")
    if f.tell() > end:
        raise ValueError("truncated file")
    return found


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The model's metadata_props without the `onnx` package; ModelError when the file is not an ONNX model."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            top = _fields(f, size, frozenset({_METADATA}))
            if _GRAPH not in top:
                raise ValueError("no graph")
            props: dict[str, str] = {}
            for entry in top.get(_METADATA, []):
                kv = _fields(io.BytesIO(entry), len(entry), frozenset({_KEY, _VALUE}))
                key, value = (kv.get(n, [b""])[-1].decode("utf-8") for n in (_KEY, _VALUE))
                props[key] = value
            return props
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not an ONNX model ({exc})") from exc


def fp16_command(m: ModelConfig) -> str:
    """The command that (re)makes this model's FP16 copy where the gateway looks for it."""
    out = ["--out", str(m.fp16_path)] if m.fp16_path is not None else []
    return shlex.join(["edge-models", "fp16", str(m.path), *out])


def fp16_in_use(m: ModelConfig) -> bool:
    """Whether a TensorRT engine for this model would be built from its FP16 copy."""
    return m.precision == "fp16" and m.backend in ("auto", "tensorrt")


def fp16_copy_problem(m: ModelConfig) -> str | None:
    """Why the FP16 copy of `m` cannot be used (unreadable, or made from another FP32 file); None if fine or absent."""
    fp16 = m.fp16_model_path
    if not fp16.is_file():
        return None
    try:
        recorded = read_onnx_metadata(fp16).get(SOURCE_SHA256_KEY)
    except ModelError as exc:
        return f"{exc}; run {fp16_command(m)}"
    if recorded is not None:
        if recorded == file_sha256(m.path):
            return None
        return f"{fp16.name} was made from another version of {m.path.name}; run {fp16_command(m)}"
    # A copy made by other tooling records no source: only its age can tell.
    if fp16.stat().st_mtime < m.path.stat().st_mtime:
        return f"{fp16.name} is older than {m.path.name} and records no source sha256; run {fp16_command(m)}"
    return None


def check_model_files(cfg: GatewayConfig, manifests: Mapping[str, ModelManifest]) -> list[str]:
    """Every model file problem, one line each naming the model; warnings (unused or missing copies) are logged."""
    problems: list[str] = []
    for i, m in enumerate(cfg.models):
        where = f"models[{i}] ({m.name})"
        try:
            load_onnxruntime(m.path, manifests[m.name])
        except ModelError as exc:
            problems.append(f"{where}: {exc}")
            continue
        problem = fp16_copy_problem(m)
        if problem is not None and fp16_in_use(m):
            problems.append(f"{where}: {problem}")
        elif problem is not None:
            logger.warning(
                "%s: %s (unused: precision %s, backend %s)", where, problem, m.precision, m.backend
            )
        elif (
            fp16_in_use(m)
            and not m.fp16_model_path.is_file()
            and (m.backend == "tensorrt" or tensorrt_present())
        ):
            logger.warning(
                "%s: no FP16 copy at %s, so TensorRT cannot build an fp16 engine; run %s",
                where,
                m.fp16_model_path,
                fp16_command(m),
            )
    return problems
