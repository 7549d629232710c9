"""One-dimensional array tags (e.g. a vibration waveform block): one node fills consecutive channels."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from asyncua import Server, ua

from gateway.config import load_config
from gateway.demo.run import demo_config, write_config
from gateway.latest import BAD_TYPE_MISMATCH, LatestValues
from gateway.normalize import EngineeringScaling, channel_permutation
from gateway.sources.opcua import SourceTag
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_gateway import running_gateway
from tests.fixtures_opcua import STILL, running_simulator, running_source

NS_URI = "urn:test:arrays"
WAVE = [0.5 * k for k in range(8)]
COUNTS = [-3, 7, 300, 0]


async def add_array(
    server: Server, parent: ua.NodeId, name: str, ns: int, value: list, vt: ua.VariantType
) -> ua.NodeId:  # type: ignore[type-arg]
    """A variable holding a 1-D array, declared as one (ValueRank 1, ArrayDimensions [len])."""
    var = await server.get_node(parent).add_variable(ua.NodeId(name, ns), name, value, varianttype=vt)
    await var.write_value_rank(1)
    await var.write_array_dimensions([len(value)])
    return var.nodeid


@contextlib.asynccontextmanager
async def array_server() -> AsyncIterator[tuple[str, Server, int]]:
    """A server with a Double scalar `temp`, a Double[8] `wave` and an Int16[4] `counts`."""
    server = Server()
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/"
    server.set_endpoint(endpoint)
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace(NS_URI)
    objects = server.nodes.objects.nodeid
    await server.get_node(objects).add_variable(
        ua.NodeId("temp", ns), "temp", 21.5, varianttype=ua.VariantType.Double
    )
    await add_array(server, objects, "wave", ns, WAVE, ua.VariantType.Double)
    await add_array(server, objects, "counts", ns, COUNTS, ua.VariantType.Int16)
    async with server:
        yield endpoint, server, ns


def tags() -> list[SourceTag]:
    """temp in row 0, wave in rows 1..8, counts in rows 9..12."""
    return [
        SourceTag(0, f"nsu={NS_URI};s=temp"),
        SourceTag(1, f"nsu={NS_URI};s=wave", 8),
        SourceTag(9, f"nsu={NS_URI};s=counts", 4),
    ]


@pytest.mark.parametrize("mode", ["poll", "subscribe"])
def test_array_elements_fill_consecutive_rows_and_a_wrong_shape_is_bad(mode: str) -> None:
    async def main() -> None:
        async with array_server() as (endpoint, server, ns):
            latest = LatestValues(13)
            async with running_source(endpoint, tags(), latest, mode=mode) as source:
                await wait_for_condition(lambda: (latest.status == 0).all(), 20, "every row Good")
                assert latest.value.tolist() == [21.5, *WAVE, *COUNTS]
                # Every element carries its node's source timestamp.
                assert len(set(latest.source_ts[1:9].tolist())) == 1 and latest.source_ts[1] > 0
                wave = ua.NodeId("wave", ns)
                # Seven elements where eight are configured: never a partial or padded array.
                await server.write_attribute_value(
                    wave, ua.DataValue(ua.Variant(WAVE[:7], ua.VariantType.Double))
                )
                await wait_for_condition(
                    lambda: (latest.status[1:9] == BAD_TYPE_MISMATCH).all(), 20, "wave Bad"
                )
                assert np.isnan(latest.value[1:9]).all()
                assert (latest.status[[0, *range(9, 13)]] == 0).all()
                # The right length again: the rows recover.
                new = [x + 1 for x in WAVE]
                await server.write_attribute_value(wave, ua.DataValue(ua.Variant(new, ua.VariantType.Double)))
                await wait_for_condition(lambda: latest.value[1:9].tolist() == new, 20, "new wave")
                assert (latest.status == 0).all()
                assert source.health()["bad_by_status"] == {}
                assert source.stats.values >= 13

    asyncio.run(main())


def test_array_tag_on_a_scalar_node_and_scalar_tag_on_an_array_are_reported_at_connect() -> None:
    async def main() -> None:
        async with array_server() as (endpoint, _, _):
            latest = LatestValues(13)
            swapped = [
                SourceTag(0, f"nsu={NS_URI};s=temp", 8),
                SourceTag(8, f"nsu={NS_URI};s=wave"),
                SourceTag(9, f"nsu={NS_URI};s=counts", 4),
            ]
            async with running_source(endpoint, swapped, latest) as source:
                await wait_for_condition(lambda: source.stats.reads >= 1, 20, "a read")
                assert (latest.status[:9] == BAD_TYPE_MISMATCH).all() and np.isnan(latest.value[:9]).all()
                assert latest.value[9] == COUNTS[0] and latest.status[9] == 0
                assert source.health()["bad_by_status"] == {"BadTypeMismatch": 2}

    asyncio.run(main())


def test_asset_channels_scaling_and_model_columns_expand_arrays(tmp_path: Path) -> None:
    raw = demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "gw.db", pumps=1)
    raw["assets"][0]["tags"].append(
        {"name": "wave", "node_id": "ns=2;s=pump01.wave", "array_length": 3, "scale": 2.0, "offset": 1.0}
    )
    cfg = load_config(write_config(raw, tmp_path / "c.yaml"))
    asset = cfg.assets[0]
    assert asset.channels[-4:] == ["power", "wave[0]", "wave[1]", "wave[2]"]
    scaling = EngineeringScaling.from_tags(asset.tags)
    assert scaling.apply(np.ones(11)).tolist()[-3:] == [3.0, 3.0, 3.0]
    assert channel_permutation(
        asset.channels, ["wave[2]", asset.channels[0]], model="m", asset="pump01"
    ).tolist() == [10, 0]


def test_array_length_out_of_range_names_the_line(tmp_path: Path) -> None:
    raw = demo_config(opc_port=4840, mqtt_port=1883, db_path=tmp_path / "gw.db", pumps=1)
    raw["assets"][0]["tags"][0]["array_length"] = 0
    from gateway.errors import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"c\.yaml:\d+ assets\[0\]\.tags\[0\]\.array_length: Input should be greater than or equal to 1",
    ):
        load_config(write_config(raw, tmp_path / "c.yaml"))


def test_gateway_windows_carry_array_channels(tmp_path: Path) -> None:
    """The demo model reads its 8 pump channels out of an asset that also has a 16-element waveform."""

    async def main() -> None:
        async with running_simulator(**STILL) as sim:
            assert sim.server is not None
            block = [math.sin(k / 3) for k in range(16)]
            pump = ua.NodeId("pump01", sim.namespace_index)
            await add_array(
                sim.server, pump, "pump01.wave", sim.namespace_index, block, ua.VariantType.Double
            )
            raw = demo_config(opc_port=sim.port, mqtt_port=free_port(), db_path=tmp_path / "gw.db", pumps=1)
            raw["assets"][0]["tags"].append(
                {"name": "wave", "node_id": "ns=2;s=pump01.wave", "array_length": 16}
            )
            raw["alarms"] = []
            raw["mqtt"]["publish_scores"] = False
            async with running_gateway(load_config(write_config(raw, tmp_path / "c.yaml"))) as run:
                gateway = run.gateway
                sampler = gateway.samplers["pump01"]
                await wait_for_condition(
                    lambda: gateway.counters.windows_inferred >= 2 or run.stopped(), 60, "windows inferred"
                )
                assert not run.stopped()
                assert len(gateway.latest) == 24
                assert gateway.latest.value[8:].tolist() == block
                assert sampler.ring.window().shape[1] == 24
                assert sampler.skips == {"bad_quality": 0, "not_finite": 0}
                assert gateway.counters.inference_errors == 0
            assert run.code == 0

    asyncio.run(main())
