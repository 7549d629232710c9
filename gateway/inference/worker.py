"""The one inference thread: backends run there, never on the event loop."""

from __future__ import annotations

import asyncio
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

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the worker thread and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Stop the thread once the call in progress is done; cancels work not yet started."""
        self._executor.shutdown(wait=False, cancel_futures=True)
