"""OpcUaSubscriptionSource against a real asyncua server (the simulated PLC)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pytest
from asyncua import ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from pydantic import ValidationError

from gateway.config import SourceConfig
from gateway.latest import (
    BAD_COMMUNICATION_ERROR,
    BAD_NOT_CONNECTED,
    BAD_TYPE_MISMATCH,
    GOOD,
    LatestValues,
    is_good,
)
from gateway.sources.opcua import OpcUaPollSource, SourceTag
from gateway.sources.subscription import OpcUaSubscriptionSource
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_opcua import (
    STILL,
    running,
    running_simulator,
    running_source,
    source_config,
    unix_ns,
    write_uncertain_and_await,
)

_MAX_ITEMS_PER_CALL = ua.NodeId(ua.Int32(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall))


class RecordingLatest(LatestValues):
    """The real table, also keeping every batch written to it (row -> value) in order."""

    def __init__(self, n_tags: int) -> None:
        super().__init__(n_tags)
        self.batches: list[dict[int, float]] = []

    def write(
        self, idx: np.ndarray, value: np.ndarray, status: np.ndarray, source_ts: np.ndarray, recv_ns: int
    ) -> None:
        super().write(idx, value, status, source_ts, recv_ns)
        self.batches.append(dict(zip(idx.tolist(), value.tolist(), strict=True)))

    def seen(self, row: int) -> list[float]:
        """Every value stored for `row`, oldest first."""
        return [batch[row] for batch in self.batches if row in batch]


def _double(x: float, stamp: datetime | None = None) -> ua.DataValue:
    return ua.DataValue(ua.Variant(x, ua.VariantType.Double), SourceTimestamp=stamp)


def running_subscription(endpoint: str, node_ids: Sequence[str], latest: LatestValues | None = None, **cfg: Any):  # type: ignore[no-untyped-def]
    """A subscribing source for `node_ids` (rows 0..n-1) running in a task, cancelled on exit."""
    return running_source(endpoint, node_ids, latest, **{"mode": "subscribe", "publishing_interval_ms": 50, **cfg})


def test_values_statuses_and_timestamps_arrive_by_subscription() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            objects = sim.server.nodes.objects
            await objects.add_variable(ua.NodeId("text", 2), "text", "hello")
            await objects.add_variable(ua.NodeId("flag", 2), "flag", True)
            nodes = [*sim.tags, "ns=2;s=text", "ns=2;s=flag", "ns=2;s=missing"]
            async with running_subscription(sim.endpoint, nodes) as source:
                assert await source.wait_connected(10)
                latest = source.latest
                # Initial values come with the subscription.
                await wait_for_condition(lambda: is_good(latest.status[: len(sim.tags)]).all())
                for row, node in enumerate(sim.tags):
                    dv = sim.data_value(1, node.rsplit(".", 1)[1])
                    assert latest.value[row] == dv.Value.Value
                    assert latest.source_ts[row] == unix_ns(dv.SourceTimestamp)
                text, flag, missing = len(sim.tags), len(sim.tags) + 1, len(sim.tags) + 2
                await wait_for_condition(lambda: latest.status[flag] == GOOD and latest.status[text] != 0x80320000)
                assert math.isnan(latest.value[text]) and latest.status[text] == BAD_TYPE_MISMATCH
                assert latest.value[flag] == 1.0
                assert math.isnan(latest.value[missing]) and latest.status[missing] == ua.StatusCodes.BadNodeIdUnknown
                # Both are caught while resolving the tags, before any monitored item is asked for.
                assert source.stats.refused_items == 0 and source.stats.create_calls == 1

                speed = sim.node_id(1, "speed")
                await write_uncertain_and_await(sim, latest, speed, nodes.index(speed))
                assert source.stats.connected and source.stats.connects == 1 and source.stats.session_errors == 0
                assert 0 < source.stats.notifications <= latest.writes

    asyncio.run(main())


def test_absolute_deadband_keeps_changes_within_it_away() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            nodes = sim.tags[:2]
            latest = RecordingLatest(len(nodes))
            deadband = {"type": "absolute", "value": 0.5}
            async with running_subscription(sim.endpoint, nodes, latest, deadband=deadband) as source:
                assert await source.wait_connected(10)
                tag, marker = (ua.NodeId.from_string(n) for n in nodes)
                await sim.server.write_attribute_value(tag, _double(10.0))
                await wait_for_condition(lambda: latest.value[0] == 10.0)
                # A small step, then a big change of another tag (deadbanded too): once that arrives, the step would have.
                for small, big, mark in ((10.3, 11.0, 1000.0), (11.2, 20.0, 2000.0)):
                    await sim.server.write_attribute_value(tag, _double(small))
                    await sim.server.write_attribute_value(marker, _double(mark))
                    await wait_for_condition(lambda m=mark: latest.value[1] == m)
                    assert small not in latest.seen(0)
                    await sim.server.write_attribute_value(tag, _double(big))
                    await wait_for_condition(lambda b=big: latest.value[0] == b)
                seen = latest.seen(0)
                assert seen[seen.index(10.0) :] == [10.0, 11.0, 20.0]
                assert source.stats.refused_items == 0

    asyncio.run(main())


def test_items_are_created_in_chunks_of_the_servers_limit() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            await sim.server.write_attribute_value(
                _MAX_ITEMS_PER_CALL, ua.DataValue(ua.Variant(3, ua.VariantType.UInt32))
            )
            async with running_subscription(sim.endpoint, sim.tags) as source:
                assert await source.wait_connected(10)
                await wait_for_condition(lambda: is_good(source.latest.status).all())
                assert source.stats.create_calls == 3 and source.stats.refused_items == 0

    asyncio.run(main())


def test_a_refused_monitored_item_leaves_its_tag_bad() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            gone = ua.NodeId.from_string(sim.tags[2])

            def delete_after_resolving(event: ServerItemCallback, _dispatcher: object) -> None:
                # The source reads MaxMonitoredItemsPerCall after resolving its tags, just before creating items.
                if any(r.NodeId == _MAX_ITEMS_PER_CALL for r in event.request_params.NodesToRead):
                    sim.server.iserver.node_mgt_service.delete_nodes(
                        ua.DeleteNodesParameters(NodesToDelete=[ua.DeleteNodesItem(NodeId=gone)])
                    )

            sim.server.subscribe_server_callback(CallbackType.PreRead, delete_after_resolving)
            async with running_subscription(sim.endpoint, sim.tags) as source:
                assert await source.wait_connected(10)
                latest = source.latest
                await wait_for_condition(lambda: latest.status[2] == ua.StatusCodes.BadNodeIdUnknown)
                await wait_for_condition(lambda: is_good(np.delete(latest.status, 2)).all())
                assert source.stats.refused_items == 1 and math.isnan(latest.value[2])

    asyncio.run(main())


def test_server_restart_marks_tags_bad_then_resubscribes() -> None:
    async def main() -> None:
        port = free_port()
        async with running_simulator(port, n_pumps=1, **STILL) as sim:
            nodes = sim.tags
            async with running_subscription(sim.endpoint, nodes) as source:
                assert await source.wait_connected(10)
                latest = source.latest
                await wait_for_condition(lambda: is_good(latest.status).all())
                await sim.stop()
                await wait_for_condition(lambda: not is_good(latest.status).any())
                assert set(latest.status.tolist()) <= {BAD_COMMUNICATION_ERROR, BAD_NOT_CONNECTED}
                assert not source.stats.connected and source.stats.last_error
                assert source.stats.session_errors == 1

                async with running_simulator(port, n_pumps=1, **STILL) as again:
                    assert await source.wait_connected(10)
                    await wait_for_condition(lambda: is_good(latest.status).all())
                    assert source.stats.connects == 2 and source.stats.last_error is None
                    await again.server.write_attribute_value(ua.NodeId.from_string(nodes[3]), _double(-7.5))
                    await wait_for_condition(lambda: latest.value[3] == -7.5)

    asyncio.run(main())


def test_poll_and_subscribe_sources_fill_one_table() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as a, running_simulator(n_pumps=1, **STILL) as b:
            latest = LatestValues(2)
            polled = OpcUaPollSource(source_config(a.endpoint, name="polled"), [SourceTag(0, a.tags[0])], latest)
            cfg = source_config(b.endpoint, name="subscribed", mode="subscribe", publishing_interval_ms=50)
            subscribed = OpcUaSubscriptionSource(cfg, [SourceTag(1, b.tags[0])], latest)
            tasks = [asyncio.create_task(s.run()) for s in (polled, subscribed)]
            try:
                assert await polled.wait_connected(10) and await subscribed.wait_connected(10)
                await a.server.write_attribute_value(ua.NodeId.from_string(a.tags[0]), _double(1.5))
                await b.server.write_attribute_value(ua.NodeId.from_string(b.tags[0]), _double(2.5))
                await wait_for_condition(lambda: latest.value.tolist() == [1.5, 2.5])
                assert (latest.status == GOOD).all()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            assert (latest.status == BAD_NOT_CONNECTED).all()

    asyncio.run(main())


def test_subscription_keys_need_subscribe_mode() -> None:
    with pytest.raises(ValidationError, match="deadband: only with mode: subscribe"):
        SourceConfig(name="plc", endpoint="opc.tcp://h:4840", deadband={"type": "absolute", "value": 1})
    with pytest.raises(ValidationError, match="within 0..100"):
        SourceConfig(name="plc", endpoint="opc.tcp://h:4840", mode="subscribe", deadband={"type": "percent", "value": 150})
    cfg = SourceConfig(name="plc", endpoint="opc.tcp://h:4840", mode="subscribe", publishing_interval_ms=250)
    assert cfg.sampling_ms == 250 and cfg.queue_size == 10 and cfg.deadband is None


@contextlib.asynccontextmanager
async def started(
    endpoint: str, node_ids: Sequence[str], **attributes: Any
) -> AsyncIterator[OpcUaSubscriptionSource]:
    """A subscribing source with class attributes overridden (publish_depth, own_publish_loop), in a task."""
    cfg = source_config(endpoint, mode="subscribe", publishing_interval_ms=50)
    tags = [SourceTag(i, n) for i, n in enumerate(node_ids)]
    source = OpcUaSubscriptionSource(cfg, tags, LatestValues(len(node_ids)))
    for name, value in attributes.items():
        setattr(source, name, value)
    async with running(source):
        yield source


def _asyncua_publish_loops() -> list[asyncio.Task[Any]]:
    tasks = asyncio.all_tasks()
    return [t for t in tasks if t.get_coro().__qualname__ == "UaSession._publish_loop"]  # type: ignore[union-attr]


def test_own_publish_loop_acknowledges_every_message_and_decodes_with_numpy() -> None:
    async def main() -> None:
        moving = {**STILL, "rate_hz": 20.0}
        async with running_simulator(n_pumps=1, **moving) as sim:
            subscriptions = sim.server.iserver.subscription_service.subscriptions
            async with running_subscription(sim.endpoint, sim.tags) as source:
                assert await source.wait_connected(10)
                stats = source.stats
                await wait_for_condition(lambda: stats.notifications >= 30)
                (subscription,) = subscriptions.values()
                # Unacknowledged, the server would keep every one of those messages for retransmission.
                assert len(subscription._not_acknowledged_results) <= source.publish_depth
                assert stats.unacknowledged <= source.publish_depth
                assert stats.fast_decodes >= 29 and stats.slow_decodes <= 1 and stats.session_errors == 0
                assert not _asyncua_publish_loops()

    asyncio.run(main())


def test_newest_of_several_queued_values_is_stored() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            nodes = sim.tags[:1]
            latest = RecordingLatest(1)
            async with running_subscription(sim.endpoint, nodes, latest, queue_size=10) as source:
                assert await source.wait_connected(10)
                (subscription,) = sim.server.iserver.subscription_service.subscriptions.values()
                # Held back by the server, the three changes leave in one publish response, oldest first.
                await subscription.set_publishing_mode(False)
                for x in (1.0, 2.0, 3.0):
                    await sim.server.write_attribute_value(ua.NodeId.from_string(nodes[0]), _double(x))
                await subscription.set_publishing_mode(True)
                await wait_for_condition(lambda: latest.value[0] == 3.0)
                assert 1.0 not in latest.seen(0) and 2.0 not in latest.seen(0)

    asyncio.run(main())


def test_a_status_change_notification_ends_the_session() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            before = asyncio.all_tasks()
            # A long backoff keeps the session's end in view.
            backoff = {"reconnect_min_s": 60, "reconnect_max_s": 60}
            async with running_subscription(sim.endpoint, sim.tags, **backoff) as source:
                assert await source.wait_connected(10)
                latest = source.latest
                (subscription,) = sim.server.iserver.subscription_service.subscriptions.values()
                expired = ua.StatusCode(ua.StatusCodes.BadTimeout)
                await subscription.monitored_item_srv.trigger_statuschange(expired)
                await wait_for_condition(lambda: source.stats.last_error is not None)
                assert source.stats.last_error == "subscription ended: BadTimeout"
                assert (latest.status == BAD_COMMUNICATION_ERROR).all() and source.stats.session_errors == 1
            leaked = {t for t in asyncio.all_tasks() - before if not t.done()}
            # Only the server's own connection tasks may remain until it closes the connection.
            assert not [t for t in leaked if "gateway" in repr(t.get_coro())], leaked

    asyncio.run(main())


def test_too_many_publish_requests_lowers_the_depth_once_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> int:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            # asyncua's server keeps at most subscriptions + 10 publish requests of a session.
            async with started(sim.endpoint, sim.tags, publish_depth=14) as source:
                assert await source.wait_connected(10)
                publisher = source._publisher
                assert publisher is not None
                await wait_for_condition(lambda: publisher.depth <= 11)
                speed = sim.node_id(1, "speed")
                await write_uncertain_and_await(sim, source.latest, speed, sim.tags.index(speed))
                assert source.stats.session_errors == 0 and source.stats.connects == 1
                return publisher.depth

    assert asyncio.run(main()) == 11
    lowered = [r for r in caplog.records if "one too many" in r.getMessage() and r.levelname == "WARNING"]
    assert len(lowered) == 1


def test_asyncua_s_publish_loop_is_the_fallback() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            async with started(sim.endpoint, sim.tags, own_publish_loop=False) as source:
                assert await source.wait_connected(10)
                await wait_for_condition(lambda: is_good(source.latest.status).all())
                assert len(_asyncua_publish_loops()) == 1
                speed = sim.node_id(1, "speed")
                await write_uncertain_and_await(sim, source.latest, speed, sim.tags.index(speed))
                assert source.stats.slow_decodes >= 2 and source.stats.fast_decodes == 0

    asyncio.run(main())
