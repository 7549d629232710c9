"""TensorRT engine cache bookkeeping that needs no TensorRT: keys, file names, profiles, buffer sizes.

An engine (and a timing cache) is valid only for the ONNX file, TensorRT version, GPU and platform
that built it, and TensorRT has no pre-flight check for that: the cache key covers every one of
those inputs, so an engine is looked up only where it can be valid, and everything else rebuilds.
The platform facts come in as a `Platform` value (probed by gateway.inference.tensorrt), never read
here, so each input can be varied in tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.config import ModelConfig
from gateway.errors import ModelError
from gateway.inference import BackendUnavailable
from gateway.manifest import ModelManifest

logger = logging.getLogger(__name__)

# Bumped when what goes into an engine changes in a way the other key fields do not show.
KEY_VERSION = 1
L4T_RELEASE_FILE = Path("/etc/nv_tegra_release")
ENGINE_DIR = "engines"
_L4T = re.compile(r"^#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", re.MULTILINE)


@dataclass(frozen=True)
class Platform:
    """What TensorRT runs on: the parts of an engine's identity that are not the model."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    l4t_release: str | None  # "R36.4.3" on a Jetson, None elsewhere


@dataclass(frozen=True)
class Profile:
    """The optimization profile of the dynamic batch dimension, for [batch, window_length, channels]."""

    min_batch: int
    opt_batch: int
    max_batch: int
    window_length: int
    channels: int

    def shape(self, batch: int) -> tuple[int, int, int]:
        """The input shape for `batch` windows."""
        return (batch, self.window_length, self.channels)

    def __str__(self) -> str:
        return f"batch {self.min_batch}..{self.max_batch} (opt {self.opt_batch})"


def profile_shapes(manifest: ModelManifest, max_batch: int, n_assets: int) -> Profile:
    """Min 1, opt = the assets sharing the model (all due in one tick: one batch), max from config."""
    if max_batch < 1:
        raise ModelError(f"model {manifest.name}: max_batch must be >= 1, got {max_batch}")
    return Profile(
        min_batch=1,
        opt_batch=min(max(n_assets, 1), max_batch),
        max_batch=max_batch,
        window_length=manifest.input.window_length,
        channels=len(manifest.input.channels),
    )


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; its digest names the engine file."""

    model: str  # names the file for people; not part of the digest (renaming a model rebuilds nothing)
    onnx_sha256: str  # of the file actually built from: the FP16 copy for fp16
    precision: str
    profile: Profile
    platform: Platform

    def fields(self) -> dict[str, Any]:
        """The digested inputs, as JSON-ready values."""
        return {
            "key_version": KEY_VERSION,
            "onnx_sha256": self.onnx_sha256,
            "precision": self.precision,
            "profile": asdict(self.profile),
            "tensorrt": self.platform.tensorrt_version,
            "gpu": self.platform.gpu_name,
            "compute_capability": self.platform.compute_capability,
            "l4t": self.platform.l4t_release,
        }

    @property
    def digest(self) -> str:
        """sha256 hex of the canonical JSON of fields()."""
        return _digest(self.fields())

    @property
    def file_name(self) -> str:
        """`<model>-<first 16 hex digits>.engine`."""
        return f"{self.model}-{self.digest[:16]}.engine"


def _digest(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def engine_dir(cache_dir: Path) -> Path:
    """Where engines, their sidecars and timing caches live."""
    return cache_dir / ENGINE_DIR


def engine_path(key: EngineKey, cache_dir: Path) -> Path:
    """The engine file for `key` under the gateway's cache directory."""
    return engine_dir(cache_dir) / key.file_name


def sidecar_path(engine: Path) -> Path:
    """The JSON beside an engine that says what it was built from."""
    return engine.with_suffix(".json")


def timing_cache_path(platform: Platform, cache_dir: Path) -> Path:
    """One timing cache per TensorRT version and GPU (platform): shared by every model built there."""
    digest = _digest(
        {
            "tensorrt": platform.tensorrt_version,
            "gpu": platform.gpu_name,
            "compute_capability": platform.compute_capability,
            "l4t": platform.l4t_release,
        }
    )
    return engine_dir(cache_dir) / f"timing-{digest[:16]}.cache"


def engine_source(model_cfg: ModelConfig) -> Path:
    """The ONNX file this model's engine is built from; BackendUnavailable when the FP16 copy is missing."""
    if model_cfg.precision == "fp32":
        return model_cfg.path
    fp16 = model_cfg.fp16_model_path
    if not fp16.is_file():
        raise BackendUnavailable(
            f"FP16 copy {fp16} not found (precision fp16); make it with: edge-models fp16 {model_cfg.path}"
        )
    return fp16


def parse_l4t_release(text: str) -> str | None:
    """`# R36 (release), REVISION: 4.3, ...` (the first line of /etc/nv_tegra_release) -> "R36.4.3"."""
    m = _L4T.search(text)
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def read_l4t_release(path: Path = L4T_RELEASE_FILE) -> str | None:
    """The Jetson Linux (L4T) release of this machine, None where there is none (not a Jetson)."""
    try:
        return parse_l4t_release(path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return None


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's content, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor: `shape` has -1 for the dynamic batch dimension."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    is_input: bool

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one batch row (all but the first dimension)."""
        return self.shape[1:]

    @property
    def row_bytes(self) -> int:
        """Bytes of one batch row: what is copied per window."""
        return math.prod(self.row_shape) * self.dtype.itemsize


def buffer_sizes(tensors: list[TensorSpec], max_batch: int) -> dict[str, int]:
    """Bytes each I/O tensor needs at the profile's max batch.

    Only the batch dimension may be dynamic: other shapes make BackendUnavailable (ONNX Runtime serves them).
    """
    sizes: dict[str, int] = {}
    for t in tensors:
        if not t.shape or t.shape[0] not in (-1, max_batch):
            raise BackendUnavailable(f"tensor {t.name!r} has shape {t.shape}: no leading batch dimension")
        if any(d < 0 for d in t.row_shape):
            raise BackendUnavailable(f"tensor {t.name!r} has shape {t.shape}: only the batch may be dynamic")
        sizes[t.name] = max_batch * t.row_bytes
    return sizes


def atomic_write(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write `data` to `path` so that `path` holds its old content or all of `data`, even after a power cut.

    The bytes go to a temporary file in the same directory, are synced, and replace `path` by rename
    (atomic on POSIX); the directory is synced so the rename itself survives.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:  # mkstemp makes the file 0600
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_engine(path: Path, engine: bytes, key: EngineKey, *, source: Path, build_s: float) -> None:
    """Store an engine and, after it, its sidecar (the sidecar is what makes the engine count as cached)."""
    atomic_write(path, engine)
    sidecar = {
        "model": key.model,
        "digest": key.digest,
        **key.fields(),
        "source": str(source),
        "engine_sha256": hashlib.sha256(engine).hexdigest(),
        "engine_bytes": len(engine),
        "build_s": round(build_s, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write(sidecar_path(path), (json.dumps(sidecar, indent=2) + "\n").encode("utf-8"))


def read_sidecar(engine: Path) -> dict[str, Any] | None:
    """The sidecar of an engine file, or None when missing or unreadable."""
    try:
        data = json.loads(sidecar_path(engine).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_cached(path: Path, key: EngineKey) -> bytes | None:
    """The cached engine for `key`, or None (with the reason logged) when it must be built.

    Checked against its sidecar's digest and checksum first: TensorRT may crash, not fail, on a
    damaged file, so a truncated or foreign engine never reaches it.
    """
    sidecar = read_sidecar(path)
    if not path.is_file() or sidecar is None:
        logger.info("model %s: no cached engine %s", key.model, path)
        return None
    if sidecar.get("digest") != key.digest:
        logger.warning("model %s: sidecar of %s describes another build: rebuilding", key.model, path)
        return None
    data = path.read_bytes()
    intact = len(data) == sidecar.get("engine_bytes")
    if not intact or hashlib.sha256(data).hexdigest() != sidecar.get("engine_sha256"):
        logger.warning(
            "model %s: %s differs from its sidecar's size or checksum: rebuilding", key.model, path
        )
        return None
    return data
