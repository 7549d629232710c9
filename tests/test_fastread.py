"""Fast Reads of the simulated PLC: the bytes and values asyncua's own Read path gives, and the fallbacks."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
from asyncua import Client, ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import nodeid_from_binary, nodeid_to_binary, struct_from_binary, struct_to_binary

from gateway.demo import fastread
from gateway.demo.fastread import encode_results
from gateway.demo.signals import TAGS
from gateway.demo.simulator import PlcSimulator
from gateway.latest import LatestValues
from gateway.sources.uabinary import EncodedRead, ReadDecoder
from tests.conftest import wait_for_condition
from tests.fixtures_opcua import (
    STILL,
    fast_simulator,
    running_simulator,
    running_source,
    unix_ns,
    write_uncertain_and_await,
)

BAD = ua.StatusCodes.BadSensorFailure
UNCERTAIN = ua.StatusCodes.UncertainLastUsableValue
# Both windows on from the first tick; at 0.01 Hz the values written in start() stay for the test.
WINDOWS = {
    **STILL,
    "bad_tag": (1, "pressure"),
    "bad_between_s": (0.0, 1e9),
    "nan_tag": (2, "flow"),
    "nan_between_s": (0.0, 1e9),
}
BAD_ROW, NAN_ROW = 3, 8 + 6  # pump01.pressure, pump02.flow
SERVER_STATE = ua.NodeId(ua.ObjectIds.Server_ServerStatus_State)


def counted_client(endpoint: str) -> Client:
    """A client that sends no server-state probes, so the simulator's Read counters count only the test's."""
    return Client(endpoint, watchdog_intervall=3600)


def read_params(
    node_ids: list[ua.NodeId], timestamps: ua.TimestampsToReturn = ua.TimestampsToReturn.Both
) -> ua.ReadParameters:
    """Read the Value attribute of each node."""
    params = ua.ReadParameters(TimestampsToReturn=timestamps)
    params.NodesToRead = [ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.Value) for n in node_ids]
    return params


def node_ids(sim: PlcSimulator) -> list[ua.NodeId]:
    """Every variable of the simulator, in row order."""
    return [ua.NodeId.from_string(n) for n in sim.tags]


def after_header(body: Any) -> bytes:
    """A response body from its Results array on (the header holds a send time and a request handle)."""
    buf = Buffer(bytes(body))
    nodeid_from_binary(buf)
    struct_from_binary(ua.ResponseHeader, buf)
    return bytes(buf)


def without_timestamps(dv: ua.DataValue) -> bytes:
    """A DataValue's encoding with its timestamps left out, to compare two servers' values and codes."""
    return struct_to_binary(dataclasses.replace(dv, SourceTimestamp=None, ServerTimestamp=None))


def simulator_datavalue(x: float, code: int, stamp: datetime) -> ua.DataValue:
    """What the plain simulator stores for a value and status code."""
    variant = (
        ua.Variant(None, ua.VariantType.Null) if code & 0x80000000 else ua.Variant(x, ua.VariantType.Double)
    )
    return ua.DataValue(variant, ua.StatusCode(ua.UInt32(code)), stamp, stamp)


@pytest.mark.parametrize(
    ("values", "codes"),
    [
        (
            [1.5, -0.0, math.nan, math.inf, -math.inf, 1.7976931348623157e308, 42.0],
            [0, 0, 0, 0, UNCERTAIN, 0, BAD],
        ),
        ([], []),
        ([3.0, 4.0], [BAD, BAD]),
    ],
)
def test_encoded_results_are_asyncuas_bytes(values: list[float], codes: list[int]) -> None:
    stamp = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    header = ua.ResponseHeader(Timestamp=stamp, RequestHandle=7)
    dvs = [simulator_datavalue(x, c, stamp) for x, c in zip(values, codes, strict=True)]
    expected = struct_to_binary(ua.ReadResponse(ResponseHeader=header, Results=dvs))
    results = encode_results(
        np.array(values), np.array(codes, dtype=np.uint32), ua.datetime_to_win_epoch(stamp)
    )
    prefix = nodeid_to_binary(ua.ReadResponse().TypeId) + struct_to_binary(header)
    assert prefix + results + b"\0\0\0\0" == expected


def test_fast_read_sends_the_bytes_asyncua_sends() -> None:
    async def main() -> None:
        async with fast_simulator(n_pumps=2, **WINDOWS) as (sim, variables):
            nodes = node_ids(sim)
            async with counted_client(sim.endpoint) as client:
                fast = await EncodedRead(read_params(nodes)).send(client.uaclient)
                assert (variables.fast_reads, variables.plain_reads) == (1, 0)
                # asyncua returns both timestamps whatever was asked; the fast path leaves "Server" to it.
                server_ts = read_params(nodes, ua.TimestampsToReturn.Server)
                plain = await EncodedRead(server_ts).send(client.uaclient)
                assert (variables.fast_reads, variables.plain_reads) == (1, 1)
                decoded = await client.uaclient.read(read_params(nodes))
                assert variables.fast_reads == 2
            assert after_header(fast) == after_header(plain)
            assert [struct_to_binary(dv) for dv in decoded] == [
                struct_to_binary(sim.data_value(p, tag)) for p in (1, 2) for tag in TAGS
            ]
            decoder = ReadDecoder(len(nodes))
            assert decoder.decode(fast)
            good = np.ones(len(nodes), dtype=bool)
            good[BAD_ROW] = False
            assert decoder.status[BAD_ROW] == BAD and math.isnan(decoder.value[BAD_ROW])
            assert (decoder.status[good] == 0).all()
            assert math.isnan(decoder.value[NAN_ROW])
            np.testing.assert_array_equal(decoder.value[good], variables.value[good])
            assert variables.timestamp is not None
            assert (decoder.source_ts == unix_ns(variables.timestamp)).all()

    asyncio.run(main())


def test_fast_and_plain_simulators_serve_the_same_datavalues() -> None:
    async def main() -> None:
        async with (
            running_simulator(n_pumps=2, **WINDOWS) as plain_sim,
            fast_simulator(n_pumps=2, **WINDOWS) as (fast_sim, fast_variables),
        ):
            results = []
            for sim in (plain_sim, fast_sim):
                async with Client(sim.endpoint) as client:
                    results.append(await client.uaclient.read(read_params(node_ids(sim))))
            assert fast_variables.fast_reads == 1
        plain, fast = results
        assert [without_timestamps(dv) for dv in fast] == [without_timestamps(dv) for dv in plain]
        assert (
            fast[BAD_ROW].StatusCode.value == BAD and fast[BAD_ROW].Value.VariantType == ua.VariantType.Null
        )
        assert math.isnan(fast[NAN_ROW].Value.Value) and fast[NAN_ROW].StatusCode.is_good()
        for dvs in (plain, fast):
            assert len({dv.SourceTimestamp for dv in dvs}) == 1
            assert all(dv.ServerTimestamp == dv.SourceTimestamp for dv in dvs)

    asyncio.run(main())


def test_repeated_parameters_are_planned_once_and_other_requests_fall_back() -> None:
    async def main() -> None:
        async with fast_simulator(n_pumps=2, **WINDOWS) as (sim, variables):
            nodes = node_ids(sim)
            async with counted_client(sim.endpoint) as client:
                first = await client.uaclient.read(read_params(nodes))
                again = await client.uaclient.read(read_params(nodes))
                assert (variables.fast_reads, variables.plans) == (2, 1)
                mixed = await client.uaclient.read(read_params([*nodes, SERVER_STATE]))
                assert (variables.fast_reads, variables.plain_reads, variables.plans) == (2, 1, 2)
                data_type = await client.get_node(nodes[0]).read_data_type()
                state = await client.get_node(SERVER_STATE).read_value()
        assert [struct_to_binary(dv) for dv in again] == [struct_to_binary(dv) for dv in first]
        assert [struct_to_binary(dv) for dv in mixed[:-1]] == [struct_to_binary(dv) for dv in first]
        assert mixed[-1].Value.Value == state == ua.ServerState.Running
        assert data_type == ua.NodeId(ua.ObjectIds.Double)

    asyncio.run(main())


def test_gateway_poll_and_subscriptions_follow_a_running_fast_simulator() -> None:
    class Handler:
        def __init__(self) -> None:
            self.stamps: set[datetime] = set()

        def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
            self.stamps.add(data.monitored_item.Value.SourceTimestamp)

    async def main() -> None:
        quiet = {"fault_pump": None, "bad_tag": None, "nan_tag": None}
        async with fast_simulator(n_pumps=2, rate_hz=20, **quiet) as (sim, variables):
            handler = Handler()
            async with Client(sim.endpoint) as client:
                sub = await client.create_subscription(50, handler)
                await sub.subscribe_data_change(client.get_node(sim.tags[5]))
                async with running_source(sim.endpoint, sim.tags) as source:
                    await wait_for_condition(lambda: variables.fast_reads >= 3 and len(handler.stamps) >= 3)
                    latest = source.latest
                    assert (latest.status == 0).all() and np.isfinite(latest.value).all()
                await sub.delete()

    asyncio.run(main())


def test_a_write_from_outside_is_served_until_the_next_update() -> None:
    async def main() -> None:
        async with fast_simulator(n_pumps=1, **STILL) as (sim, variables):
            latest = LatestValues(len(sim.tags))
            async with running_source(sim.endpoint, sim.tags, latest):
                await wait_for_condition(lambda: variables.fast_reads > 0)
                await write_uncertain_and_await(sim, latest, sim.tags[2], 2)
                assert variables.plain_reads > 0
                await variables.update(variables.value, variables.status, datetime.now(timezone.utc))
                await wait_for_condition(lambda: latest.status[2] == 0)
                assert latest.value[2] == variables.value[2]

    asyncio.run(main())


def test_without_the_read_hook_reads_go_through_asyncua(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fastread, "READ_HOOK", False)

    async def main() -> None:
        async with fast_simulator(n_pumps=2, **WINDOWS) as (sim, variables):
            async with Client(sim.endpoint) as client:
                results = await client.uaclient.read(read_params(node_ids(sim)))
            assert (variables.fast_reads, variables.plain_reads) == (0, 0)
            assert results[BAD_ROW].StatusCode.value == BAD
            assert [struct_to_binary(dv) for dv in results] == [
                struct_to_binary(sim.data_value(p, tag)) for p in (1, 2) for tag in TAGS
            ]

    with caplog.at_level(logging.WARNING, logger="gateway.demo.fastread"):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.demo.fastread"] == [
        f"asyncua {fastread.asyncua.__version__} lacks the internals fast Reads use; Reads go through asyncua"
    ]
