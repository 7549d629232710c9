"""The inference worker: model calls on its thread, except cheap CPU calls, which run inline."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from gateway.demo.run import MODEL_DIR
from gateway.inference.onnxruntime import load_onnxruntime
from gateway.inference.worker import INLINE_BUDGET_S, InferenceWorker
from gateway.manifest import load_manifest


class _Recorder:
    """A backend that records which thread ran it and takes `seconds` of CPU (busy-wait, not sleep)."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name = name
        self.seconds = seconds
        self.threads: list[str] = []

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import time

        self.threads.append(threading.current_thread().name)
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        return {"score": batch.sum(axis=(1, 2))}


def _calls(backend: object, n: int, batch: np.ndarray) -> tuple[list[dict[str, np.ndarray]], int]:
    async def main() -> tuple[list[dict[str, np.ndarray]], int]:
        worker = InferenceWorker()
        try:
            results = [await worker.run_model("m", backend, batch) for _ in range(n)]
            return results, worker.inline_calls
        finally:
            worker.close()

    return asyncio.run(main())


def test_a_cheap_onnxruntime_cpu_call_runs_inline_after_its_first_measured_call() -> None:
    manifest = load_manifest(MODEL_DIR / "pump_ae.manifest.json")
    backend = load_onnxruntime(MODEL_DIR / "pump_ae.onnx", manifest)
    batch = np.random.default_rng(0).standard_normal(
        (4, manifest.input.window_length, len(manifest.input.channels))
    ).astype(np.float32)
    # The first two calls go to the thread (warm-up, then a measurement); the model takes tens of µs,
    # far under the budget, so the later ones run inline.
    results, inline = _calls(backend, 20, batch)
    assert 1 <= inline <= 18
    expected = backend.run(batch)
    for r in results:
        for name, value in expected.items():
            np.testing.assert_array_equal(r[name], value)


def test_costly_calls_and_gpu_backends_stay_on_the_worker_thread() -> None:
    batch = np.ones((2, 3, 4), dtype=np.float32)
    slow = _Recorder("onnxruntime-cpu", 4 * INLINE_BUDGET_S)
    _, inline = _calls(slow, 3, batch)
    assert inline == 0 and all(t.startswith("inference") for t in slow.threads)
    gpu = _Recorder("tensorrt", 0.0)
    _, inline = _calls(gpu, 3, batch)
    assert inline == 0 and all(t.startswith("inference") for t in gpu.threads)
    cheap = _Recorder("onnxruntime-cpu", 0.0)
    _, inline = _calls(cheap, 10, batch)
    assert inline >= 1 and cheap.threads[:2] == ["inference_0", "inference_0"] and "MainThread" in cheap.threads
