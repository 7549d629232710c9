"""`edge-gateway browse` against real servers: the demo PLC in its own process and a small asyncua server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Client, Server, ua

from gateway.browse import BrowseError, add_browse_command
from gateway.demo.run import demo_config, simulator_process, write_config
from gateway.demo.signals import TAGS
from gateway.errors import GatewayError
from tests.conftest import free_port

PUMPS = 4


def browse(argv: list[str]) -> int:
    """Parse `browse ...` with the command's own parser and run it."""
    parser = argparse.ArgumentParser(prog="edge-gateway")
    add_browse_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["browse", *argv])
    return int(args.func(args))


@pytest.fixture(scope="module")
def plc() -> Iterator[str]:
    """The demo PLC as its own process; values change every 100 s so reads agree within a test."""
    port = free_port()
    with simulator_process(port, pumps=PUMPS, rate_hz=0.01):
        yield f"opc.tcp://127.0.0.1:{port}/"


async def _build_device(port: int) -> Server:
    """A server with one object `dev` holding variables of several types, one with EngineeringUnits."""
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    server.set_identity_tokens([ua.AnonymousIdentityToken])
    ns = await server.register_namespace("urn:edge-gateway:test-browse")
    dev = await server.nodes.objects.add_object(ua.NodeId("dev", ns), ua.QualifiedName("dev", ns))

    async def var(name: str, value: Any) -> Any:
        return await dev.add_variable(ua.NodeId(f"dev.{name}", ns), ua.QualifiedName(name, ns), value)

    await var("label", ua.Variant("hello", ua.VariantType.String))
    await var("count", ua.Variant(7, ua.VariantType.Int32))
    spectrum = await var("spectrum", ua.Variant([1.0, 2.0, 3.0], ua.VariantType.Double))
    # add_variable leaves a list's rank open; a PLC declares a one-dimensional array of 3.
    await spectrum.write_value_rank(ua.ValueRank.OneDimension)
    await spectrum.write_array_dimensions([3])
    await var("running", ua.Variant(True, ua.VariantType.Boolean))
    await var("Motor Temp (°C)", ua.Variant(40.5, ua.VariantType.Double))
    # A browse name YAML would read as a boolean unless quoted.
    await var("true", ua.Variant(1.0, ua.VariantType.Double))
    speed = await var("speed", ua.Variant(1450.0, ua.VariantType.Double))
    eu = ua.EUInformation(NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact", UnitId=5395027)
    eu.DisplayName = ua.LocalizedText("rpm")
    await speed.add_property(ua.NodeId("dev.speed.eu", ns), ua.QualifiedName("EngineeringUnits", 0), eu)
    await server.start()
    return server


@pytest.fixture(scope="module")
def device() -> Iterator[str]:
    """The small server, run on its own loop in a thread so the command can call asyncio.run itself."""
    port = free_port()
    started = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop
        try:
            server = await _build_device(port)
        finally:
            started.set()
        try:
            await stop.wait()
        finally:
            await server.stop()

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # handed to the test thread below
            state["error"] = exc

    thread = threading.Thread(target=main, name="test-browse-server")
    thread.start()
    try:
        assert started.wait(30), "test server did not start"
        assert "error" not in state, state.get("error")
        yield f"opc.tcp://127.0.0.1:{port}/"
    finally:
        if "loop" in state:
            with contextlib.suppress(RuntimeError):
                state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


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
    assert all(line.startswith(("0:", "  ")) and not line.startswith("   ") for line in lines), "one level only"
    browse([plc, "--root", "2:pump02"])
    by_path = capsys.readouterr().out
    browse([plc, "--root", "ns=2;s=pump02"])
    assert capsys.readouterr().out == by_path
    assert by_path.splitlines()[0] == "2:pump02  Object  ns=2;s=pump02"
    assert len(by_path.splitlines()) == 1 + len(TAGS)


def _yaml_tags(endpoint: str, obj: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, list[dict[str, Any]]]:
    assert browse([endpoint, "--yaml", obj]) == 0
    out = capsys.readouterr().out
    return out, yaml.safe_load(out)["tags"]


def test_yaml_node_ids_read_the_same_values_as_browse_paths(plc: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, tags = _yaml_tags(plc, "2:pump01", capsys)
    assert [t["name"] for t in tags] == list(TAGS)
    assert all(t["unit"] == "" for t in tags)

    async def read_both() -> tuple[list[Any], list[Any]]:
        async with Client(plc, timeout=4) as client:
            by_id = await client.read_values([client.get_node(t["node_id"]) for t in tags])
            by_path = [
                await (await client.nodes.objects.get_child(["2:pump01", f"2:{tag}"])).read_value() for tag in TAGS
            ]
        return by_id, by_path

    by_id, by_path = asyncio.run(read_both())
    assert all(isinstance(v, float) for v in by_id)
    assert by_id == by_path


def test_yaml_pasted_into_a_config_passes_check(plc: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    assert "  2:running  Variable  ns=2;s=dev.running  Boolean  scalar" in lines
    assert "    0:EngineeringUnits  Variable  ns=2;s=dev.speed.eu  EUInformation  scalar" in lines


def test_yaml_keeps_numbers_and_comments_out_the_rest(device: str, capsys: pytest.CaptureFixture[str]) -> None:
    out, tags = _yaml_tags(device, "dev", capsys)
    assert {t["name"]: t["node_id"] for t in tags} == {
        "count": "ns=2;s=dev.count",
        "running": "ns=2;s=dev.running",
        "Motor_Temp_C_": "ns=2;s=dev.Motor Temp (°C)",
        "true": "ns=2;s=dev.true",
        "speed": "ns=2;s=dev.speed",
    }
    assert {t["name"]: t["unit"] for t in tags}["speed"] == "rpm"
    comments = [line for line in out.splitlines() if line.lstrip().startswith("# -")]
    assert len(comments) == 2
    assert any("ns=2;s=dev.label" in c and "String is not numeric" in c for c in comments)
    assert any("ns=2;s=dev.spectrum" in c and "array[3], not a scalar" in c for c in comments)


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
