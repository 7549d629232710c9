"""FP16 parity: the FP16 path against ONNX Runtime FP32 on the same windows (`edge-gateway verify-engines`).

The FP16 path is the TensorRT engine where TensorRT runs, else the FP16 ONNX copy in ONNX Runtime
on the CPU. The CPU check is weaker than the engine's: ONNX Runtime runs an FP16 node in FP32
where it has no FP16 CPU kernel, so it catches weights and inputs rounded to FP16 and a broken
conversion, while `edge-models fp16` also checks every activation against FP16's range.

Tolerance (README "FP16 and parity"): FP16 keeps 11 significant bits, so each rounding is off by
up to u = 2**-11 ~ 4.9e-4 of the value. Models see z-scored inputs, so their tensors are O(1) and
errors are O(u) in absolute terms even where an output is small (an autoencoder's score is a small
difference of O(1) numbers). RTOL = 1e-2 ~ 20 u leaves room for a few layers of roundings; a real
fault (overflow, a badly converted op) is off by O(1). A value passes when
|FP16 - FP32| <= RTOL * max(|FP32|, 1). A threshold decision may differ only for a window whose
FP32 value lies within that tolerance of the threshold; an argmax only where the FP32 top two are
within twice it.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.config import GatewayConfig, InferenceSection, ModelConfig
from gateway.errors import EXIT_OK, EXIT_RUNTIME, ModelError
from gateway.inference import BackendUnavailable, InferenceBackend
from gateway.manifest import ModelManifest
from gateway.normalize import Normalizer

# ONNX Runtime is imported where a model is run: every edge-gateway command imports this module for
# its argument parser, and most of them never touch a model.

RTOL = 1e-2
TOLERANCE_TEXT = f"|FP16 - FP32| <= {RTOL:g} x max(|FP32|, 1)"
FP16_MAX = 65504.0


@dataclass(frozen=True)
class OutputError:
    """How far one output of the FP16 path is from FP32 over the windows compared."""

    name: str
    max_abs: float
    median_abs: float
    max_rel: float  # max |FP16 - FP32| / max(|FP32|, 1): at most RTOL to pass
    nonfinite: int  # windows where FP32 is finite and FP16 is not


@dataclass(frozen=True)
class Parity:
    """FP16 against FP32 on the same windows: errors per output and alarm decisions compared."""

    windows: int
    outputs: list[OutputError]
    decisions: int
    differ: int  # decisions that differ for a window clear of the threshold: a failure
    borderline: int  # decisions that differ within the tolerance of a threshold: allowed
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every output is within tolerance and every decision outside the band agrees."""
        return not self.problems

    def lines(self) -> list[str]:
        """The figures, one line per output and one for the decisions."""
        out = [
            f"  {o.name:<16} max {o.max_abs:.2e}  median {o.median_abs:.2e}  max/scale {o.max_rel:.1e}"
            for o in self.outputs
        ]
        out.append(
            f"  decisions: {self.decisions} compared, {self.differ} differ"
            f" ({self.borderline} more within the tolerance of a threshold, allowed)"
        )
        return out + [f"  problem: {p}" for p in self.problems]


def default_thresholds(manifest: ModelManifest) -> list[tuple[str, float]]:
    """The manifest's threshold crossings as (value name, level); a classifier decides by argmax instead."""
    if manifest.output.kind == "class_probabilities":
        return []
    name = manifest.value_names()[0]
    return [(name, manifest.thresholds.high), (name, manifest.thresholds.low)]


def _flips(flipped: np.ndarray, near: np.ndarray) -> tuple[int, int]:
    """Decisions that differ clear of the threshold (a failure), and those within its tolerance band."""
    return int((flipped & ~near).sum()), int((flipped & near).sum())


def _nonfinite_problem(name: str, ref: np.ndarray, got: np.ndarray) -> tuple[int, str | None]:
    bad = np.isfinite(ref) & ~np.isfinite(got)
    rows = int(bad.reshape(len(bad), -1).any(axis=1).sum())
    if not rows:
        return 0, None
    return rows, (
        f"output {name!r} is not finite under FP16 in {rows} of {len(ref)} window(s), where FP32 is: "
        f"a value overflows FP16 (largest finite {FP16_MAX:g})"
    )


def compare(
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    manifest: ModelManifest,
    thresholds: list[tuple[str, float]] | None = None,
) -> Parity:
    """Compare the FP16 path's outputs with FP32's; `thresholds` default to the manifest's."""
    problems: list[str] = []
    errors: list[OutputError] = []
    for name, ref64 in ((n, np.asarray(r, dtype=np.float64)) for n, r in reference.items()):
        got = np.asarray(candidate[name], dtype=np.float64)
        if got.shape != ref64.shape:
            problems.append(
                f"output {name!r} has shape {list(got.shape)} under FP16, {list(ref64.shape)} in FP32"
            )
            continue
        nonfinite, problem = _nonfinite_problem(name, ref64, got)
        if problem:
            problems.append(problem)
        both = np.isfinite(ref64) & np.isfinite(got)
        diff = np.abs(got - ref64)[both]
        rel = diff / np.maximum(np.abs(ref64[both]), 1.0)
        err = OutputError(
            name=name,
            max_abs=float(diff.max(initial=0.0)),
            median_abs=float(np.median(diff)) if diff.size else 0.0,
            max_rel=float(rel.max(initial=0.0)),
            nonfinite=nonfinite,
        )
        errors.append(err)
        if err.max_rel > RTOL:
            problems.append(
                f"output {name!r} differs by up to {err.max_abs:.3g} ({err.max_rel:.2g} of max(|FP32|, 1); "
                f"tolerance {RTOL:g})"
            )
    decisions = differ = borderline = 0
    if len(errors) == len(reference):  # every output has FP32's shape, so the decisions line up
        ref_v, got_v = manifest.values(reference), manifest.values(candidate)
        names = manifest.value_names()
        for value, level in default_thresholds(manifest) if thresholds is None else thresholds:
            r, g = ref_v[:, names.index(value)], got_v[:, names.index(value)]
            hard, soft = _flips(
                (r >= level) != (g >= level), np.abs(r - level) <= RTOL * max(abs(level), 1.0)
            )
            decisions, differ, borderline = decisions + len(r), differ + hard, borderline + soft
            if hard:
                problems.append(
                    f"{value} >= {level:g} is decided otherwise in {hard} window(s), clear of the threshold"
                )
        if manifest.output.kind == "class_probabilities":
            top2 = np.sort(ref_v, axis=1)[:, -2:]
            near = (top2[:, 1] - top2[:, 0]) <= 2 * RTOL * np.maximum(top2[:, 1], 1.0)
            hard, soft = _flips(ref_v.argmax(axis=1) != got_v.argmax(axis=1), near)
            decisions, differ, borderline = decisions + len(ref_v), differ + hard, borderline + soft
            if hard:
                problems.append(f"the most probable class differs in {hard} window(s)")
    n = len(next(iter(reference.values()))) if reference else 0
    return Parity(n, errors, decisions, differ, borderline, problems)


def random_windows(n: int, length: int, channels: int, *, seed: int = 0) -> np.ndarray:
    """n float32 windows of z-scores: noise with a spread log-uniform in [1/4, 2] per window.

    Calm and wild windows alike, so that values on both sides of typical thresholds get compared.
    """
    rng = np.random.default_rng(seed)
    spread = np.exp(rng.uniform(math.log(0.25), math.log(2.0), (n, 1, 1)))
    return np.ascontiguousarray(rng.standard_normal((n, length, channels)) * spread, dtype=np.float32)


def open_fp16_backend(path: Path, manifest: ModelManifest) -> InferenceBackend:
    """The FP16 ONNX copy in ONNX Runtime on the CPU; BackendUnavailable when ORT cannot run the graph here."""
    import onnxruntime as ort

    from gateway.inference.onnxruntime import CPU, OnnxRuntimeBackend, session_options

    so = session_options(1)
    # ORT_ENABLE_ALL's NCHWc layout transformer crashes ORT 1.32 on some FP16 graphs (Conv1d -> LSTM).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=[CPU])
    except Exception as exc:  # a missing FP16 kernel or an unreadable file; pybind classes share no base
        reason = " ".join(str(exc).split())
        raise BackendUnavailable(f"ONNX Runtime cannot run this FP16 graph on CPU: {reason}") from exc
    return OnnxRuntimeBackend(session, path, manifest, precision="fp16")


def run_batches(backend: InferenceBackend, windows: np.ndarray, max_batch: int) -> dict[str, np.ndarray]:
    """All windows through `backend` in batches of at most `max_batch`, outputs concatenated."""
    parts = [backend.run(windows[i : i + max_batch]) for i in range(0, len(windows), max_batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def recorded_windows(
    cfg: GatewayConfig, m: ModelConfig, manifest: ModelManifest, limit: int
) -> tuple[np.ndarray, str]:
    """Up to `limit` normalized windows cut from the tag history of the model's assets, and what they are.

    Windows take the asset's geometry (window length and hop), newest first; a window with a Bad
    (null) value is left out. The tag history keeps `storage.history_hz` rows a second, so where that
    is slower than the asset's rate the windows hold real values on a slower time scale.
    """
    from gateway.history import HistoryError, has_table, open_db

    length, channels = manifest.input.window_length, manifest.input.channels
    none = np.empty((0, length, len(channels)), dtype=np.float32)
    try:
        conn = open_db(cfg.storage.path)
    except HistoryError as exc:
        return none, f"no recorded windows: {exc}"
    found: list[np.ndarray] = []
    try:
        if not has_table(conn, "samples"):
            return none, f"no recorded windows: {cfg.storage.path} has no tag history (samples table)"
        per_asset = math.ceil(limit / len(m.assets))
        for name in m.assets:
            hop = cfg.asset(name).window.hop
            rows = conn.execute(
                "SELECT values_json FROM samples WHERE asset = ? ORDER BY ts_ns DESC LIMIT ?",
                [name, length + (per_asset - 1) * hop],
            ).fetchall()
            series = np.array(
                [[_number(json.loads(r[0]).get(c)) for c in channels] for r in reversed(rows)],
                dtype=np.float64,
            ).reshape(-1, len(channels))
            windows = [series[s : s + length] for s in range(0, len(series) - length + 1, hop)]
            found += [w for w in windows if np.isfinite(w).all()][-per_asset:]
    finally:
        conn.close()
    if not found:
        return (
            none,
            f"no recorded windows: the tag history holds no complete {length}-row window without Bad values",
        )
    batch = np.stack(found[:limit])
    out = np.empty(batch.shape, dtype=np.float32)
    Normalizer(manifest).apply(batch, out=out)
    note = f"{len(batch)} recorded (tag history of {', '.join(m.assets)})"
    rate = cfg.asset(m.assets[0]).sample_rate_hz
    if cfg.storage.history_hz < rate:
        note += f", kept at {cfg.storage.history_hz:g} Hz while the model samples at {rate:g} Hz"
    return out, note


def _number(v: Any) -> float:
    """A tag history value; null (Bad or NaN when recorded) becomes NaN."""
    return math.nan if v is None else float(v)


@dataclass
class ModelVerdict:
    """One model's parity result: PASS, FAIL, or SKIP when nothing FP16 can run here."""

    model: str
    status: str
    fp16: str = ""  # what ran as the FP16 path
    windows: str = ""  # what the windows were
    reason: str = ""
    parity: Parity | None = None


def fp16_path(
    m: ModelConfig, manifest: ModelManifest, inference: InferenceSection
) -> tuple[InferenceBackend, str]:
    """The FP16 path this machine has: the TensorRT engine, else the FP16 copy in ORT CPU; and its description.

    Raises ModelError when the copy is stale or missing, BackendUnavailable when ORT cannot run it.
    """
    from gateway.model_checks import fp16_command, fp16_copy_problem

    problem = fp16_copy_problem(m) if m.precision == "fp16" else None
    if problem is not None:
        raise ModelError(problem)
    try:
        from gateway.inference.tensorrt import load_tensorrt
    except ImportError as exc:
        no_engine = f"no TensorRT backend ({exc})"
    else:
        try:
            return load_tensorrt(m, manifest, inference), f"TensorRT {m.precision} engine"
        except BackendUnavailable as exc:
            no_engine = str(exc)
    path = m.fp16_model_path
    if not path.is_file():
        if m.precision == "fp32":
            raise BackendUnavailable(f"precision fp32 and no TensorRT engine here ({no_engine})")
        raise ModelError(f"no FP16 copy at {path}; run {fp16_command(m)}")
    return open_fp16_backend(path, manifest), f"FP16 copy {path} on ONNX Runtime CPU (no engine: {no_engine})"


def verify_model(
    cfg: GatewayConfig,
    m: ModelConfig,
    manifest: ModelManifest,
    thresholds: list[tuple[str, float]],
    *,
    windows: int,
    from_db: bool,
) -> ModelVerdict:
    """Run `windows` windows through FP32 ORT and the FP16 path and compare; blocking."""
    from gateway.inference.onnxruntime import load_onnxruntime

    try:
        fp16, label = fp16_path(m, manifest, cfg.inference)
    except BackendUnavailable as exc:
        return ModelVerdict(m.name, "SKIP", reason=str(exc))
    except ModelError as exc:
        return ModelVerdict(m.name, "FAIL", reason=str(exc))
    reference = load_onnxruntime(m.path, manifest)
    length, channels = manifest.input.window_length, len(manifest.input.channels)
    if from_db:
        batch, note = recorded_windows(cfg, m, manifest, windows)
    else:
        batch, note = np.empty((0, length, channels), dtype=np.float32), "no --from-db"
    fill = windows - len(batch)
    if fill > 0:
        batch = np.concatenate([batch, random_windows(fill, length, channels)])
        note = (
            f"{note}; {fill} random normalized" if len(batch) > fill else f"{fill} random normalized ({note})"
        )
    parity = compare(
        run_batches(reference, batch, m.max_batch),
        run_batches(fp16, batch, m.max_batch),
        manifest,
        thresholds,
    )
    return ModelVerdict(m.name, "PASS" if parity.passed else "FAIL", label, note, parity=parity)


def cmd_verify(args: argparse.Namespace) -> int:
    """`edge-gateway verify-engines`: exit 0 when every model passes (or has nothing FP16 here), 3 when one fails."""
    from gateway.alarms import build_rules
    from gateway.config import load_config
    from gateway.models import load_manifests

    cfg = load_config(args.config)
    manifests = load_manifests(cfg)
    rules = build_rules(cfg, manifests)
    verdicts = []
    for m in cfg.models:
        manifest = manifests[m.name]
        levels = [(r.output, level) for r in rules if r.model == m.name for level in (r.high, r.low)]
        thresholds = list(dict.fromkeys(default_thresholds(manifest) + levels))
        verdicts.append(
            verify_model(cfg, m, manifest, thresholds, windows=args.windows, from_db=args.from_db)
        )
    failed = any(v.status == "FAIL" for v in verdicts)
    if args.json:
        doc = {
            "tolerance": TOLERANCE_TEXT,
            "rtol": RTOL,
            "passed": not failed,
            "models": [asdict(v) for v in verdicts],
        }
        print(json.dumps(doc, indent=2))
        return EXIT_RUNTIME if failed else EXIT_OK
    for v in verdicts:
        print(f"{v.model}: {v.status}" + (f": {v.reason}" if v.reason else ""))
        if v.parity is not None:
            print(f"  FP16: {v.fp16}\n  FP32: ONNX Runtime CPU\n  windows: {v.windows}")
            print("\n".join(v.parity.lines()))
    if not verdicts:
        print(f"{args.config}: no models configured")
    print(f"tolerance: {TOLERANCE_TEXT}; a threshold decision may differ only within it of the threshold")
    return EXIT_RUNTIME if failed else EXIT_OK


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_verify_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `verify-engines CONFIG [--windows N] [--from-db] [--json]`."""
    v = subparsers.add_parser(
        "verify-engines",
        help="compare each model's FP16 path (TensorRT engine, else the FP16 ONNX copy) with ONNX Runtime FP32; "
        "exit 3 if one is out of tolerance",
    )
    v.add_argument("config", type=Path)
    v.add_argument("--windows", type=_positive_int, default=256, help="windows per model (default 256)")
    v.add_argument(
        "--from-db",
        action="store_true",
        help="cut windows from the tag history in the gateway's database (storage.path); random ones fill up",
    )
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=cmd_verify)
