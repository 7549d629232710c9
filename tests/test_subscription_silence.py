"""A subscription that goes quiet: a frozen PLC process, and a live server whose subscription stops publishing.

Both end the session, mark the source's tags BadCommunicationError and reconnect once the server
answers again. They are told apart by the reason the source records:

- A frozen process (SIGSTOP: the TCP connection stays open, nothing answers) is caught either by
  asyncua's connection supervisor, which reads the server state every timeout_s seconds and waits
  timeout_s for the answer ("no answer within <timeout_s> s"), or by the silence limit, the revised
  keepalive period plus timeout_s ("no publish response for N s"), whichever comes first.
- A server that still answers requests but no longer publishes passes that probe; only the silence
  detection notices: "no publish response for N s".
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Awaitable, Callable

from gateway.demo.run import simulator_process
from gateway.demo.signals import TAGS
from gateway.demo.simulator import NAMESPACE_URI, pump_name
from gateway.latest import BAD_COMMUNICATION_ERROR, is_good
from gateway.sources.opcua import OpcUaSource
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_opcua import STILL, running_simulator, running_source

# Generous: a busy machine may delay the reconnect, and the silence limit is 2 s + timeout_s.
DEADLINE_S = 30.0
SUBSCRIBE = {"mode": "subscribe", "publishing_interval_ms": 50}


async def silence_and_recover(
    source: OpcUaSource, silence: Callable[[], Awaitable[None]], resume: Callable[[], None]
) -> str:
    """Await Good values, silence the server, await the session's failure, resume, await Good values
    from a new session; returns the recorded reason. `resume` runs even when the failure never comes."""
    latest, stats = source.latest, source.stats
    await wait_for_condition(lambda: is_good(latest.status).all(), DEADLINE_S, "first values Good")
    connects = stats.connects
    await silence()
    try:
        await wait_for_condition(
            lambda: stats.last_error is not None and not is_good(latest.status).any(),
            DEADLINE_S,
            "tags Bad with a reason",
        )
        # Checked before any await: the reconnect would overwrite the Bad rows.
        assert (latest.status == BAD_COMMUNICATION_ERROR).all()
        assert not stats.connected and stats.session_errors == 1
        reason = stats.last_error
        marked_bad_ns = latest.recv_ns.copy()
    finally:
        resume()
    await wait_for_condition(lambda: is_good(latest.status).all(), DEADLINE_S, "values Good again")
    assert stats.connects > connects and stats.connected and stats.last_error is None
    # New values from the new session, stored after the rows were marked Bad.
    assert (latest.recv_ns > marked_bad_ns).all()
    return reason


def test_frozen_plc_process_marks_tags_bad_then_reconnects() -> None:
    timeout_s = 3.0
    port = free_port()
    nodes = [f"nsu={NAMESPACE_URI};s={pump_name(1)}.{tag}" for tag in TAGS]

    async def main(pid: int) -> str:
        before = asyncio.all_tasks()

        async def freeze() -> None:
            os.kill(pid, signal.SIGSTOP)

        def thaw() -> None:
            os.kill(pid, signal.SIGCONT)

        async with running_source(
            f"opc.tcp://127.0.0.1:{port}/", nodes, timeout_s=timeout_s, **SUBSCRIBE
        ) as source:
            reason = await silence_and_recover(source, freeze, thaw)
        leaked = asyncio.all_tasks() - before
        assert not leaked, f"tasks left behind: {leaked}"
        return reason

    with simulator_process(port, pumps=1, extra=["--no-fault", "--no-bad-data"]) as proc:
        try:
            reason = asyncio.run(main(proc.pid))
        finally:
            # simulator_process ends it with SIGTERM, which a stopped process would not act on.
            os.kill(proc.pid, signal.SIGCONT)
    assert proc.returncode == 0  # it ran on after the freeze and stopped cleanly
    # Either check may notice first (the session watchdog or the silent subscription); both are right.
    assert reason == f"no answer within {timeout_s:g} s" or re.fullmatch(
        r"no publish response for \d+\.\d s", reason
    ), reason


def test_subscription_that_stops_publishing_is_detected_and_replaced() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            before = asyncio.all_tasks()
            subscriptions = sim.server.iserver.subscription_service.subscriptions

            async def stop_publishing() -> None:
                # The server's publishing engine for our subscription halts: no data, no keepalive,
                # while Reads (asyncua's connection probe among them) are answered as before.
                (subscription,) = subscriptions.values()
                await subscription.stop()

            async with running_source(sim.endpoint, sim.tags, timeout_s=0.5, **SUBSCRIBE) as source:
                reason = await silence_and_recover(source, stop_publishing, lambda: None)
                assert len(subscriptions) == 1  # the silent one was deleted with its session
            # The server's own tasks for the connection (same loop) end once it has closed it.
            closing = sim.server.bserver.closing_tasks
            await wait_for_condition(
                lambda: not sim.server.iserver.asyncio_transports and all(t.done() for t in closing),
                DEADLINE_S,
                "the server closing the connection",
            )
            leaked = asyncio.all_tasks() - before
            assert not leaked, f"tasks left behind: {leaked}"
        assert re.fullmatch(r"no publish response for \d+\.\d s", reason), reason

    asyncio.run(main())
