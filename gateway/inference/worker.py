"""The one inference thread: backends run there, never on the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


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

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the worker thread and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, *args)

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
