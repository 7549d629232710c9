"""Tag addresses (node ids by index or URI, GUID, opaque, browse paths), per-tag checks and health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
from asyncua import Client, Server, ua
from pydantic import ValidationError

from gateway.config import TagConfig
from gateway.latest import BAD_TYPE_MISMATCH, GOOD
from gateway.sources.nodes import parse_node_ref
from gateway.sources.uabinary import EncodedRead, ReadDecoder
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_opcua import running_source

URI = "urn:test:plant"
GUID = uuid.UUID("09087e75-8e5e-499b-954f-f2a9603db28a")
OPAQUE = b"\x00pump\xff"


@contextlib.asynccontextmanager
async def plant_server() -> AsyncIterator[tuple[Server, str, int]]:
    """A server whose plant namespace is registered after a dummy one, so its index is not 2."""
    server_log = logging.getLogger("asyncua.server")
    level = server_log.level
    server_log.setLevel(logging.WARNING)
    server = Server()
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/"
    server.set_endpoint(endpoint)
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    server.set_identity_tokens([ua.AnonymousIdentityToken])
    await server.register_namespace("urn:dummy")
    ns = await server.register_namespace(URI)
    plc = await server.nodes.objects.add_folder(ua.NodeId("PLC1", ns), ua.QualifiedName("PLC1", ns))
    pump = await plc.add_object(ua.NodeId("Pump01", ns), ua.QualifiedName("Pump01", ns))
    await pump.add_variable(ua.NodeId("Pump01.Temperature", ns), ua.QualifiedName("Temperature", ns), 21.5)
    await pump.add_variable(ua.NodeId(1001, ns), ua.QualifiedName("Speed", ns), 1450.0)
    await pump.add_variable(ua.NodeId(GUID, ns, ua.NodeIdType.Guid), ua.QualifiedName("Flow", ns), 3.25)
    await pump.add_variable(
        ua.NodeId(OPAQUE, ns, ua.NodeIdType.ByteString), ua.QualifiedName("Running", ns), True
    )
    await pump.add_variable(ua.NodeId("Pump01.Name", ns), ua.QualifiedName("Name", ns), "P-101")
    await pump.add_variable(
        ua.NodeId("Pump01.Count", ns), ua.QualifiedName("Count", ns), 7, varianttype=ua.VariantType.Int32
    )
    await server.start()
    try:
        yield server, endpoint, ns
    finally:
        await server.stop()
        server_log.setLevel(level)


def test_addresses_by_uri_index_guid_opaque_and_browse_path(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with plant_server() as (server, endpoint, ns):
            assert ns == 3
            guid_b64 = "AHB1bXD/"
            tags = [
                f"nsu={URI};s=Pump01.Temperature",
                f"nsu={URI};i=1001",
                f"ns={ns};g={GUID}",
                f"ns={ns};b={guid_b64}",
                f"/Objects/{ns}:PLC1/{ns}:Pump01/{ns}:Temperature",
                f"/Objects/{{{URI}}}PLC1/{{{URI}}}Pump01/{{{URI}}}Speed",
                f"nsu={URI};g={GUID}",
                f"nsu={URI};b={guid_b64}",
                "i=2259",  # Server_ServerStatus_State: an Int32 enumeration
                "nsu=urn:nowhere;s=x",
                f"/Objects/{ns}:PLC1/{ns}:Pump02/{ns}:Temperature",
                f"nsu={URI};s=Pump01.Missing",
                f"nsu={URI};s=Pump01.Name",
                f"nsu={URI};s=Pump01",
                f"nsu={URI};s=Pump01.Count",
            ]
            with caplog.at_level(logging.WARNING, logger="gateway.sources.opcua"):
                async with running_source(endpoint, tags) as source:
                    assert await source.wait_connected(10)
                    latest = source.latest
                    expected = [21.5, 1450.0, 3.25, 1.0, 21.5, 1450.0, 3.25, 1.0]
                    assert latest.value[:8].tolist() == expected
                    assert (latest.status[:8] == GOOD).all()
                    assert latest.value[14] == 7.0 and latest.status[14] == GOOD
                    codes = [ua.StatusCode(ua.UInt32(c)).name for c in latest.status[8:14]]
                    assert codes == [
                        "BadTypeMismatch",
                        "BadNodeIdUnknown",
                        "BadNoMatch",
                        "BadNodeIdUnknown",
                        "BadTypeMismatch",
                        "BadAttributeIdInvalid",
                    ]
                    assert np.isnan(latest.value[8:14]).all()
                    # The unreadable tags stay out of the Read; the others keep being read.
                    reads = source.stats.reads
                    await wait_for_condition(lambda: source.stats.reads > reads)
                    assert source.stats.chunk_size == 9 and source.stats.values == 9 * source.stats.reads
                    health = source.health()
                    assert health["connected"] and health["reconnects"] == 0
                    assert health["reads_per_s"] > 0 and health["values_per_s"] > 0
                    assert health["last_read_at"].endswith("+00:00")
                    assert health["bad_by_status"] == {
                        "BadTypeMismatch": 2,
                        "BadNodeIdUnknown": 2,
                        "BadNoMatch": 1,
                        "BadAttributeIdInvalid": 1,
                    }
        lines = [r.getMessage() for r in caplog.records]
        for tag, reason in [
            ("i=2259", "enumeration"),
            ("nsu=urn:nowhere;s=x", "namespace 'urn:nowhere' not on the server"),
            ("Pump02", "browse path not found (BadNoMatch)"),
            ("Pump01.Missing", "BadNodeIdUnknown"),
            ("Pump01.Name", "data type String is not numeric or boolean"),
            (f"nsu={URI};s=Pump01:", "not a variable"),
        ]:
            assert any(tag in line and reason in line for line in lines), (tag, reason, lines)

    asyncio.run(main())


def test_namespace_by_uri_survives_a_reprogrammed_server() -> None:
    """The URI is looked up on every connect: a server restarted with other indexes still works."""

    async def serve(port: int, dummies: int, value: float) -> Server:
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_identity_tokens([ua.AnonymousIdentityToken])
        for k in range(dummies):
            await server.register_namespace(f"urn:dummy{k}")
        ns = await server.register_namespace(URI)
        await server.nodes.objects.add_variable(ua.NodeId("T", ns), ua.QualifiedName("T", ns), value)
        await server.start()
        return server

    async def main() -> None:
        logging.getLogger("asyncua.server").setLevel(logging.WARNING)
        port = free_port()
        server = await serve(port, 0, 1.5)
        tags = [f"nsu={URI};s=T", f"/Objects/{{{URI}}}T"]
        async with running_source(f"opc.tcp://127.0.0.1:{port}/", tags) as source:
            try:
                assert await source.wait_connected(10)
                assert source.latest.value.tolist() == [1.5, 1.5]
                await server.stop()
                await wait_for_condition(lambda: not source.stats.connected)
                server = await serve(port, 3, 2.5)
                await wait_for_condition(lambda: source.latest.value.tolist() == [2.5, 2.5])
                assert (source.latest.status == GOOD).all() and source.health()["reconnects"] == 1
            finally:
                await server.stop()

    asyncio.run(main())


def set_unchecked(server: Server, node: ua.NodeId, variant: ua.Variant) -> None:
    """Store a value as a reprogrammed PLC would: asyncua's own writes refuse a type change."""
    server.iserver.aspace[node].attributes[ua.AttributeIds.Value].value = ua.DataValue(variant)


def test_a_value_whose_type_changes_is_marked_bad_on_both_decode_paths() -> None:
    async def main() -> None:
        async with plant_server() as (server, endpoint, ns):
            temp = ua.NodeId("Pump01.Temperature", ns)
            tags = [f"ns={ns};s=Pump01.Temperature", f"ns={ns};i=1001"]
            async with running_source(endpoint, tags) as source:
                assert await source.wait_connected(10)
                latest = source.latest
                assert latest.status[0] == GOOD
                client = Client(endpoint)
                # asyncua asks for an hour and logs a warning when the server grants less.
                client.session_timeout = 60_000
                async with client:
                    set_unchecked(server, temp, ua.Variant(42, ua.VariantType.Int32))
                    await wait_for_condition(lambda: latest.status[0] == BAD_TYPE_MISMATCH)
                    assert math.isnan(latest.value[0]) and latest.status[1] == GOOD
                    assert source.stats.slow_decodes == 0
                    # A String is decoded by asyncua's decoder: marked bad the same way.
                    set_unchecked(server, temp, ua.Variant("oops", ua.VariantType.String))
                    await wait_for_condition(lambda: source.stats.slow_decodes > 0)
                    assert latest.status[0] == BAD_TYPE_MISMATCH and latest.status[1] == GOOD
                    set_unchecked(server, temp, ua.Variant(22.0, ua.VariantType.Double))
                    await wait_for_condition(lambda: latest.value[0] == 22.0)
                    assert latest.status[0] == GOOD

                    # Both decoders on one response holding the changed type agree.
                    set_unchecked(server, temp, ua.Variant(42, ua.VariantType.Int32))
                    params = ua.ReadParameters(
                        NodesToRead=[
                            ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.Value)
                            for n in (temp, ua.NodeId(1001, ns))
                        ]
                    )
                    body = bytes(await EncodedRead(params).send(client.uaclient))
                    fast, slow = ReadDecoder(2, expected=[11, 11]), ReadDecoder(2, expected=[11, 11])
                    assert fast.decode(body)
                    slow.decode_generic(body)
                    assert fast.status.tolist() == slow.status.tolist() == [BAD_TYPE_MISMATCH, GOOD]
                    assert np.isnan(fast.value[0]) and np.isnan(slow.value[0])
                    assert fast.value[1] == slow.value[1] == 1450.0
                    # Without an expected type (an abstract Number), any numeric type is taken.
                    loose = ReadDecoder(2, expected=[0, 11])
                    assert loose.decode(body) and loose.value[0] == 42.0 and loose.status[0] == GOOD

    asyncio.run(main())


@pytest.mark.parametrize(
    "node_id",
    [
        "ns=2;s=Pump01.Temp",
        "ns=2;i=1001",
        "i=2258",
        f"ns=2;g={GUID}",
        "ns=2;b=AHB1bXD/",
        f"nsu={URI};s=Pump01.Temp",
        f"nsu={URI};i=5",
        "/Objects/2:PLC1/2:Pump01/2:Temperature",
        f"/Objects/{{{URI}}}PLC1/Server",
    ],
)
def test_config_accepts_every_address_form(node_id: str) -> None:
    assert TagConfig(name="t", node_id=node_id).node_id == node_id
    assert parse_node_ref(node_id).text == node_id


@pytest.mark.parametrize(
    ("node_id", "message"),
    [
        ("ns=2;x=bad", "must be a node id like"),
        ("Objects/2:PLC1", "must be a node id like"),
        ("ns=2;g=not-a-guid", "invalid g= identifier"),
        ("ns=2;b=@@@", "needs base64"),
        ("ns=2;i=ten", "invalid i= identifier"),
        ("/Objects/2:PLC1//2:T", "empty element"),
    ],
)
def test_config_rejects_malformed_addresses(node_id: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TagConfig(name="t", node_id=node_id)
