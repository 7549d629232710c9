"""`edge-gateway bench --inference`: microseconds per window, per model and backend, at batch 1, 8 and 64.

For each model of a config (default: the demo's) it times, on the same random windows and in the
same run:

- bare: `session.run` of an ONNX Runtime CPU session opened as the gateway opens one
  (`open_session`, the model's threads), on a batch already normalized to float32;
- stage, per backend that loads here (each forced in turn through the backend selection): what
  `gateway.app._infer_loop` does per call and times as its inference figure, i.e. normalization,
  the hop onto the inference worker thread, `backend.run` and `manifest.values`;
- numpy: the NumPy reference (`gateway.numpy_ref`) on the bare run's batch, when `onnx` is
  installed and the model's ops are ones it evaluates.

The paths are timed in rounds of one block of BLOCK calls each (order rotated every round) after
warm-up: within a block a path runs warm, as a bare `session.run` loop does, and the alternation
makes a noisy neighbour or a frequency change hit every path alike. Each figure is a median per call
divided by the batch. Targets, judged and printed but not turned into the exit code: the
onnxruntime-cpu stage costs at most 1.3x the bare run at every batch, and for dense models (those
the NumPy reference evaluates: no convolution, no recurrence) a window at batch 64 costs at most a
fifth of one at batch 1.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil

from gateway.config import GatewayConfig, InferenceSection, ModelConfig, load_config
from gateway.demo.run import demo_config
from gateway.inference import BACKENDS, InferenceBackend
from gateway.inference.onnxruntime import open_session
from gateway.inference.select import load_backend
from gateway.inference.worker import InferenceWorker
from gateway.manifest import ModelManifest
from gateway.models import load_manifests
from gateway.normalize import Normalizer
from gateway.numpy_ref import NumpyReference, ReferenceUnavailable, load_numpy_reference

BATCHES = (1, 8, 64)
# Calls of one path in a row: each path is timed warm, as a bare `session.run` loop is; alternating
# the blocks spreads drift and noisy neighbours over every path alike.
BLOCK = 10
WARMUP_ROUNDS = 5
# A median needs a few samples even when a big model's call outlasts the time given.
MIN_ROUNDS = 3
PER_BATCH_S = 2.0
STAGE_TARGET = 1.3
BATCHING_TARGET = 0.2
SEED = 0


def demo_gateway_config() -> GatewayConfig:
    """The demo's config (shipped model, its pumps); nothing is connected, so the ports are placeholders."""
    return GatewayConfig.model_validate(demo_config(opc_port=4840, mqtt_port=1883, db_path=Path("unused.db")))


async def gateway_stage(
    worker: InferenceWorker,
    backend: InferenceBackend,
    normalizer: Normalizer,
    manifest: ModelManifest,
    batch: np.ndarray,
) -> np.ndarray:
    """One inference call as `gateway.app._infer_loop` makes it: normalize, run on the worker, values."""
    return manifest.values(await worker.run_model(manifest.name, backend, normalizer.apply(batch)))


def load_each_backend(
    model: ModelConfig, manifest: ModelManifest, inference: InferenceSection
) -> tuple[dict[str, InferenceBackend], dict[str, str]]:
    """Every backend that serves `model` here, each forced in turn, and why the others do not (blocking)."""
    loaded: dict[str, InferenceBackend] = {}
    skipped: dict[str, str] = {}
    for name in BACKENDS:
        backend, fallbacks = load_backend(model.model_copy(update={"backend": name}), manifest, inference)
        if backend.name == name:
            loaded[name] = backend
        else:
            skipped[name] = next((f.reason for f in fallbacks if f.backend == name), "not loaded")
    return loaded, skipped


Call = tuple[str, Callable[[], Any], bool]  # (path, fn, whether fn returns an awaitable)


async def time_interleaved(calls: list[Call], seconds: float) -> tuple[dict[str, float], int]:
    """Median seconds per call of each path, timed in rounds of one block per path (order rotated); and the rounds."""
    samples: dict[str, list[float]] = {path: [] for path, _, _ in calls}

    async def one_round(r: int) -> None:
        k = r % len(calls)
        for path, fn, awaitable in calls[k:] + calls[:k]:
            times = samples[path]
            for _ in range(BLOCK):
                began = time.perf_counter()
                if awaitable:
                    await fn()
                else:
                    fn()
                times.append(time.perf_counter() - began)

    for r in range(WARMUP_ROUNDS):
        await one_round(r)
    for times in samples.values():
        times.clear()
    rounds, end = 0, time.perf_counter() + seconds
    while rounds < MIN_ROUNDS or time.perf_counter() < end:
        await one_round(rounds)
        rounds += 1
    return {path: statistics.median(times) for path, times in samples.items()}, rounds


def _per_window(us: dict[int, float]) -> dict[str, float]:
    return {str(b): round(v, 3) for b, v in us.items()}


def _speedup(us: dict[int, float]) -> float:
    """Batch-1 cost over the largest batch's cost, per window."""
    return round(us[BATCHES[0]] / us[BATCHES[-1]], 2)


async def measure_model(
    cfg: GatewayConfig, model: ModelConfig, manifest: ModelManifest, worker: InferenceWorker, per_batch_s: float
) -> dict[str, Any]:
    """Every path's µs per window for one model at each batch size, plus targets and skipped backends."""
    backends, skipped = await worker.call(load_each_backend, model, manifest, cfg.inference)
    session = await worker.call(functools.partial(open_session, model.path, threads=model.threads))
    ref: NumpyReference | None = None
    # Dense: every op is one the NumPy reference evaluates (matrix products, element-wise, reshapes);
    # unknown without the onnx package to read the graph.
    dense: bool | None = True
    try:
        ref = await worker.call(load_numpy_reference, model.path)
        ref_note = "ok"
    except ReferenceUnavailable as exc:
        ref_note, dense = f"skipped ({exc})", (False if exc.ops else None)
    normalizer = Normalizer(manifest)
    outputs, input_name = manifest.output_names(), manifest.input.name
    shape = (manifest.input.window_length, len(manifest.input.channels))
    rng = np.random.default_rng(SEED)
    us: dict[str, dict[int, float]] = {}
    rounds: dict[str, int] = {}
    worst_diff = 0.0
    for b in BATCHES:
        # Engineering units around the training statistics: normalized, they are standard normal.
        raw = normalizer.mean + normalizer.std * rng.standard_normal((b, *shape))
        x = normalizer.apply(raw, out=np.empty((b, *shape), dtype=np.float32))
        feeds = {input_name: x}
        calls: list[Call] = [("bare", functools.partial(session.run, outputs, feeds), False)]
        calls += [
            (name, functools.partial(gateway_stage, worker, backend, normalizer, manifest, raw), True)
            for name, backend in backends.items()
        ]
        if ref is not None:
            calls.append(("numpy", functools.partial(ref.evaluate, feeds, outputs), False))
            expected = ref.evaluate(feeds, outputs)
            got = session.run(outputs, feeds)
            worst_diff = max(
                worst_diff, *(float(np.max(np.abs(g - expected[n]))) for n, g in zip(outputs, got, strict=True))
            )
        medians, rounds[str(b)] = await time_interleaved(calls, per_batch_s)
        for path, seconds in medians.items():
            us.setdefault(path, {})[b] = seconds * 1e6 / b
    rows = [{"path": "bare", "backend": "onnxruntime-cpu", "us_per_window": _per_window(us["bare"]),
             "batching_speedup": _speedup(us["bare"])}]  # fmt: skip
    for name in backends:
        ratio = {b: us[name][b] / us["bare"][b] for b in BATCHES}
        rows.append(
            {
                "path": "stage",
                "backend": name,
                "us_per_window": _per_window(us[name]),
                "batching_speedup": _speedup(us[name]),
                "stage_over_bare": _per_window(ratio),
                # The bare run is ONNX Runtime on the CPU: only that backend's stage is its like.
                "stage_target": (
                    ("PASS" if max(ratio.values()) <= STAGE_TARGET else "FAIL")
                    if name == "onnxruntime-cpu"
                    else "n/a"
                ),
                "batching_target": (
                    ("PASS" if us[name][BATCHES[-1]] <= BATCHING_TARGET * us[name][BATCHES[0]] else "FAIL")
                    if dense
                    else "n/a"
                ),
            }
        )
    if ref is not None:
        rows.append({"path": "numpy", "backend": ref.name, "us_per_window": _per_window(us["numpy"]),
                     "batching_speedup": _speedup(us["numpy"])})  # fmt: skip
    return {
        "model": model.name,
        "dense": dense,
        "numpy_reference": ref_note,
        "numpy_max_abs_diff": worst_diff if ref is not None else None,
        "rounds": rounds,
        "rows": rows,
        "skipped_backends": skipped,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


async def measure_inference(cfg: GatewayConfig, *, per_batch_s: float = PER_BATCH_S) -> dict[str, Any]:
    """The whole benchmark for every model of `cfg`, as one JSON-ready dict."""
    worker = InferenceWorker("bench-inference")
    try:
        manifests = await worker.call(load_manifests, cfg)
        models = [await measure_model(cfg, m, manifests[m.name], worker, per_batch_s) for m in cfg.models]
    finally:
        worker.close()
    return {
        "machine": f"{platform.machine()} {_cpu_name()}, {psutil.cpu_count()} cpu, Python {platform.python_version()}",
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "batches": list(BATCHES),
        "per_batch_s": per_batch_s,
        "block_calls": BLOCK,
        "warmup_rounds": WARMUP_ROUNDS,
        "targets": {"stage_over_bare": STAGE_TARGET, "batch64_over_batch1": BATCHING_TARGET},
        "models": models,
    }


def render(r: dict[str, Any]) -> str:
    """The figures as a table, one row per model and path, then each model's notes."""
    head = f"{'model':<12} {'path':<24}" + "".join(f" {'batch ' + str(b):>9}" for b in r["batches"])
    lines = [
        f"edge-gateway bench --inference on {r['machine']}; ONNX Runtime {r['onnxruntime']}, NumPy {r['numpy']}",
        f"µs per window: median per call / batch; paths alternate in blocks of {r['block_calls']} calls, "
        f"{r['per_batch_s']:g} s per batch after {r['warmup_rounds']} warm-up rounds",
        "",
        f"{head} {'speed-up':>9}  {'stage/bare':<20} targets",
    ]
    for m in r["models"]:
        for row in m["rows"]:
            label = "numpy reference" if row["path"] == "numpy" else f"{row['path']} {row['backend']}"
            cells = "".join(f" {row['us_per_window'][str(b)]:>9.1f}" for b in r["batches"])
            line = f"{m['model']:<12} {label:<24}{cells} {row['batching_speedup']:>8.1f}x"
            if row["path"] == "stage":
                ratios = " / ".join(f"{row['stage_over_bare'][str(b)]:.2f}" for b in r["batches"])
                line += (
                    f"  {ratios:<20} stage <= {r['targets']['stage_over_bare']}x bare: {row['stage_target']}; "
                    f"batch {r['batches'][-1]} <= 1/5 of batch 1: {row['batching_target']}"
                )
            lines.append(line)
    lines.append("")
    for m in r["models"]:
        ref = (
            f"NumPy reference = ONNX Runtime within {m['numpy_max_abs_diff']:.1e}"
            if m["numpy_max_abs_diff"] is not None
            else f"NumPy reference: {m['numpy_reference']}"
        )
        skipped = ", ".join(f"{b} ({why})" for b, why in m["skipped_backends"].items())
        lines.append(f"{m['model']}: {ref}; not available here: {skipped or 'none'}")
    return "\n".join(lines)


def run_inference_bench(config: Path | None, *, as_json: bool, per_batch_s: float = PER_BATCH_S) -> int:
    """CLI entry: measure the config's models (default: the demo's) and print the table or JSON."""
    cfg = load_config(config) if config is not None else demo_gateway_config()
    # Forcing each backend in turn logs every fallback; the table says which backends ran.
    logging.getLogger("gateway").setLevel(logging.ERROR)
    result = asyncio.run(measure_inference(cfg, per_batch_s=per_batch_s))
    print(json.dumps(result) if as_json else render(result))
    return 0
