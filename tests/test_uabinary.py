"""The pre-encoded Read request and the NumPy Read-response decoder against asyncua's own codec."""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from asyncua import Client, Server, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import SourceError
from gateway.sources.uabinary import PRE_ENCODED_SEND, EncodedRead, ReadDecoder, datavalues_to_arrays
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_opcua import running_simulator, running_source

VT = ua.VariantType
NUMERIC = [VT.Boolean, VT.SByte, VT.Byte, VT.Int16, VT.UInt16, VT.Int32, VT.UInt32, VT.Int64, VT.UInt64]
NUMERIC += [VT.Float, VT.Double]
_INT_RANGES = {
    VT.SByte: (-(2**7), 2**7 - 1),
    VT.Byte: (0, 2**8 - 1),
    VT.Int16: (-(2**15), 2**15 - 1),
    VT.UInt16: (0, 2**16 - 1),
    VT.Int32: (-(2**31), 2**31 - 1),
    VT.UInt32: (0, 2**32 - 1),
    VT.Int64: (-(2**63), 2**63 - 1),
    VT.UInt64: (0, 2**64 - 1),
}
UNCERTAIN = ua.StatusCodes.UncertainLastUsableValue
BAD = ua.StatusCodes.BadSensorFailure
STAMP = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)


def edge_values(vt: VT) -> list[Any]:
    """Values that stress a type's conversion: its limits, zero, and for floats NaN and infinities."""
    if vt == VT.Boolean:
        return [True, False]
    if vt in _INT_RANGES:
        lo, hi = _INT_RANGES[vt]
        return [lo, hi, 0, (lo + hi) // 3]
    big = 3.4028234663852886e38 if vt == VT.Float else 1.7976931348623157e308
    return [1.5, -0.0, math.nan, math.inf, -math.inf, big]


def both_ways(data: Any, n: int, lengths: Sequence[int] | None = None) -> tuple[bool, ReadDecoder, ReadDecoder]:
    """Decode one response body with the fast decoder and with asyncua's; (fast path used, fast, generic)."""
    fast, generic = ReadDecoder(n, lengths=lengths), ReadDecoder(n, lengths=lengths)
    used_fast = fast.decode(data)
    generic.decode_generic(data)
    return used_fast, fast, generic


def assert_same(a: ReadDecoder, b: ReadDecoder) -> None:
    np.testing.assert_array_equal(a.value, b.value)
    np.testing.assert_array_equal(a.status, b.status)
    np.testing.assert_array_equal(a.source_ts, b.source_ts)


def read_params(node_ids: Sequence[ua.NodeId]) -> ua.ReadParameters:
    return ua.ReadParameters(
        TimestampsToReturn=ua.TimestampsToReturn.Both,
        NodesToRead=[ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.Value) for n in node_ids],
    )


@contextlib.asynccontextmanager
async def typed_server(
    security: Path | None = None,
) -> AsyncIterator[tuple[str, Server, dict[str, ua.NodeId]]]:
    """A server with one variable per (type, edge value, status, timestamp) case, plus odd ones; stopped on exit."""
    server = Server()
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/"
    server.set_endpoint(endpoint)
    if security is None:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    else:
        server.set_security_policy(
            [
                ua.SecurityPolicyType.Basic256Sha256_Sign,
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ]
        )
        key, cert = security / "server-key.pem", security / "server-cert.der"
        await setup_self_signed_certificate(
            key, cert, "urn:test:server", "127.0.0.1", [ExtendedKeyUsageOID.SERVER_AUTH], {}
        )
        await server.load_certificate(cert)
        await server.load_private_key(key)
    ns = await server.register_namespace("urn:test:uabinary")
    objects = server.nodes.objects
    nodes: dict[str, ua.NodeId] = {}
    for vt in NUMERIC:
        for k, x in enumerate(edge_values(vt)):
            for status in (ua.StatusCodes.Good, UNCERTAIN, BAD):
                for stamp in (STAMP, None):
                    name = f"{vt.name}.{k}.{status:x}.{'ts' if stamp else 'nots'}"
                    var = await objects.add_variable(ua.NodeId(name, ns), name, x, varianttype=vt)
                    dv = ua.DataValue(ua.Variant(x, vt), ua.StatusCode(status), SourceTimestamp=stamp)
                    await server.write_attribute_value(var.nodeid, dv)
                    nodes[name] = var.nodeid
    for name, x, vt in (
        ("text", "hello", VT.String),
        ("array", [1.0, 2.0], VT.Double),
        ("int_array", [-3, 7, 300], VT.Int16),
        ("bool_array", [True, False, True], VT.Boolean),
    ):
        nodes[name] = (await objects.add_variable(ua.NodeId(name, ns), name, x, varianttype=vt)).nodeid
    nodes["missing"] = ua.NodeId("missing", ns)
    async with server:
        yield endpoint, server, nodes


@contextlib.asynccontextmanager
async def connected(endpoint: str, setup: Any = None) -> AsyncIterator[Client]:
    client = Client(endpoint, timeout=5)
    if setup is not None:
        await setup(client)
    async with client:
        yield client


def test_encoded_request_is_what_asyncua_would_send() -> None:
    node_ids = [
        ua.NodeId(7, 0),
        ua.NodeId(1234, 2),
        ua.NodeId(2**20, 3),
        ua.NodeId("pump01.speed", 2),
        ua.NodeId(b"\x01\x02", 4),
        ua.NodeId.from_string("ns=5;g=09087e75-8e5e-499b-954f-f2a9603db28a"),
    ]
    params = read_params(node_ids)
    header = ua.RequestHeader(AuthenticationToken=ua.NodeId(42, 1), RequestHandle=17, TimeoutHint=4000)
    expected = struct_to_binary(ua.ReadRequest(RequestHeader=header, Parameters=params))
    assert EncodedRead(params).to_binary(header) == expected


def test_fast_decode_equals_generic_and_a_normal_read_for_every_type() -> None:
    async def main() -> None:
        async with typed_server() as (url, server, nodes), connected(url) as client:
            assert PRE_ENCODED_SEND
            numeric = [nid for name, nid in nodes.items() if name.split(".")[0] in VT.__members__]
            groups = {
                vt.name: [nid for nid in numeric if nid.Identifier.startswith(vt.name + ".")]
                for vt in NUMERIC
            }
            for name, node_ids in [*groups.items(), ("all numeric", numeric)]:
                params = read_params(node_ids)
                data = await EncodedRead(params).send(client.uaclient)
                used_fast, fast, generic = both_ways(data, len(node_ids))
                assert used_fast, name
                assert_same(fast, generic)
                # The server answers the pre-encoded request as it answers asyncua's own Read.
                normal = ReadDecoder(len(node_ids))
                datavalues_to_arrays(
                    await client.uaclient.read(params), normal.value, normal.status, normal.source_ts
                )
                assert_same(fast, normal)
            # Spot checks that the reference itself is right.
            row = numeric.index(nodes[f"Int64.0.{UNCERTAIN:x}.ts"])
            assert fast.value[row] == float(-(2**63)) and fast.status[row] == UNCERTAIN
            assert (
                fast.source_ts[row]
                == (STAMP - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1) * 1000
            )
            row = numeric.index(nodes["Boolean.0.0.nots"])
            assert fast.value[row] == 1.0 and fast.status[row] == 0 and fast.source_ts[row] == 0
            assert np.isnan(fast.value).any() and np.isinf(fast.value).any()
            assert (fast.status == BAD).sum() == len(numeric) // 3

    asyncio.run(main())


def test_unsupported_entries_fall_back_and_odd_entries_stay_fast() -> None:
    async def main() -> None:
        async with typed_server() as (url, server, nodes), connected(url) as client:
            some = [nodes["Double.0.0.ts"], nodes["Int32.1.0.nots"], nodes[f"Float.2.{BAD:x}.ts"]]
            cases = [
                ([*some, nodes["missing"]], True),
                ([*some, nodes["text"]], False),
                # An array where a scalar is configured is a type mismatch, found on the fast path.
                ([nodes["array"], *some], True),
                ([*some, nodes["text"], nodes["missing"], nodes["array"]], False),
            ]
            for node_ids, expect_fast in cases:
                data = await EncodedRead(read_params(node_ids)).send(client.uaclient)
                used_fast, fast, generic = both_ways(data, len(node_ids))
                assert used_fast is expect_fast
                assert_same(fast, generic)
            # From the last case: the string and the missing node as the source has always stored them.
            assert fast.status[3] == ua.StatusCodes.BadTypeMismatch and math.isnan(fast.value[3])
            assert fast.status[4] == ua.StatusCodes.BadNodeIdUnknown and math.isnan(fast.value[4])

    asyncio.run(main())


def test_arrays_fill_consecutive_slots_on_both_paths() -> None:
    async def main() -> None:
        async with typed_server() as (url, server, nodes), connected(url) as client:
            node_ids = [nodes["Double.0.0.ts"], nodes["array"], nodes["int_array"], nodes["bool_array"]]
            data = await EncodedRead(read_params(node_ids)).send(client.uaclient)
            used_fast, fast, generic = both_ways(data, 4, lengths=[0, 2, 3, 3])
            assert used_fast
            assert_same(fast, generic)
            assert fast.value.tolist() == [1.5, 1.0, 2.0, -3.0, 7.0, 300.0, 1.0, 0.0, 1.0]
            assert (fast.status == 0).all()
            # Every element carries its array's source timestamp.
            assert len(set(fast.source_ts[1:3].tolist())) == 1 and fast.source_ts[1] > 0
            # A length other than the configured one, or a scalar where an array is configured: all
            # of the node's slots are NaN with BadTypeMismatch, never a partial or padded array.
            used_fast, fast, generic = both_ways(data, 4, lengths=[2, 3, 3, 3])
            assert used_fast
            assert_same(fast, generic)
            assert (fast.status[:5] == ua.StatusCodes.BadTypeMismatch).all() and np.isnan(fast.value[:5]).all()
            assert fast.value[5:].tolist() == [-3.0, 7.0, 300.0, 1.0, 0.0, 1.0]

    asyncio.run(main())


_ARRAY_TYPES = [VT.Boolean, VT.Byte, VT.Int16, VT.UInt32, VT.Int64, VT.Float, VT.Double]
_CODES = {VT.Boolean: "B", VT.Byte: "B", VT.Int16: "h", VT.UInt32: "I", VT.Int64: "q", VT.Float: "f", VT.Double: "d"}


@st.composite
def array_or_scalar_entries(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    """DataValue bytes of scalars and 1-D arrays (any length, -1 for null), and configured lengths."""
    entries, lengths = [], []
    for _ in range(draw(st.integers(1, 8))):
        vt = draw(st.sampled_from(_ARRAY_TYPES))
        code = _CODES[vt]
        element = st.integers(0, 1 if vt == VT.Boolean else 100) if code in "BI" else st.integers(-100, 100)
        status = draw(st.sampled_from([None, BAD, UNCERTAIN]))
        mask = 0x01 | (0x02 if status is not None else 0) | 0x04
        stamp = struct.pack("<q", 10 * draw(st.integers(0, 10**12)))
        tail = (struct.pack("<I", status) if status is not None else b"") + stamp
        if draw(st.booleans()):
            items = draw(st.lists(element, max_size=6))
            count = -1 if not items and draw(st.booleans()) else len(items)
            value = struct.pack(f"<BBi{len(items)}{code}", mask, int(vt) | 0x80, count, *items)
            natural = len(items)
        else:
            value = struct.pack(f"<BB{code}", mask, int(vt), draw(element))
            natural = 0
        entries.append(value + tail)
        # Mostly the shape the server sends, sometimes another one.
        lengths.append(natural if draw(st.integers(0, 3)) else draw(st.integers(0, 6)))
    return entries, lengths


@given(array_or_scalar_entries())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_mix_of_arrays_and_scalars_decodes_as_asyncua_does(case: tuple[list[bytes], list[int]]) -> None:
    entries, lengths = case
    used_fast, fast, generic = both_ways(hand_built(entries), len(entries), lengths)
    assert used_fast
    assert_same(fast, generic)


def test_layout_is_reused_until_it_changes() -> None:
    async def main() -> None:
        async with typed_server() as (url, server, nodes), connected(url) as client:
            node_ids = [nodes["Double.0.0.ts"], nodes["UInt16.1.0.ts"], nodes["Boolean.1.0.nots"]]
            request, decoder = EncodedRead(read_params(node_ids)), ReadDecoder(len(node_ids))
            for _ in range(3):
                assert decoder.decode(await request.send(client.uaclient))
            assert decoder.layout_scans == 1
            # A Bad value without a Variant shifts every later entry: the layout must be found again.
            await server.write_attribute_value(node_ids[0], ua.DataValue(StatusCode=ua.StatusCode(BAD)))
            data = await request.send(client.uaclient)
            assert decoder.decode(data) and decoder.layout_scans == 2
            _, _, generic = both_ways(data, len(node_ids))
            assert_same(decoder, generic)
            assert decoder.status[0] == BAD and decoder.value[1] == 2**16 - 1 and decoder.value[2] == 0.0

    asyncio.run(main())


def test_pre_encoded_read_with_security_and_chunked_messages(tmp_path: Path) -> None:
    async def main() -> None:
        async with typed_server(security=tmp_path) as (url, _server, nodes):
            for mode in (ua.MessageSecurityMode.Sign, ua.MessageSecurityMode.SignAndEncrypt):

                async def secure(client: Client, mode: ua.MessageSecurityMode = mode) -> None:
                    client.application_uri = "urn:test:client"
                    key, cert = tmp_path / "client-key.pem", tmp_path / "client-cert.der"
                    await setup_self_signed_certificate(
                        key, cert, client.application_uri, "127.0.0.1", [ExtendedKeyUsageOID.CLIENT_AUTH], {}
                    )
                    await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key), mode=mode)

                async with connected(url, secure) as client:
                    # Far more than one 64 KiB chunk each way.
                    node_ids = [nodes["Double.0.0.ts"], nodes[f"Int16.1.{UNCERTAIN:x}.nots"]] * 3000
                    params = read_params(node_ids)
                    request = EncodedRead(params)
                    assert len(request.to_binary(ua.RequestHeader())) > 3 * 65535
                    data = await request.send(client.uaclient)
                    used_fast, fast, generic = both_ways(data, len(node_ids))
                    assert used_fast
                    assert_same(fast, generic)
                    normal = ReadDecoder(len(node_ids))
                    datavalues_to_arrays(
                        await client.uaclient.read(params), normal.value, normal.status, normal.source_ts
                    )
                    assert_same(fast, normal)
                    assert fast.value[0] == 1.5 and fast.value[1] == 2**15 - 1

    asyncio.run(main())


def test_generic_send_gives_the_same_response() -> None:
    async def main() -> None:
        async with typed_server() as (url, server, nodes), connected(url) as client:
            node_ids = [nodes["Double.0.0.ts"], nodes["text"], nodes["missing"]]
            answers = []
            for pre_encoded in (True, False):
                data = await EncodedRead(read_params(node_ids), pre_encoded=pre_encoded).send(client.uaclient)
                answers.append(struct_from_binary(ua.ReadResponse, data).Results)
            assert [(dv.Value, dv.StatusCode, dv.SourceTimestamp) for dv in answers[0]] == [
                (dv.Value, dv.StatusCode, dv.SourceTimestamp) for dv in answers[1]
            ]

    asyncio.run(main())


def test_source_counts_fast_and_slow_decodes() -> None:
    async def main() -> None:
        async with running_simulator(
            n_pumps=2, rate_hz=20, fault_pump=None, bad_tag=None, nan_tag=None
        ) as sim:
            # A Double variable holding a String (as a changed PLC may serve): it passes the data type
            # check at connect, and its responses need asyncua's decoder.
            text = ua.NodeId("text", 2)
            await sim.server.nodes.objects.add_variable(text, "text", 0.0)
            attr = sim.server.iserver.aspace[text].attributes[ua.AttributeIds.Value]
            attr.value = ua.DataValue(ua.Variant("hello", ua.VariantType.String))
            async with (
                running_source(sim.endpoint, sim.tags) as fast,
                running_source(sim.endpoint, [*sim.tags[:3], "ns=2;s=text"]) as slow,
            ):
                await wait_for_condition(lambda: fast.stats.reads >= 3 and slow.stats.reads >= 3)
                assert fast.stats.fast_decodes == fast.stats.reads and fast.stats.slow_decodes == 0
                assert slow.stats.slow_decodes == slow.stats.reads and slow.stats.fast_decodes == 0
                assert slow.latest.status[3] == ua.StatusCodes.BadTypeMismatch

    asyncio.run(main())


# Hand-built responses: what asyncua's encoder cannot produce (any tick count, a short Results array).
_PREFIX = struct_to_binary(ua.ReadResponse())[:-8]


def hand_built(entries: Sequence[bytes], count: int | None = None) -> bytes:
    n = len(entries) if count is None else count
    return _PREFIX + struct.pack("<i", n) + b"".join(entries) + struct.pack("<i", -1)


@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=20))
@settings(max_examples=200, deadline=None)
def test_any_source_timestamp_converts_as_asyncua_does(ticks: list[int]) -> None:
    data = hand_built([struct.pack("<BBdIq", 0x07, int(VT.Double), 1.0, 0, t) for t in ticks])
    used_fast, fast, generic = both_ways(data, len(ticks))
    assert used_fast
    assert_same(fast, generic)


def test_any_nonzero_boolean_byte_is_true() -> None:
    data = hand_built([struct.pack("<BBB", 0x01, int(VT.Boolean), b) for b in range(256)])
    used_fast, fast, generic = both_ways(data, 256)
    assert used_fast
    assert_same(fast, generic)
    assert fast.value[0] == 0.0 and (fast.value[1:] == 1.0).all() and (fast.status == 0).all()


def test_a_changed_layout_of_the_same_size_is_noticed() -> None:
    double, int64 = (
        struct.pack("<BBd", 0x01, int(VT.Double), 0.5),
        struct.pack("<BBq", 0x01, int(VT.Int64), 3),
    )
    with_ts, no_value = struct.pack("<BBdq", 0x05, int(VT.Double), 0.5, 7), struct.pack("<BIq", 0x06, BAD, 7)
    decoder = ReadDecoder(2)
    for entries in ([double, int64], [int64, double], [with_ts, no_value], [no_value, with_ts]):
        data = hand_built(entries)
        assert decoder.decode(data)
        _, _, generic = both_ways(data, 2)
        assert_same(decoder, generic)
    assert decoder.layout_scans == 4


def test_wrong_result_count_and_bad_service_result_raise() -> None:
    entry = struct.pack("<BBd", 0x01, int(VT.Double), 2.0)
    with pytest.raises(SourceError, match="Read returned 1 results for 2 nodes"):
        ReadDecoder(2).decode(hand_built([entry]))
    with pytest.raises(SourceError, match="Read returned 0 results for 1 nodes"):
        ReadDecoder(1).decode(hand_built([], count=-1))
    response = ua.ReadResponse()
    response.ResponseHeader.ServiceResult = ua.StatusCode(ua.StatusCodes.BadTooManyOperations)
    with pytest.raises(ua.UaStatusCodeError, match="BadTooManyOperations"):
        ReadDecoder(0).decode(struct_to_binary(response))


# Random Results arrays encoded by asyncua itself.
def variant_values(vt: VT) -> st.SearchStrategy[Any]:
    if vt == VT.Boolean:
        return st.booleans()
    if vt in _INT_RANGES:
        return st.integers(*_INT_RANGES[vt])
    return st.floats(width=32 if vt == VT.Float else 64)


stamps = st.datetimes(
    min_value=datetime(1601, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(timezone.utc)
)
statuses = st.sampled_from([0, UNCERTAIN, BAD, ua.StatusCodes.BadNodeIdUnknown]) | st.integers(0, 2**32 - 1)
picoseconds = st.integers(0, 2**16 - 1)
# The optional DataValue fields besides Value, in the order of their encoding mask bits.
OPTIONAL = (
    ("StatusCode", statuses.map(ua.StatusCode)),
    ("SourceTimestamp", stamps),
    ("ServerTimestamp", stamps),
    ("SourcePicoseconds", picoseconds),
    ("ServerPicoseconds", picoseconds),
)
# Kinds of Value: a VariantType, None (no Value at all), or "array" (an array of Doubles).
SUPPORTED: list[Any] = [*NUMERIC, VT.Null, None]
presence = st.lists(st.booleans(), min_size=len(OPTIONAL), max_size=len(OPTIONAL))


def datavalue(draw: st.DrawFn, kind: Any, present: Sequence[bool]) -> ua.DataValue:
    """A DataValue of this kind whose optional fields are present as `present` says."""
    dv = ua.DataValue()
    for (name, values), here in zip(OPTIONAL, present, strict=True):
        setattr(dv, name, draw(values) if here else None)
    if kind is None:
        dv.Value = None
    elif kind == "array":
        dv.Value = ua.Variant(draw(st.lists(st.floats(), max_size=3)), VT.Double)
    elif kind == VT.String:
        dv.Value = ua.Variant(draw(st.text(max_size=5)), kind)
    elif kind != VT.Null:
        dv.Value = ua.Variant(draw(variant_values(kind)), kind)
    return dv


@st.composite
def homogeneous(draw: st.DrawFn) -> list[ua.DataValue]:
    """1-30 DataValues with one shape: the same Value kind and the same optional fields."""
    kind, present = draw(st.sampled_from(SUPPORTED)), draw(presence)
    return [datavalue(draw, kind, present) for _ in range(draw(st.integers(1, 30)))]


@st.composite
def mixed(draw: st.DrawFn) -> list[ua.DataValue]:
    """1-30 DataValues, each of its own shape."""
    kinds = st.sampled_from([*SUPPORTED, VT.String, "array"])
    return [datavalue(draw, draw(kinds), draw(presence)) for _ in range(draw(st.integers(1, 30)))]


def response_bytes(results: list[ua.DataValue]) -> bytes:
    return struct_to_binary(ua.ReadResponse(Results=results))


@given(homogeneous())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_homogeneous_responses(results: list[ua.DataValue]) -> None:
    used_fast, fast, generic = both_ways(response_bytes(results), len(results))
    assert used_fast
    assert_same(fast, generic)


@given(mixed())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_mixed_responses(results: list[ua.DataValue]) -> None:
    # Strings take asyncua's decoder; arrays (of Doubles here) stay fast as type mismatches.
    unsupported = any(dv.Value is not None and dv.Value.VariantType == VT.String for dv in results)
    used_fast, fast, generic = both_ways(response_bytes(results), len(results))
    assert used_fast is not unsupported
    assert_same(fast, generic)
