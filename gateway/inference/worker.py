"""The one inference thread: model loads and inference run there, not on the event loop.

One exception, on purpose: a model call on ONNX Runtime's CPU backend that has been taking less than
INLINE_BUDGET_S at that batch size runs on the event loop itself. The hop to the thread and back
costs 40 to 80 µs on a small ARM or a shared x86 core, several times what a small model's batch
costs, and a fraction of a millisecond on the loop delays nothing (a sample period is 10 ms or more).
GPU backends never run inline: their CUDA context belongs to the worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

INLINE_BUDGET_S = 0.0005
# Backends whose sessions may be called from any thread (ONNX Runtime's CPU session is thread-safe).
_INLINE_BACKENDS = frozenset({"onnxruntime-cpu"})
# Weight of the newest measurement in the running cost estimate.
_EMA = 0.2


class InferenceWorker:
    """Runs blocking model work (loads, inference) on a single dedicated thread (one per device).

    One thread keeps ONNX Runtime/TensorRT sessions on the thread that uses them and makes
    back-pressure explicit: callers await their turn instead of piling up work.
    """

    def __init__(self, name: str = "inference") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        # time.monotonic() when the call now running on the thread began, None while idle: the
        # watchdog reads it to tell a hung model from a slow one (see gateway/watchdog.py).
        self.busy_since: float | None = None
        # (model, batch size) -> running estimate of one call's seconds; decides inline or thread.
        self._cost: dict[tuple[str, int], float] = {}
        self._seen: set[tuple[str, int]] = set()
        self.inline_calls = 0

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the worker thread and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, *args)

    async def run_model(self, model: str, backend: Any, batch: np.ndarray) -> dict[str, np.ndarray]:
        """`backend.run(batch)`: inline when known to be cheap (see the module docstring), else on the thread."""
        key = (model, len(batch))
        cost = self._cost.get(key)
        if backend.name in _INLINE_BACKENDS and cost is not None and cost < INLINE_BUDGET_S:
            began = time.perf_counter()
            try:
                return backend.run(batch)  # type: ignore[no-any-return]
            finally:
                self.inline_calls += 1
                self._learn(key, time.perf_counter() - began)
        return await self.call(self._measured, key, backend.run, batch)

    def _measured(self, key: tuple[str, int], fn: Callable[..., T], *args: Any) -> T:
        began = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._learn(key, time.perf_counter() - began)

    def _learn(self, key: tuple[str, int], seconds: float) -> None:
        # Called from the thread or the loop, never both for one key at once (one call per model in flight).
        # The first call of a batch size pays the session's warm-up: it only marks the key as seen.
        if key not in self._seen:
            self._seen.add(key)
            return
        old = self._cost.get(key)
        self._cost[key] = seconds if old is None else old + _EMA * (seconds - old)

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        # Set on the thread itself, so calls queued behind a running one do not count as busy.
        self.busy_since = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.busy_since = None

    def close(self) -> None:
        """Stop the thread once the call in progress is done; cancels work not yet started."""
        self._executor.shutdown(wait=False, cancel_futures=True)
