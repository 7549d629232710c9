"""Fast subscriptions of the simulated PLC: asyncua's notifications, bytes and protocol, and the fallbacks."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
from asyncua import Client, ua
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary

from gateway.demo import fastpublish
from gateway.demo.fastpublish import encode_datavalues
from gateway.demo.signals import TAGS
from gateway.demo.simulator import PlcSimulator
from gateway.latest import LatestValues
from tests.conftest import wait_for_condition
from tests.fixtures_opcua import STILL, fast_simulator, running_simulator, running_source, unix_ns

BAD = ua.StatusCodes.BadSensorFailure
UNCERTAIN = ua.StatusCodes.UncertainLastUsableValue
PRESSURE, FLOW = TAGS.index("pressure"), TAGS.index("flow")
# One pump; values change only when a test writes them, in the Bad window at t=6 and the NaN one at t=12.
WINDOWS = {
    **STILL,
    "bad_tag": (1, "pressure"),
    "bad_between_s": (5.0, 10.0),
    "nan_tag": (1, "flow"),
    "nan_between_s": (10.0, 20.0),
}


def values(base: float) -> np.ndarray:
    """One pump's tick: tag i gets base + i."""
    return (base + np.arange(len(TAGS), dtype=float)).reshape(1, -1)


class Recorder:
    """An asyncua subscription handler keeping every notification's node and DataValue in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, ua.DataValue]] = []

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.seen.append((node.nodeid.to_string(), data.monitored_item.Value))


class RawSubscription:
    """One subscription over asyncua's UaClient whose Publish and Republish requests the test sends itself."""

    def __init__(self, client: Client) -> None:
        self.uaclient = client.uaclient
        self.id = 0

    async def _send(self, request: Any, response: type) -> Any:
        return struct_from_binary(response, await self.uaclient.protocol.send_request(request))

    async def create(self, *, keepalive: int = 3, enabled: bool = True) -> None:
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=20,
            RequestedLifetimeCount=1000,
            RequestedMaxKeepAliveCount=keepalive,
            PublishingEnabled=enabled,
        )
        response = await self._send(
            ua.CreateSubscriptionRequest(Parameters=params), ua.CreateSubscriptionResponse
        )
        self.id = response.Parameters.SubscriptionId

    async def add(
        self,
        node_ids: Sequence[str],
        *,
        flt: ua.DataChangeFilter | None = None,
        queue_size: int = 1,
        mode: ua.MonitoringMode = ua.MonitoringMode.Reporting,
        first_handle: int = 0,
    ) -> None:
        items = [
            ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(
                    NodeId=ua.NodeId.from_string(n), AttributeId=ua.AttributeIds.Value
                ),
                MonitoringMode=mode,
                RequestedParameters=ua.MonitoringParameters(
                    ClientHandle=first_handle + i, Filter=flt, QueueSize=queue_size, DiscardOldest=True
                ),
            )
            for i, n in enumerate(node_ids)
        ]
        results = await self.uaclient.create_monitored_items(
            ua.CreateMonitoredItemsParameters(SubscriptionId=self.id, ItemsToCreate=items)
        )
        assert all(r.StatusCode.is_good() for r in results)

    async def publish(self, *acks: int) -> ua.PublishResult:
        params = ua.PublishParameters([ua.SubscriptionAcknowledgement(self.id, n) for n in acks])
        response = await self._send(ua.PublishRequest(Parameters=params), ua.PublishResponse)
        return response.Parameters

    async def republish(self, sequence_number: int) -> ua.NotificationMessage:
        params = ua.RepublishParameters(self.id, sequence_number)
        response = await self._send(ua.RepublishRequest(Parameters=params), ua.RepublishResponse)
        return response.NotificationMessage

    async def set_publishing(self, enabled: bool) -> None:
        params = ua.SetPublishingModeParameters(enabled, [self.id])
        await self._send(ua.SetPublishingModeRequest(Parameters=params), ua.SetPublishingModeResponse)


def items(result: ua.PublishResult) -> list[tuple[int, bytes]]:
    """(ClientHandle, encoded DataValue) of every data change in a publish result, in order."""
    return [
        (item.ClientHandle, struct_to_binary(item.Value))
        for notification in result.NotificationMessage.NotificationData
        if isinstance(notification, ua.DataChangeNotification)
        for item in notification.MonitoredItems
    ]


def expected(
    sim: PlcSimulator, handles: Sequence[int], rows: Sequence[int] | None = None
) -> list[tuple[int, bytes]]:
    """What a publish carries for these handles now: the DataValue a Read of each row (default: handle) gets."""
    rows = handles if rows is None else rows
    return [(h, struct_to_binary(sim.data_value(1, TAGS[r]))) for h, r in zip(handles, rows, strict=True)]


@pytest.mark.parametrize(
    ("vals", "codes"),
    [([1.5, -0.0, math.nan, math.inf, 1.7976931348623157e308, 42.0], [0, 0, 0, UNCERTAIN, 0, BAD]), ([], [])],
)
def test_encoded_notifications_are_asyncuas_bytes(vals: list[float], codes: list[int]) -> None:
    stamp = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    handles = np.arange(7, 7 + len(vals), dtype=np.uint32)
    notifications = [
        ua.MonitoredItemNotification(
            int(h),
            ua.DataValue(
                ua.Variant(None, ua.VariantType.Null)
                if c & 0x80000000
                else ua.Variant(x, ua.VariantType.Double),
                ua.StatusCode(ua.UInt32(c)),
                stamp,
                stamp,
            ),
        )
        for h, x, c in zip(handles, vals, codes, strict=True)
    ]
    encoded = encode_datavalues(
        np.array(vals), np.array(codes, dtype=np.uint32), ua.datetime_to_win_epoch(stamp), handles
    )
    assert encoded == b"".join(struct_to_binary(n) for n in notifications)


async def drive_steps(fast_read: bool) -> list[list[tuple[str, int, str]]]:
    """Steps of values and windows seen by an asyncua handler and the gateway's subscription source;
    returns, per step, what the handler got (node, status, value) after checking its bytes."""
    # (values, schedule time, rows whose value or status changes): NaN is never equal to itself.
    steps = [
        (values(10.0), 0.0, range(8)),
        (values(10.0) + np.eye(1, 8, 2), 0.0, [2]),
        (values(10.0) + np.eye(1, 8, 2), 6.0, [PRESSURE]),
        (values(10.0) + np.eye(1, 8, 2), 12.0, [PRESSURE, FLOW]),
        (values(10.0) + np.eye(1, 8, 2), 13.0, [FLOW]),
        (values(20.0), 30.0, range(8)),
    ]
    async with running_simulator(n_pumps=1, fast_read=fast_read, **WINDOWS) as sim:
        handler = Recorder()
        latest = LatestValues(len(TAGS))
        async with (
            Client(sim.endpoint) as client,
            running_source(
                sim.endpoint, sim.tags, latest, mode="subscribe", publishing_interval_ms=20
            ) as source,
        ):
            sub = await client.create_subscription(20, handler)
            await sub.subscribe_data_change([client.get_node(t) for t in sim.tags], queuesize=1)
            assert await source.wait_connected(10)
            await wait_for_condition(lambda: len(handler.seen) == len(TAGS))
            per_step = []
            for tick, t, changed in steps:
                before = len(handler.seen)
                await sim.write_values(tick.copy(), t)
                want = [(sim.tags[r], struct_to_binary(sim.data_value(1, TAGS[r]))) for r in changed]
                total = before + len(want)
                await wait_for_condition(lambda n=total: len(handler.seen) >= n)
                stamp = unix_ns(sim.data_value(1, TAGS[0]).SourceTimestamp)
                await wait_for_condition(lambda c=changed, s=stamp: (latest.source_ts[list(c)] == s).all())
                got = handler.seen[before:]
                assert sorted((n, struct_to_binary(dv)) for n, dv in got) == sorted(want)
                for r in changed:
                    dv = sim.data_value(1, TAGS[r])
                    assert latest.status[r] == dv.StatusCode.value
                    x = latest.value[r]
                    assert (
                        math.isnan(x)
                        if dv.Value.Value is None or math.isnan(dv.Value.Value)
                        else x == dv.Value.Value
                    )
                per_step.append(sorted((n, dv.StatusCode.value, repr(dv.Value.Value)) for n, dv in got))
            await sub.delete()
        if fast_read:
            assert sim.variables is not None and sim.variables.notifier.blocks >= len(steps)
    return per_step


def test_fast_and_plain_simulators_notify_the_same() -> None:
    async def main() -> None:
        fast, plain = await drive_steps(True), await drive_steps(False)
        assert fast == plain
        assert fast[2] == [("ns=2;s=pump01.pressure", BAD, "None")]
        assert fast[4] == [("ns=2;s=pump01.flow", 0, "nan")]

    asyncio.run(main())


def test_publish_sequence_numbers_acknowledgements_republish_and_keepalives() -> None:
    async def main() -> None:
        async with fast_simulator(n_pumps=1, **STILL) as (sim, variables):
            notifier = variables.notifier
            async with Client(sim.endpoint) as client:
                raw = RawSubscription(client)
                await raw.create(keepalive=3)
                await raw.add(sim.tags)
                first = await raw.publish()
                assert first.NotificationMessage.SequenceNumber == 1 and items(first) == expected(
                    sim, range(8)
                )
                await sim.write_values(values(5.0), 1.0)
                second = await raw.publish()
                assert notifier.fast_items == 8 and notifier.blocks == 1
                assert second.NotificationMessage.SequenceNumber == 2
                assert second.AvailableSequenceNumbers == [1, 2]
                assert items(second) == expected(sim, range(8))
                again = await raw.republish(2)
                assert struct_to_binary(again) == struct_to_binary(second.NotificationMessage)
                # Nothing changes: keepalives, which take no sequence number, after the acknowledgements.
                keepalive = await raw.publish(1, 2)
                assert [r.is_good() for r in keepalive.Results] == [True, True]
                assert keepalive.NotificationMessage.NotificationData == []
                assert keepalive.NotificationMessage.SequenceNumber == 3
                assert keepalive.AvailableSequenceNumbers == []
                assert (await raw.publish()).NotificationMessage.SequenceNumber == 3
                await sim.write_values(values(6.0), 2.0)
                third = await raw.publish()
                assert third.NotificationMessage.SequenceNumber == 3 and items(third) == expected(
                    sim, range(8)
                )

    asyncio.run(main())


def test_filters_trigger_and_deadband_against_the_last_reported_value() -> None:
    async def main() -> None:
        status_value = ua.DataChangeTrigger.StatusValue
        deadband = ua.DataChangeFilter(status_value, int(ua.DeadbandType.Absolute), 0.5)
        on_status = ua.DataChangeFilter(ua.DataChangeTrigger.Status)
        on_timestamp = ua.DataChangeFilter(ua.DataChangeTrigger.StatusValueTimestamp)
        async with fast_simulator(n_pumps=1, **{**WINDOWS, "nan_tag": None}) as (sim, variables):
            notifier = variables.notifier
            async with Client(sim.endpoint) as client:
                raw = RawSubscription(client)
                await raw.create()
                # Handles 0-3 watch pressure (the Bad window's tag): deadband, none, Status, StatusValueTimestamp.
                node = [sim.tags[PRESSURE]]
                for handle, flt in enumerate([deadband, None, on_status, on_timestamp]):
                    await raw.add(node, flt=flt, first_handle=handle)
                assert len(items(await raw.publish())) == 4
                base = values(100.0)
                moves = [
                    (0.0, 0.0, [0, 1, 3]),
                    (0.3, 0.0, [1, 3]),
                    (0.6, 0.0, [0, 1, 3]),
                    (0.6, 0.0, [3]),
                    (0.7, 6.0, [0, 1, 2, 3]),
                ]
                for shift, t, handles in moves:
                    tick = base.copy()
                    tick[0, PRESSURE] += shift
                    await sim.write_values(tick, t)
                    assert items(await raw.publish()) == expected(sim, handles, [PRESSURE] * len(handles))
                assert notifier.fast_items == 4

    asyncio.run(main())


def test_each_item_keeps_its_newest_queue_size_values() -> None:
    async def main() -> None:
        async with fast_simulator(n_pumps=1, **STILL) as (sim, _):
            async with Client(sim.endpoint) as client:
                raw = RawSubscription(client)
                await raw.create()
                await raw.add(sim.tags[:1], queue_size=1)
                await raw.add(sim.tags[1:2], queue_size=2, first_handle=1)
                assert len(items(await raw.publish())) == 2
                await raw.set_publishing(False)
                queued = []
                for base in (1.0, 2.0, 3.0):
                    await sim.write_values(values(base), base)
                    queued.append(expected(sim, [0, 1]))
                await raw.set_publishing(True)
                result = await raw.publish()
        assert items(result) == [queued[1][1], queued[2][0], queued[2][1]]

    asyncio.run(main())


def test_deleted_subscriptions_and_closed_sessions_leave_nothing_behind() -> None:
    async def main() -> None:
        async with fast_simulator(n_pumps=1, **STILL) as (sim, variables):
            notifier = variables.notifier
            subscriptions = sim.server.iserver.subscription_service.subscriptions
            baseline = asyncio.all_tasks()
            keeper_seen = Recorder()

            async def step(base: float, *recorders: Recorder) -> None:
                counts = [len(r.seen) for r in recorders]
                await sim.write_values(values(base), base)
                for r, n in zip(recorders, counts, strict=True):
                    await wait_for_condition(lambda r=r, n=n: len(r.seen) >= n + len(TAGS))

            async with Client(sim.endpoint) as keeper:
                kept = await keeper.create_subscription(20, keeper_seen)
                await kept.subscribe_data_change([keeper.get_node(t) for t in sim.tags])
                async with Client(sim.endpoint) as other:
                    other_seen = Recorder()
                    sub = await other.create_subscription(20, other_seen)
                    await sub.subscribe_data_change([other.get_node(t) for t in sim.tags])
                    await step(1.0, keeper_seen, other_seen)
                    assert notifier.fast_items == 2 * len(TAGS) and len(subscriptions) == 2
                    await sub.delete()
                    got = len(other_seen.seen)
                    await step(2.0, keeper_seen)
                    assert notifier.fast_items == len(TAGS) and len(subscriptions) == 1
                    assert len(other_seen.seen) == got
                    # Left to the session's close, without DeleteSubscriptions.
                    await (await other.create_subscription(20, Recorder())).subscribe_data_change(
                        [other.get_node(t) for t in sim.tags]
                    )
                await step(3.0, keeper_seen)
                assert notifier.fast_items == len(TAGS) and len(subscriptions) == 1
                await kept.delete()
            await wait_for_condition(lambda: not [t for t in asyncio.all_tasks() - baseline if not t.done()])
            await sim.write_values(values(4.0), 4.0)
            assert notifier.fast_items == 0 and not subscriptions

    asyncio.run(main())


def test_items_asyncua_must_notify_get_its_callbacks() -> None:
    class Handler:
        def __init__(self) -> None:
            self.values: list[float] = []

        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            self.values.append(val)

    async def main() -> None:
        async with fast_simulator(n_pumps=1, **STILL) as (sim, variables):
            notifier = variables.notifier
            handler = Handler()
            # A server-side subscription (no PublishRequests) and a Sampling item stay asyncua's.
            internal = await sim.server.create_subscription(20, handler)
            await internal.subscribe_data_change(sim.server.get_node(sim.tags[0]))
            async with Client(sim.endpoint) as client:
                raw = RawSubscription(client)
                await raw.create()
                await raw.add(sim.tags[:1], mode=ua.MonitoringMode.Sampling)
                assert len(items(await raw.publish())) == 1
                await sim.write_values(values(7.0), 1.0)
                assert items(await raw.publish()) == expected(sim, [0])
            await wait_for_condition(lambda: handler.values[-1:] == [7.0])
            assert notifier.fast_items == 0 and notifier.blocks == 0
            await internal.delete()

    asyncio.run(main())


def test_without_the_publish_hook_notifications_go_through_asyncua(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fastpublish, "PUBLISH_HOOK", False)

    async def main() -> None:
        async with fast_simulator(n_pumps=1, **WINDOWS) as (sim, variables):
            async with Client(sim.endpoint) as client:
                raw = RawSubscription(client)
                await raw.create()
                await raw.add(sim.tags)
                assert len(items(await raw.publish())) == len(TAGS)
                await sim.write_values(values(3.0), 6.0)
                assert items(await raw.publish()) == expected(sim, range(8))
                assert sim.data_value(1, "pressure").StatusCode.value == BAD
            assert (variables.notifier.fast_items, variables.notifier.blocks) == (0, 0)

    with caplog.at_level(logging.WARNING, logger="gateway.demo.fastpublish"):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.demo.fastpublish"] == [
        f"asyncua {fastpublish.asyncua.__version__} lacks the internals fast subscriptions use; "
        "notifications go through asyncua"
    ]
