"""A small owned-task supervisor with TaskGroup semantics that also runs on Python 3.10."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class Supervisor:
    """Owns every long-running task of the gateway.

    A task that ends with an exception (other than cancellation) is a fatal pipeline failure: it is
    recorded in `failure` and `failed` is set, so the composition root can begin an orderly shutdown.
    `close()` cancels whatever is still running and waits for it, bounded by a timeout.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start `coro` as an owned task called `name`."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.failure is None:
            logger.error("task %s failed: %s", task.get_name(), exc, exc_info=exc)
            self.failure = exc
            self.failed.set()

    @property
    def running(self) -> int:
        """How many owned tasks have not finished."""
        return len(self._tasks)

    async def cancel(self, task: asyncio.Task[Any], timeout: float) -> None:
        """Cancel one owned task and wait for it to finish, at most `timeout` seconds."""
        task.cancel()
        await asyncio.wait({task}, timeout=timeout)

    async def close(self, timeout: float) -> None:
        """Cancel every task still running and wait for them; report the ones that would not stop."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            logger.error("task %s did not stop within %.1f s", task.get_name(), timeout)


class Pulse:
    """Wakes every waiter each time `notify()` is called (an Event that re-arms itself)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake everyone waiting now; later waiters wait for the next notify."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> bool:
        """True if notified within `timeout` seconds, False otherwise."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
