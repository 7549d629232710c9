"""The simulated PLC: schedule (fault, Bad window, NaN window), client-visible values, CLI process."""

from __future__ import annotations

import asyncio
import math
import signal
import sys

import pytest
from asyncua import Client, ua

from gateway.demo.signals import TAGS
from gateway.demo.simulator import PlcSimulator
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_opcua import running_simulator

QUIET = {"fault_pump": None, "bad_tag": None, "nan_tag": None}


@pytest.mark.parametrize("fast_read", [False, True])
def test_address_space_layout_and_client_read(fast_read: bool) -> None:
    async def main() -> None:
        async with running_simulator(n_pumps=3, rate_hz=20, fast_read=fast_read, **QUIET) as sim:
            assert sim.namespace_index == 2
            assert sim.node_id(1, "vibration_x") == "ns=2;s=pump01.vibration_x"
            assert sim.pumps == ["pump01", "pump02", "pump03"]
            assert len(sim.tags) == 3 * len(TAGS)
            async with Client(sim.endpoint) as client:
                assert await client.get_namespace_index("urn:edge-gateway:demo-plc") == 2
                pump = await client.nodes.objects.get_child(["2:pump02"])
                names = sorted([(await child.read_browse_name()).Name for child in await pump.get_children()])
                assert names == sorted(TAGS)
                node = client.get_node(sim.node_id(2, "speed"))
                first = await node.read_data_value()
                updates = sim.stats.updates
                await wait_for_condition(lambda: sim.stats.updates > updates + 1)
                second = await node.read_data_value()
            assert first.StatusCode.is_good() and second.StatusCode.is_good()
            assert second.SourceTimestamp == second.ServerTimestamp
            assert first.Value.VariantType == ua.VariantType.Double
            assert second.SourceTimestamp > first.SourceTimestamp
            assert second.Value.Value != first.Value.Value

    asyncio.run(main())


def test_scheduled_fault_raises_vibration_of_the_faulty_pump() -> None:
    async def main() -> None:
        options = {"fault_pump": 2, "fault_at_s": 0.5, "fault_ramp_s": 0.5, "bad_tag": None, "nan_tag": None}
        async with running_simulator(n_pumps=4, rate_hz=20, **options) as sim:
            before = [sim.data_value(p, "vibration_x").Value.Value for p in (1, 2, 3, 4)]
            assert sim.stats.sim_time_s < 0.5
            assert before[1] < 2 * max(before[0], before[2], before[3])
            await wait_for_condition(lambda: sim.stats.sim_time_s >= 1.2)
            after = [sim.data_value(p, "vibration_x").Value.Value for p in (1, 2, 3, 4)]
        assert sim.fault_severity(0.4) == 0.0 and sim.fault_severity(1.0) == 1.0
        healthy = max(after[0], after[2], after[3])
        assert after[1] > 2 * healthy

    asyncio.run(main())


@pytest.mark.parametrize("fast_read", [False, True])
def test_bad_and_nan_windows(fast_read: bool) -> None:
    async def main() -> None:
        options = {
            "fast_read": fast_read,
            "fault_pump": None,
            "bad_tag": (1, "pressure"),
            "bad_between_s": (0.3, 0.8),
            "nan_tag": (2, "flow"),
            "nan_between_s": (1.0, 1.5),
        }
        async with running_simulator(n_pumps=2, rate_hz=20, **options) as sim:
            seen: dict[str, set[bool]] = {"bad": set(), "nan": set()}
            while sim.stats.sim_time_s < 1.8:
                t = sim.stats.sim_time_s
                pressure, flow = sim.data_value(1, "pressure"), sim.data_value(2, "flow")
                in_bad, in_nan = 0.3 <= t < 0.8, 1.0 <= t < 1.5
                expected = ua.StatusCodes.BadSensorFailure if in_bad else ua.StatusCodes.Good
                assert pressure.StatusCode.value == expected
                assert (pressure.Value.Value is None) == in_bad
                assert flow.StatusCode.is_good()
                assert math.isnan(flow.Value.Value) == in_nan
                assert sim.data_value(1, "flow").StatusCode.is_good()
                seen["bad"].add(in_bad)
                seen["nan"].add(in_nan)
                updates = sim.stats.updates
                await wait_for_condition(lambda n=updates: sim.stats.updates > n)
        # Every state was observed: inside and outside each window.
        assert seen == {"bad": {True, False}, "nan": {True, False}}

    asyncio.run(main())


def test_invalid_schedule_is_rejected() -> None:
    with pytest.raises(ValueError, match="fault_pump"):
        PlcSimulator(port=1, n_pumps=2, fault_pump=3, bad_tag=None, nan_tag=None)
    with pytest.raises(ValueError, match="bad_tag"):
        PlcSimulator(port=1, n_pumps=4, bad_tag=(1, "rpm"))


@pytest.mark.parametrize("extra", [[], ["--fast-read"]])
def test_cli_prints_ready_and_exits_cleanly_on_sigterm(extra: list[str]) -> None:
    async def main() -> None:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.demo.simulator",
            *("--port", str(port), "--pumps", "2", "--rate", "20", "--no-fault", *extra),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.decode().strip() == f"READY opc.tcp://127.0.0.1:{port}/"
            async with Client(f"opc.tcp://127.0.0.1:{port}/") as client:
                value = await client.get_node("ns=2;s=pump02.speed").read_value()
            assert value > 0
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            assert await proc.stdout.read() == b""
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    asyncio.run(main())
