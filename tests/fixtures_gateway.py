"""A whole gateway running in a task of the test's event loop, stopped (and its exit code kept) on exit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.app import Gateway
from gateway.config import GatewayConfig


@dataclass
class RunningGateway:
    """The gateway, its run() task, and the exit code once the context has stopped it."""

    gateway: Gateway
    task: asyncio.Future[int]
    code: int | None = None

    def stopped(self) -> bool:
        """True if run() ended on its own (a failure to report rather than wait on)."""
        return self.task.done()


@contextlib.asynccontextmanager
async def running_gateway(cfg: GatewayConfig) -> AsyncIterator[RunningGateway]:
    """Gateway(cfg).run() in a task; on exit shutdown is requested and the exit code stored in `code`."""
    gateway = Gateway(cfg)
    shutdown = asyncio.Event()
    run = RunningGateway(gateway, asyncio.ensure_future(gateway.run(shutdown)))
    try:
        yield run
    finally:
        shutdown.set()
        run.code = await run.task
