"""`edge-gateway browse` against real servers: the demo PLC in its own process and a small asyncua server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Client, Server, ua

from gateway.browse import BrowseError
from gateway.demo.run import demo_config, simulator_process, write_config
from gateway.demo.signals import TAGS
from gateway.errors import GatewayError
from tests.conftest import free_port
from tests.fixtures_opcua import browse, serving

PUMPS = 4
NAMESPACE = "urn:edge-gateway:test-browse"


@pytest.fixture(scope="module")
def plc() -> Iterator[str]:
    """The demo PLC as its own process; values change every 100 s so reads agree within a test."""
    port = free_port()
    with simulator_process(port, pumps=PUMPS, rate_hz=0.01):
        yield f"opc.tcp://127.0.0.1:{port}/"


@contextlib.asynccontextmanager
async def device_server(port: int) -> AsyncIterator[str]:
    """A server with one object `dev` holding variables of several types, one with EngineeringUnits."""
    server = Server()
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{port}/"
    server.set_endpoint(endpoint)
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    server.set_identity_tokens([ua.AnonymousIdentityToken])
    ns = await server.register_namespace(NAMESPACE)
    dev = await server.nodes.objects.add_object(ua.NodeId("dev", ns), ua.QualifiedName("dev", ns))

    async def var(name: str, value: Any) -> Any:
        return await dev.add_variable(ua.NodeId(f"dev.{name}", ns), ua.QualifiedName(name, ns), value)

    await var("label", ua.Variant("hello", ua.VariantType.String))
    await var("count", ua.Variant(7, ua.VariantType.Int32))
    # add_variable leaves a list's rank open; a PLC declares its arrays' ValueRank and ArrayDimensions.
    for name, values, rank, dims in [
        ("spectrum", [1.0, 2.0, 3.0], 1, [3]),
        ("vibration", [0.0] * 16, 1, [16]),
        ("buffer", [0.0] * 4, 1, None),  # one dimension, length not declared
        ("history", [0.0] * 4, 1, [0]),  # one dimension of variable length
        ("matrix", [0.0] * 4, 2, [2, 2]),
        ("anyrank", [0.0] * 4, 0, None),  # one or more dimensions
    ]:
        array = await var(name, ua.Variant(values, ua.VariantType.Double))
        await array.write_value_rank(rank)
        if dims is not None:
            await array.write_array_dimensions(dims)
    names = await var("names", ua.Variant(["a", "b"], ua.VariantType.String))
    await names.write_value_rank(1)
    await names.write_array_dimensions([2])
    await var("running", ua.Variant(True, ua.VariantType.Boolean))
    await var("Motor Temp (°C)", ua.Variant(40.5, ua.VariantType.Double))
    # A browse name YAML would read as a boolean unless quoted.
    await var("true", ua.Variant(1.0, ua.VariantType.Double))
    speed = await var("speed", ua.Variant(1450.0, ua.VariantType.Double))
    eu = ua.EUInformation(NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact", UnitId=5395027)
    eu.DisplayName = ua.LocalizedText("rpm")
    await speed.add_property(ua.NodeId("dev.speed.eu", ns), ua.QualifiedName("EngineeringUnits", 0), eu)
    await server.start()
    try:
        yield endpoint
    finally:
        await server.stop()


@pytest.fixture(scope="module")
def device() -> Iterator[str]:
    """The small server, in a thread of its own."""
    port = free_port()
    with serving(lambda: device_server(port), "test-browse-server") as endpoint:
        yield endpoint


def test_tree_lists_pumps_and_their_double_tags(plc: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert browse([plc]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "0:Objects  Object  i=85"
    for p in range(1, PUMPS + 1):
        pump = f"pump{p:02d}"
        at = lines.index(f"  2:{pump}  Object  ns=2;s={pump}")
        assert lines[at + 1 : at + 1 + len(TAGS)] == [
            f"    2:{tag}  Variable  ns=2;s={pump}.{tag}  Double  scalar" for tag in TAGS
        ]
    assert not any("i=2253" in line for line in lines), "the Server object is left out unless --all"


def test_all_depth_and_root(plc: str, capsys: pytest.CaptureFixture[str]) -> None:
    browse([plc, "--all", "--depth", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert "  0:Server  Object  i=2253" in lines
    assert "  2:pump01  Object  ns=2;s=pump01" in lines
    assert all(line.startswith(("0:", "  ")) and not line.startswith("   ") for line in lines), (
        "one level only"
    )
    browse([plc, "--root", "2:pump02"])
    by_path = capsys.readouterr().out
    browse([plc, "--root", "ns=2;s=pump02"])
    assert capsys.readouterr().out == by_path
    assert by_path.splitlines()[0] == "2:pump02  Object  ns=2;s=pump02"
    assert len(by_path.splitlines()) == 1 + len(TAGS)


def _yaml_tags(
    endpoint: str, obj: str, capsys: pytest.CaptureFixture[str]
) -> tuple[str, list[dict[str, Any]]]:
    assert browse([endpoint, "--yaml", obj]) == 0
    out = capsys.readouterr().out
    return out, yaml.safe_load(out)["tags"]


def test_yaml_node_ids_read_the_same_values_as_browse_paths(
    plc: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tags = _yaml_tags(plc, "2:pump01", capsys)
    assert [t["name"] for t in tags] == list(TAGS)
    assert all(t["unit"] == "" for t in tags)

    async def read_both() -> tuple[list[Any], list[Any]]:
        async with Client(plc, timeout=4) as client:
            by_id = await client.read_values([client.get_node(t["node_id"]) for t in tags])
            by_path = [
                await (await client.nodes.objects.get_child(["2:pump01", f"2:{tag}"])).read_value()
                for tag in TAGS
            ]
        return by_id, by_path

    by_id, by_path = asyncio.run(read_both())
    assert all(isinstance(v, float) for v in by_id)
    assert by_id == by_path


def test_yaml_pasted_into_a_config_passes_check(
    plc: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tags = _yaml_tags(plc, "ns=2;s=pump01", capsys)
    cfg = demo_config(opc_port=free_port(), mqtt_port=free_port(), db_path=tmp_path / "gw.db", pumps=PUMPS)
    assert cfg["assets"][0]["name"] == "pump01"
    assert [t["node_id"] for t in cfg["assets"][0]["tags"]] == [t["node_id"] for t in tags]
    cfg["assets"][0]["tags"] = tags
    path = write_config(cfg, tmp_path / "config.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert f"{PUMPS * len(TAGS)} tag(s)" in done.stdout


def test_tree_shows_types_and_ranks(device: str, capsys: pytest.CaptureFixture[str]) -> None:
    browse([device, "--root", "2:dev"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2:dev  Object  ns=2;s=dev"
    assert "  2:label  Variable  ns=2;s=dev.label  String  scalar" in lines
    assert "  2:count  Variable  ns=2;s=dev.count  Int32  scalar" in lines
    assert "  2:spectrum  Variable  ns=2;s=dev.spectrum  Double  array[3]" in lines
    assert "  2:vibration  Variable  ns=2;s=dev.vibration  Double  array[16]" in lines
    assert "  2:matrix  Variable  ns=2;s=dev.matrix  Double  array[2x2]" in lines
    assert "  2:running  Variable  ns=2;s=dev.running  Boolean  scalar" in lines
    assert "    0:EngineeringUnits  Variable  ns=2;s=dev.speed.eu  EUInformation  scalar" in lines


def test_yaml_keeps_numbers_and_comments_out_the_rest(
    device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out, tags = _yaml_tags(device, "2:dev", capsys)
    assert {t["name"]: t["node_id"] for t in tags} == {
        "count": "ns=2;s=dev.count",
        "spectrum": "ns=2;s=dev.spectrum",
        "vibration": "ns=2;s=dev.vibration",
        "running": "ns=2;s=dev.running",
        "Motor_Temp_C_": "ns=2;s=dev.Motor Temp (°C)",
        "true": "ns=2;s=dev.true",
        "speed": "ns=2;s=dev.speed",
    }
    assert {t["name"]: t["unit"] for t in tags}["speed"] == "rpm"
    comments = [line for line in out.splitlines() if line.lstrip().startswith("# -")]
    reasons = {
        "dev.label": "String is not numeric",
        "dev.buffer": "Double array[?]: length unknown (no fixed ArrayDimensions)",
        "dev.history": "Double array[?]: length unknown (no fixed ArrayDimensions)",
        "dev.matrix": "Double array[2x2], not a scalar or a one-dimensional array",
        "dev.anyrank": "Double array (one or more dims), not a scalar or a one-dimensional array",
        "dev.names": "String is not numeric",
    }
    assert len(comments) == len(reasons)
    for node, why in reasons.items():
        assert any(f'"ns=2;s={node}"' in c and c.endswith(f"# left out: {why}") for c in comments), node


def test_yaml_one_dimensional_arrays_get_their_length(
    device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out, tags = _yaml_tags(device, "2:dev", capsys)
    (line,) = [line for line in out.splitlines() if '"ns=2;s=dev.vibration"' in line]
    assert line == '  - {name: vibration, node_id: "ns=2;s=dev.vibration", unit: "", array_length: 16}'
    lengths = {t["name"]: t.get("array_length") for t in tags}
    assert (lengths["vibration"], lengths["spectrum"], lengths["count"]) == (16, 3, None)
    assert out.splitlines()[0] == "# 2:dev (ns=2;s=dev): 7 of 13 variable(s) usable as tags"


@pytest.mark.parametrize(
    "root",
    [
        "2:dev",
        "2:dev/",
        "/Objects/2:dev",
        "ns=2;s=dev",
        f"nsu={NAMESPACE};s=dev",
        f"{{{NAMESPACE}}}dev",
        f"/Objects/{{{NAMESPACE}}}dev",
    ],
)
def test_root_takes_every_config_node_form(
    device: str, root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert browse([device, "--root", "2:dev", "--depth", "1"]) == 0
    expected = capsys.readouterr().out
    assert expected.startswith("2:dev  Object  ns=2;s=dev\n")
    assert browse([device, "--root", root, "--depth", "1"]) == 0
    assert capsys.readouterr().out == expected


def test_root_paths_below_objects_and_objects_itself(device: str, capsys: pytest.CaptureFixture[str]) -> None:
    browse([device, "--root", "2:dev/2:speed"])
    assert capsys.readouterr().out.splitlines() == [
        "2:speed  Variable  ns=2;s=dev.speed  Double  scalar",
        "  0:EngineeringUnits  Variable  ns=2;s=dev.speed.eu  EUInformation  scalar",
    ]
    browse([device, "--depth", "1"])
    objects = capsys.readouterr().out
    assert objects.startswith("0:Objects  Object  i=85\n") and "\n  2:dev  Object  ns=2;s=dev\n" in objects
    for root in ("/Objects", "/Objects/", "i=85"):
        browse([device, "--root", root, "--depth", "1"])
        assert capsys.readouterr().out == objects


def test_unknown_namespace_and_bare_names_are_explained(device: str) -> None:
    with pytest.raises(
        BrowseError, match=r"unknown node 'nsu=urn:nosuch;s=dev': namespace 'urn:nosuch' not on"
    ):
        browse([device, "--root", "nsu=urn:nosuch;s=dev"])
    with pytest.raises(
        BrowseError, match=r"unknown browse path 'dev': .*BadNoMatch.* without 'N:' is in namespace 0"
    ):
        browse([device, "--yaml", "dev"])
    with pytest.raises(BrowseError, match=r"unknown browse path '2:dev/2:nosuch': browse path not found"):
        browse([device, "--root", "2:dev/2:nosuch"])


def test_malformed_root_is_a_usage_error_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    # Checked before connecting: nothing listens on this port.
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/"
    assert browse([endpoint, "--root", "ns=2;x=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --root: must be a node id like 'ns=2;s=Pump01.Temp'")
    assert browse([endpoint, "--yaml", "ns=2;b=not base64!"]) == 2
    assert capsys.readouterr().err.startswith("error: --yaml: 'b=' needs base64 bytes")
    assert browse([endpoint, "--root", "/Objects//x"]) == 2
    assert "has an empty element" in capsys.readouterr().err


def test_unknown_object_and_unreachable_endpoint_are_one_line_errors(device: str) -> None:
    with pytest.raises(BrowseError, match="unknown browse path 'nosuch'"):
        browse([device, "--yaml", "nosuch"])
    with pytest.raises(BrowseError, match="unknown node ns=2;s=nosuch: BadNodeIdUnknown"):
        browse([device, "--root", "ns=2;s=nosuch"])
    with pytest.raises(BrowseError, match="endpoint must look like opc.tcp://HOST:PORT/"):
        browse(["opc.tcp://127.0.0.1/"])
    with pytest.raises(BrowseError) as err:
        browse([f"opc.tcp://127.0.0.1:{free_port()}/", "--timeout", "2"])
    assert isinstance(err.value, GatewayError)
    assert "\n" not in str(err.value)


def test_silent_server_times_out() -> None:
    with socket.socket() as silent:
        # Connections complete in the backlog but nothing ever answers the OPC-UA Hello.
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        endpoint = f"opc.tcp://127.0.0.1:{silent.getsockname()[1]}/"
        with pytest.raises(BrowseError, match=r"no answer within 0\.5 s"):
            browse([endpoint, "--timeout", "0.5"])


def test_cli_unreachable_endpoint_exits_3_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "browse", f"opc.tcp://127.0.0.1:{free_port()}/", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: opc.tcp://127.0.0.1:")
