"""OPC-UA test helpers: a simulated PLC on a free port and a polling source run in a task.

Tests run their coroutine with asyncio.run(), so these are async context managers used inside that
coroutine rather than pytest fixtures (a server must live on the loop of the test that uses it).
`serving` runs one on a loop in a thread instead, for a command that calls asyncio.run itself, such
as `edge-gateway browse` (run with `browse`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from asyncua import ua

from gateway.browse_cli import add_browse_command
from gateway.config import SourceConfig
from gateway.demo.fastread import ArrayVariables
from gateway.demo.simulator import PlcSimulator
from gateway.latest import LatestValues
from gateway.sources.opcua import OpcUaPollSource, OpcUaSource, SourceTag
from gateway.sources.subscription import OpcUaSubscriptionSource
from tests.conftest import free_port, wait_for_condition

T = TypeVar("T")


@contextlib.asynccontextmanager
async def running_simulator(port: int | None = None, **options: Any) -> AsyncIterator[PlcSimulator]:
    """A started PlcSimulator on loopback (a free port unless given), stopped on exit."""
    sim = PlcSimulator(port=port or free_port(), **options)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def fast_simulator(**options: Any) -> AsyncIterator[tuple[PlcSimulator, ArrayVariables]]:
    """running_simulator(fast_read=True, ...): the simulator and the array variables its fast Reads and
    subscriptions are served from (their counters say which path a request took)."""
    async with running_simulator(fast_read=True, **options) as sim:
        variables = sim.variables
        assert variables is not None
        yield sim, variables


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
    endpoint: str, node_ids: Sequence[str] | Sequence[SourceTag], latest: LatestValues | None = None, **cfg: Any
) -> AsyncIterator[OpcUaSource]:
    """A source (polling, or subscribing with mode="subscribe") for `node_ids`, rows 0..n-1 of `latest`
    (its own table by default), running in a task that is cancelled on exit. SourceTags instead of
    node ids choose the rows (and array lengths) themselves."""
    tags = [nid if isinstance(nid, SourceTag) else SourceTag(i, nid) for i, nid in enumerate(node_ids)]
    config = source_config(endpoint, **cfg)
    kind = OpcUaSubscriptionSource if config.mode == "subscribe" else OpcUaPollSource
    rows = max(t.index + t.width for t in tags)
    async with running(kind(config, tags, latest if latest is not None else LatestValues(rows))) as source:
        yield source


SourceT = TypeVar("SourceT", bound=OpcUaSource)


@contextlib.asynccontextmanager
async def running(source: SourceT) -> AsyncIterator[SourceT]:
    """`source.run()` in a task, cancelled and awaited on exit."""
    task = asyncio.create_task(source.run())
    try:
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# A slow simulator: values written at start() stay put; tests write the changes themselves.
STILL = {"rate_hz": 0.01, "fault_pump": None, "bad_tag": None, "nan_tag": None}


def unix_ns(dt: datetime) -> int:
    """An aware datetime as integer ns since the Unix epoch, at the microsecond resolution OPC-UA keeps."""
    return (dt - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1) * 1000


async def write_uncertain_and_await(sim: PlcSimulator, latest: LatestValues, node_id: str, row: int) -> None:
    """Write a value with an Uncertain status and a set source time on the server; assert all three arrive."""
    stamp = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    uncertain = ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)
    await sim.server.write_attribute_value(
        ua.NodeId.from_string(node_id),
        ua.DataValue(ua.Variant(1234.5, ua.VariantType.Double), uncertain, stamp),
    )
    await wait_for_condition(lambda: latest.value[row] == 1234.5)
    assert latest.status[row] == ua.StatusCodes.UncertainLastUsableValue
    assert latest.source_ts[row] == unix_ns(stamp)


@contextlib.contextmanager
def serving(serve: Callable[[], AbstractAsyncContextManager[T]], name: str) -> Iterator[T]:
    """Run `serve()` on its own loop in a thread and yield what it yields, so a command can call asyncio.run."""
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main_() -> None:
        stop = asyncio.Event()
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop
        try:
            async with serve() as value:
                state["value"] = value
                started.set()
                await stop.wait()
        finally:
            started.set()

    def main() -> None:
        try:
            asyncio.run(main_())
        except BaseException as exc:  # handed to the test thread below
            state["error"] = exc

    thread = threading.Thread(target=main, name=name)
    thread.start()
    try:
        assert started.wait(30), f"{name} did not start"
        if "value" not in state:
            thread.join(30)
            raise AssertionError(f"{name} did not start: {state.get('error')!r}")
        yield state["value"]
    finally:
        if "loop" in state:
            with contextlib.suppress(RuntimeError):
                state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)
        assert "error" not in state, state.get("error")


def browse(argv: list[str]) -> int:
    """Parse `browse ...` with the command's own parser and run it."""
    parser = argparse.ArgumentParser(prog="edge-gateway")
    add_browse_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["browse", *argv])
    return int(args.func(args))
