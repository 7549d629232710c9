"""One PLC that never answers must not stall the others."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.config import load_config
from gateway.demo.run import demo_config, write_config
from gateway.demo.simulator import PlcSimulator
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_gateway import running_gateway


async def black_hole(port: int) -> asyncio.AbstractServer:
    """A TCP server that accepts connections and never says a word (a hung PLC)."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # until the client gives up and closes
        finally:
            writer.close()

    return await asyncio.start_server(swallow, "127.0.0.1", port)


def test_a_source_that_never_answers_does_not_stall_the_others(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    ports = [free_port(), free_port(), free_port()]
    raw = demo_config(opc_port=ports[0], mqtt_port=mosquitto.port, db_path=tmp_path / "gw.db")
    raw["sources"] = [
        {"name": f"plc{i + 1}", "endpoint": f"opc.tcp://127.0.0.1:{p}/", "timeout_s": 1.0, "reconnect_max_s": 1.0}
        for i, p in enumerate(ports)
    ]
    # pump01, pump02 on plc1; pump03 on plc2 (as pump01/02 of its own server); pump04 on the hung plc3.
    for asset, source, pump in [(0, "plc1", 1), (1, "plc1", 2), (2, "plc2", 1), (3, "plc3", 1)]:
        raw["assets"][asset]["source"] = source
        for tag in raw["assets"][asset]["tags"]:
            tag["node_id"] = tag["node_id"].replace(tag["node_id"].split("=")[-1].split(".")[0], f"pump{pump:02d}")
    cfg = load_config(write_config(raw, tmp_path / "c.yaml"))
    quiet = {"fault_pump": None, "bad_tag": None, "nan_tag": None}

    async def scenario() -> tuple[dict, dict]:
        hung = await black_hole(ports[2])
        try:
            async with PlcSimulator(port=ports[0], n_pumps=2, **quiet), PlcSimulator(port=ports[1], n_pumps=1, **quiet):
                async with running_gateway(cfg) as run:
                    gateway = run.gateway
                    plc1, plc2, plc3 = gateway.sources
                    await wait_for_condition(lambda: plc3.stats.connect_errors >= 1, 60, "a first failed connect")
                    start = plc1.stats.reads, plc2.stats.reads
                    # Two more connect attempts to the hung PLC, each blocked for its whole timeout ...
                    await wait_for_condition(lambda: plc3.stats.connect_errors >= 3, 60, "two more failed connects")
                    reads = plc1.stats.reads - start[0], plc2.stats.reads - start[1]
                    healthy = [gateway.samplers[p] for p in ("pump01", "pump02", "pump03")]
                    await wait_for_condition(lambda: all(s.windows_emitted for s in healthy), 60, "windows")
                    status = gateway.status()
                assert run.code == 0
        finally:
            hung.close()
            await hung.wait_closed()
        return {"reads": reads}, status

    progress, status = asyncio.run(scenario())
    # ... during which the healthy PLCs kept being read (10 Hz polls over >= 2 s of blocked connects).
    assert min(progress["reads"]) >= 10, progress
    assert status["sources"]["plc3"]["connected"] is False
    assert "no answer" in (status["sources"]["plc3"]["last_error"] or "")
    assert status["sources"]["plc1"]["connected"] and status["sources"]["plc2"]["connected"]
    assert status["assets"]["pump04"]["windows"] == 0
