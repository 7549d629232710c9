"""OpcUaPollSource against a real asyncua server (the simulated PLC)."""

from __future__ import annotations

import asyncio
import contextlib
import math

import numpy as np
import pytest
from asyncua import Client, Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback

from gateway.demo.signals import TAGS
from gateway.errors import SourceError
from gateway.latest import (
    BAD_COMMUNICATION_ERROR,
    BAD_NOT_CONNECTED,
    BAD_TYPE_MISMATCH,
    GOOD,
    LatestValues,
    is_good,
)
from gateway.sources.opcua import OpcUaPollSource, SourceTag, read_max_nodes_per_read
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_opcua import (
    STILL,
    running_simulator,
    running_source,
    source_config,
    unix_ns,
    write_uncertain_and_await,
)


def test_values_statuses_and_timestamps_match_the_server() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=2, **STILL) as sim:
            nodes = sim.tags
            async with running_source(sim.endpoint, nodes) as source:
                assert await source.wait_connected(10)
                latest = source.latest
                for row, (pump, tag) in enumerate((p, t) for p in (1, 2) for t in TAGS):
                    dv = sim.data_value(pump, tag)
                    assert latest.value[row] == dv.Value.Value
                    assert latest.status[row] == GOOD
                    assert latest.source_ts[row] == unix_ns(dv.SourceTimestamp)
                assert (latest.recv_ns > 0).all()

                # A value, status and timestamp set now must show up as such.
                speed = sim.node_id(2, "speed")
                await write_uncertain_and_await(sim, latest, speed, nodes.index(speed))
                assert source.stats.values == source.stats.reads * len(nodes)
                assert source.stats.connects == 1 and source.stats.read_errors == 0

    asyncio.run(main())


def test_one_read_request_per_tick_whatever_the_tag_count() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=50, **STILL) as sim:
            requests: list[list[ua.NodeId]] = []

            def count(event: ServerItemCallback, _dispatcher: object) -> None:
                reads = event.request_params.NodesToRead
                # Value Reads only: the source also reads DataType and ValueRank once per connect.
                if event.is_external and reads[0].AttributeId == ua.AttributeIds.Value:
                    requests.append([r.NodeId for r in reads])

            sim.server.subscribe_server_callback(CallbackType.PreRead, count)
            few, many = sim.tags[:8], sim.tags[8:]
            assert len(many) == 392
            async with running_source(sim.endpoint, few) as small, running_source(sim.endpoint, many) as big:
                await wait_for_condition(lambda: small.stats.reads >= 5 and big.stats.reads >= 5)
            stats = {"small": small.stats, "big": big.stats}

        by_size: dict[int, int] = {}
        for nodes in requests:
            ours = [n for n in nodes if n.NamespaceIndex == 2]
            if ours:
                # Every request that touches the plant's nodes carries all of one source's tags.
                assert len(ours) == len(nodes)
                by_size[len(nodes)] = by_size.get(len(nodes), 0) + 1
        assert set(by_size) == {8, 392}
        # The last Read may have reached the server just before the source was cancelled.
        assert stats["small"].reads <= by_size[8] <= stats["small"].reads + 1
        assert stats["big"].reads <= by_size[392] <= stats["big"].reads + 1

    asyncio.run(main())


def test_bad_status_and_nan_are_stored_as_such() -> None:
    async def main() -> None:
        options = {**STILL, "bad_tag": (1, "pressure"), "nan_tag": (2, "flow")}
        options.update(bad_between_s=(0.0, 1e6), nan_between_s=(0.0, 1e6))
        async with running_simulator(n_pumps=2, **options) as sim:
            nodes = [sim.node_id(1, "pressure"), sim.node_id(2, "flow"), sim.node_id(1, "flow")]
            async with running_source(sim.endpoint, nodes) as source:
                assert await source.wait_connected(10)
                latest = source.latest
                assert latest.status[0] == ua.StatusCodes.BadSensorFailure
                assert math.isnan(latest.value[0])
                assert latest.status[1] == GOOD and math.isnan(latest.value[1])
                assert latest.status[2] == GOOD and math.isfinite(latest.value[2])

    asyncio.run(main())


def test_non_numeric_and_unknown_nodes() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            objects = sim.server.nodes.objects
            await objects.add_variable(ua.NodeId("text", 2), "text", "hello")
            await objects.add_variable(ua.NodeId("flag", 2), "flag", True)
            await objects.add_variable(ua.NodeId("count", 2), "count", 7, varianttype=ua.VariantType.Int32)
            nodes = ["ns=2;s=text", "ns=2;s=flag", "ns=2;s=count", "ns=2;s=missing", sim.node_id(1, "speed")]
            async with running_source(sim.endpoint, nodes) as source:
                assert await source.wait_connected(10)
                latest = source.latest
                assert math.isnan(latest.value[0]) and latest.status[0] == BAD_TYPE_MISMATCH
                assert latest.value[1] == 1.0 and latest.status[1] == GOOD
                assert latest.value[2] == 7.0 and latest.status[2] == GOOD
                assert math.isnan(latest.value[3]) and latest.status[3] == ua.StatusCodes.BadNodeIdUnknown
                assert latest.status[4] == GOOD

    asyncio.run(main())


def test_server_restart_marks_tags_bad_then_recovers() -> None:
    async def main() -> None:
        port = free_port()
        async with running_simulator(port, n_pumps=1, **{**STILL, "rate_hz": 20}) as sim:
            nodes = sim.tags
            async with running_source(sim.endpoint, nodes) as source:
                assert await source.wait_connected(10)
                latest = source.latest
                assert is_good(latest.status).all()
                await sim.stop()
                await wait_for_condition(lambda: not is_good(latest.status).any())
                assert set(latest.status.tolist()) <= {BAD_COMMUNICATION_ERROR, BAD_NOT_CONNECTED}
                assert not source.stats.connected and source.stats.last_error
                assert source.stats.read_errors == 1

                async with running_simulator(port, n_pumps=1, **{**STILL, "rate_hz": 20}):
                    assert await source.wait_connected(10)
                    reads = source.stats.reads
                    await wait_for_condition(lambda: source.stats.reads > reads)
                    assert is_good(latest.status).all()
                    assert source.stats.connects == 2 and source.stats.last_error is None

    asyncio.run(main())


def test_connection_refused_at_start_does_not_crash() -> None:
    async def main() -> None:
        endpoint = f"opc.tcp://127.0.0.1:{free_port()}/"
        async with running_source(endpoint, ["ns=2;s=pump01.speed", "ns=2;s=pump01.flow"]) as source:
            await wait_for_condition(lambda: source.stats.connect_errors >= 2)
            assert "refused" in (source.stats.last_error or "").lower()
            assert not source.stats.connected
            assert (source.latest.status == BAD_NOT_CONNECTED).all()
            assert not await source.wait_connected(0.05)

    asyncio.run(main())


def test_silent_server_times_out_instead_of_hanging() -> None:
    async def main() -> None:
        async def accept_and_say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                await reader.read()
            writer.close()

        server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            async with running_source(f"opc.tcp://127.0.0.1:{port}/", ["ns=2;s=x"], timeout_s=0.2) as source:
                await wait_for_condition(lambda: source.stats.connect_errors >= 2)
                assert source.stats.last_error == "no answer within 0.2 s"
                assert source.latest.status[0] == BAD_NOT_CONNECTED

    asyncio.run(main())


def test_cancel_closes_the_session_and_marks_tags_bad() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            latest = LatestValues(1)
            source = OpcUaPollSource(
                source_config(sim.endpoint), [SourceTag(0, sim.node_id(1, "speed"))], latest
            )
            task = asyncio.create_task(source.run())
            assert await source.wait_connected(10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert latest.status[0] == BAD_NOT_CONNECTED
            assert not source.stats.connected
            # The client hung up: the server holds no connection any more.
            await wait_for_condition(lambda: not sim.server.iserver.asyncio_transports)

    asyncio.run(main())


@pytest.mark.parametrize("node_id", ["ns=2;x=bad", "ns=two;s=x", "garbage"])
def test_invalid_node_id_is_rejected_at_construction(node_id: str) -> None:
    tags = [SourceTag(0, "ns=2;s=pump01.speed"), SourceTag(1, node_id)]
    with pytest.raises(SourceError, match=r"invalid node id .*tag #1"):
        OpcUaPollSource(source_config("opc.tcp://127.0.0.1:4840/"), tags, LatestValues(2))


def test_tag_index_outside_the_table_is_rejected() -> None:
    with pytest.raises(SourceError, match="outside the table"):
        OpcUaPollSource(source_config("opc.tcp://127.0.0.1:4840/"), [SourceTag(5, "i=2258")], LatestValues(2))


# Chunking to the server's MaxNodesPerRead operation limit and the config's cap.
MAX_NODES_PER_READ = ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)


async def set_max_nodes_per_read(server: Server, limit: int) -> None:
    """Set the limit the server advertises; asyncua stores it as UInt32 (10000 by default)."""
    await server.write_attribute_value(
        MAX_NODES_PER_READ, ua.DataValue(ua.Variant(limit, ua.VariantType.UInt32))
    )


class ReadLog:
    """The server's own record of the client Reads of namespace-2 tags; optionally refuses long ones."""

    def __init__(self, server: Server, *, refuse_over: int | None = None) -> None:
        self.requests: list[list[ua.NodeId]] = []
        self.refused: list[int] = []
        self.refuse_over = refuse_over
        server.subscribe_server_callback(CallbackType.PreRead, self._on_read)

    def _on_read(self, event: ServerItemCallback, _dispatcher: object) -> None:
        reads = event.request_params.NodesToRead
        nodes = [r.NodeId for r in reads]
        # Value Reads only: the source also reads DataType and ValueRank once per connect.
        if not event.is_external or nodes[0].NamespaceIndex != 2 or reads[0].AttributeId != ua.AttributeIds.Value:
            return
        if self.refuse_over is not None and len(nodes) > self.refuse_over:
            # What a strict server answers (asyncua's does not check): a ServiceFault for the whole Read.
            self.refused.append(len(nodes))
            raise ua.uaerrors.BadTooManyOperations()
        self.requests.append(nodes)


@pytest.mark.parametrize(
    ("server_limit", "cap", "sizes"),
    [
        (100, None, [100, 100, 50]),
        (0, None, [250]),
        (100, 50, [50] * 5),
        (10_000, 120, [120, 120, 10]),
    ],
)
def test_reads_are_chunked_to_the_smaller_of_server_limit_and_config(
    server_limit: int, cap: int | None, sizes: list[int]
) -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=32, **STILL) as sim:
            await set_max_nodes_per_read(sim.server, server_limit)
            log = ReadLog(sim.server, refuse_over=server_limit or None)
            nodes = sim.tags[:250]
            async with running_source(sim.endpoint, nodes, max_nodes_per_read=cap) as source:
                await wait_for_condition(lambda: source.stats.reads >= 5)
                latest = source.latest
                for row in range(len(nodes)):
                    dv = sim.data_value(row // len(TAGS) + 1, TAGS[row % len(TAGS)])
                    assert latest.value[row] == dv.Value.Value
                    assert latest.source_ts[row] == unix_ns(dv.SourceTimestamp)
                assert (latest.status == GOOD).all()
            stats = source.stats

        per_tick = len(sizes)
        assert stats.chunk_size == sizes[0] and stats.read_errors == 0 and not log.refused
        # Decoded responses count only completed ticks; sent requests may include a cancelled one.
        assert stats.fast_decodes == per_tick * stats.reads
        assert (
            per_tick * stats.reads <= len(log.requests) <= stats.read_requests <= per_tick * (stats.reads + 1)
        )
        # On the server: each tick's requests arrive together and hold every tag once, in order.
        expected = [ua.NodeId.from_string(n) for n in nodes]
        complete = len(log.requests) - len(log.requests) % per_tick
        for k in range(0, complete, per_tick):
            tick = log.requests[k : k + per_tick]
            assert [len(r) for r in tick] == sizes
            assert [n for r in tick for n in r] == expected

    asyncio.run(main())


def test_one_refused_chunk_fails_the_tick_until_the_config_caps_the_chunks() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=32, **STILL) as sim:
            # A server that advertises 100 but refuses more than 60 nodes per Read.
            await set_max_nodes_per_read(sim.server, 100)
            log = ReadLog(sim.server, refuse_over=60)
            nodes = sim.tags[:250]
            async with running_source(sim.endpoint, nodes) as source:
                await wait_for_condition(lambda: source.stats.read_errors >= 2)
                assert "BadTooManyOperations" in (source.stats.last_error or "")
                assert source.stats.reads == 0 and not source.stats.connected
                # The 50-node chunk was answered, yet nothing of the failed ticks was stored.
                assert any(len(r) == 50 for r in log.requests) and 100 in log.refused
                assert np.isnan(source.latest.value).all()
                assert not is_good(source.latest.status).any()

            log.requests.clear()
            async with running_source(sim.endpoint, nodes, max_nodes_per_read=50) as capped:
                assert await capped.wait_connected(10)
                assert (capped.latest.status == GOOD).all()
                assert capped.stats.read_errors == 0 and capped.stats.chunk_size == 50
                assert {len(r) for r in log.requests} == {50}

    asyncio.run(main())


def test_max_nodes_per_read_zero_missing_or_bad_means_no_limit() -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=1, **STILL) as sim:
            async with Client(sim.endpoint) as client:
                assert await read_max_nodes_per_read(client) == 10_000
                await set_max_nodes_per_read(sim.server, 7)
                assert await read_max_nodes_per_read(client) == 7
                await set_max_nodes_per_read(sim.server, 0)
                assert await read_max_nodes_per_read(client) is None
                await sim.server.write_attribute_value(
                    MAX_NODES_PER_READ,
                    ua.DataValue(
                        ua.Variant(7, ua.VariantType.UInt32), ua.StatusCode(ua.StatusCodes.BadOutOfService)
                    ),
                )
                assert await read_max_nodes_per_read(client) is None
                await sim.server.delete_nodes([sim.server.get_node(MAX_NODES_PER_READ)])
                assert await read_max_nodes_per_read(client) is None

    asyncio.run(main())
