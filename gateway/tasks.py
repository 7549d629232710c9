"""A small owned-task supervisor with TaskGroup semantics that also runs on Python 3.10."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)

# asyncio.wait_for before 3.12 can swallow a cancellation that arrives as the awaited thing finishes,
# leaving a task that does not stop (cpython#86296); wait_for2 is the fixed backport.
if sys.version_info >= (3, 12):
    from asyncio import wait_for
else:  # pragma: no cover - depends on the interpreter
    from wait_for2 import wait_for

__all__ = ["Pulse", "Supervisor", "backoff_delay", "wait_event", "wait_for"]


def backoff_delay(failures: int, lo: float, hi: float) -> float:
    """Capped exponential backoff with jitter: uniform in [cap/2, cap] (not below lo), cap = min(hi, lo * 2**failures)."""
    # Jitter spreads the retries of many gateways (or sources) that lost the same peer at once.
    cap = min(hi, lo * 2.0 ** min(failures, 32))
    return max(lo, random.uniform(cap / 2.0, cap))


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


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True if `event` is set within `timeout` seconds.

    Unlike `asyncio.wait_for` on Python 3.10/3.11, this never swallows a cancellation that arrives
    together with the event, so a task waiting here always stops when cancelled.
    """
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)


class Pulse:
    """Wakes every waiter each time `notify()` is called (an Event that re-arms itself).

    Built on bare futures rather than `asyncio.wait_for`, whose Python 3.10/3.11 versions can
    swallow a cancellation that arrives together with the wake-up, leaving a task that will not stop.
    """

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[bool]] = set()

    def notify(self) -> None:
        """Wake everyone waiting now; later waiters wait for the next notify."""
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(True)
        self._waiters.clear()

    async def wait(self, timeout: float) -> bool:
        """True if notified within `timeout` seconds, False otherwise."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.add(fut)
        timer = loop.call_later(timeout, lambda: fut.done() or fut.set_result(False))
        try:
            return await fut
        finally:
            timer.cancel()
            self._waiters.discard(fut)
