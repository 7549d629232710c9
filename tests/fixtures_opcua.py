"""OPC-UA test helpers: a simulated PLC on a free port and a polling source run in a task.

Tests run their coroutine with asyncio.run(), so these are async context managers used inside that
coroutine rather than pytest fixtures (a server must live on the loop of the test that uses it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gateway.config import SourceConfig
from gateway.demo.simulator import PlcSimulator
from gateway.latest import LatestValues
from gateway.sources.opcua import OpcUaPollSource, SourceTag
from tests.conftest import free_port


@contextlib.asynccontextmanager
async def running_simulator(port: int | None = None, **options: Any) -> AsyncIterator[PlcSimulator]:
    """A started PlcSimulator on loopback (a free port unless given), stopped on exit."""
    sim = PlcSimulator(port=port or free_port(), **options)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def source_config(endpoint: str, **overrides: Any) -> SourceConfig:
    """A SourceConfig with short timeouts suitable for tests."""
    options: dict[str, Any] = {
        "name": "plc",
        "endpoint": endpoint,
        "poll_interval_ms": 50,
        "timeout_s": 2.0,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.5,
    }
    options.update(overrides)
    return SourceConfig(**options)


@contextlib.asynccontextmanager
async def running_source(
    endpoint: str, node_ids: Sequence[str], **cfg: Any
) -> AsyncIterator[OpcUaPollSource]:
    """An OpcUaPollSource for `node_ids` (rows 0..n-1 of its own table) running in a task, cancelled on exit."""
    tags = [SourceTag(i, nid) for i, nid in enumerate(node_ids)]
    source = OpcUaPollSource(source_config(endpoint, **cfg), tags, LatestValues(len(node_ids)))
    task = asyncio.create_task(source.run())
    try:
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
