"""`edge-gateway bench`: acquisition, inference and publish figures on this device, in one run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from asyncua import Client

from gateway.config import load_config
from gateway.demo.broker import MosquittoBroker, find_mosquitto
from gateway.demo.run import demo_config, free_port, simulator_process, write_config
from gateway.demo.signals import TAGS
from gateway.errors import GatewayError

# Windows need window.length samples before the first inference; measure after they are full.
WARMUP_S = 5.0


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _counter_totals(status: dict[str, Any]) -> tuple[int, int]:
    values = sum(int(s["values"]) for s in status["sources"].values())
    return values, int(status["counters"]["windows_inferred"])


async def naive_reader(endpoint: str, node_ids: list[str], seconds: float) -> tuple[int, float]:
    """The baseline: values read and CPU seconds spent by a reader that sends one Read per node."""
    client = Client(endpoint, timeout=10)
    await client.connect()
    try:
        nodes = [client.get_node(n) for n in node_ids]
        me = psutil.Process()
        cpu0, deadline, values = _cpu_seconds(me), time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            for node in nodes:
                await node.read_data_value()
                values += 1
                if time.monotonic() >= deadline:
                    break
        return values, _cpu_seconds(me) - cpu0
    finally:
        await client.disconnect()


async def measure(
    *, tags: int, hz: float, seconds: float, workdir: Path, mode: str = "poll", naive_seconds: float = 5.0
) -> dict[str, Any]:
    """Run simulator (own process), broker and gateway (this process); return the figures."""
    from gateway.app import Gateway

    pumps = math.ceil(tags / len(TAGS))
    opc_port, mqtt_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(MosquittoBroker(mqtt_port, workdir=workdir / "mosquitto"))
        # --fast-read: the simulator answers the gateway's repeated Read from arrays, so the figures
        # measure the gateway rather than asyncua's server.
        sim = stack.enter_context(
            simulator_process(
                opc_port, pumps=pumps, rate_hz=hz, extra=["--no-fault", "--no-bad-data", "--fast-read"]
            )
        )
        cfg_dict = demo_config(
            opc_port=opc_port, mqtt_port=mqtt_port, db_path=workdir / "bench.db", pumps=pumps
        )
        period_ms = max(10, round(1000 / hz))
        if mode == "subscribe":
            cfg_dict["sources"][0].update(mode="subscribe", publishing_interval_ms=period_ms)
        else:
            cfg_dict["sources"][0]["poll_interval_ms"] = period_ms
        for asset in cfg_dict["assets"]:
            asset["sample_rate_hz"] = hz
        cfg = load_config(write_config(cfg_dict, workdir / "config.yaml"))
        gateway = Gateway(cfg)
        shutdown = asyncio.Event()
        task = asyncio.ensure_future(gateway.run(shutdown))
        try:
            await asyncio.wait({task}, timeout=WARMUP_S)
            if task.done():
                raise GatewayError(f"gateway stopped during warm-up: {task.exception() or task.result()}")
            me, sim_proc, broker_proc = psutil.Process(), psutil.Process(sim.pid), psutil.Process(broker.pid)
            gateway.latency.clear()
            values0, windows0 = _counter_totals(gateway.status())
            cpu0, sim0, brk0 = _cpu_seconds(me), _cpu_seconds(sim_proc), _cpu_seconds(broker_proc)
            t0 = time.monotonic()
            await asyncio.wait({task}, timeout=seconds)
            elapsed = time.monotonic() - t0
            values1, windows1 = _counter_totals(gateway.status())
            cpu1, sim1, brk1 = _cpu_seconds(me), _cpu_seconds(sim_proc), _cpu_seconds(broker_proc)
            status = gateway.status()
            # Read before shutdown: windows caught in the stop sequence are not steady-state figures.
            p50, p99, n_latency = (
                gateway.latency.percentile(50),
                gateway.latency.percentile(99),
                len(gateway.latency),
            )
        finally:
            shutdown.set()
            await task
        node_ids = [t.node_id for a in cfg.assets for t in a.tags]
        naive = (
            await naive_reader(cfg.sources[0].endpoint, node_ids, naive_seconds)
            if naive_seconds > 0
            else None
        )
    n_tags = pumps * len(TAGS)
    per_cpu_s = (values1 - values0) / max(1e-9, cpu1 - cpu0)
    naive_per_cpu_s = naive[0] / max(1e-9, naive[1]) if naive else None
    return {
        "tags": n_tags,
        "hz": hz,
        "mode": mode,
        "seconds": round(elapsed, 2),
        "values_per_s": round((values1 - values0) / elapsed, 1),
        "delivered_fraction": round((values1 - values0) / (n_tags * hz * elapsed), 5),
        "windows_per_s": round((windows1 - windows0) / elapsed, 1),
        "latency_p50_ms": None if p50 is None else round(p50 * 1e3, 2),
        "latency_p99_ms": None if p99 is None else round(p99 * 1e3, 2),
        "latency_samples": n_latency,
        "cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "plc_cpu_percent": round(100 * (sim1 - sim0) / elapsed, 1),
        "broker_cpu_percent": round(100 * (brk1 - brk0) / elapsed, 1),
        "values_per_cpu_s": round(per_cpu_s),
        "naive_values_per_cpu_s": None if naive_per_cpu_s is None else round(naive_per_cpu_s),
        "batched_vs_naive": None if naive_per_cpu_s is None else round(per_cpu_s / naive_per_cpu_s, 1),
        "missed_ticks": status["counters"]["missed_ticks"],
        "scores_dropped": status["counters"]["scores_dropped"],
        "backend": next(iter(gateway.models.values())).backend.name,
        "machine": f"{platform.machine()} {psutil.cpu_count()} cpu, Python {platform.python_version()}",
    }


def render(r: dict[str, Any]) -> str:
    """The figures as a short human-readable block."""
    lat = (
        f"p50 {r['latency_p50_ms']:.2f} ms  p99 {r['latency_p99_ms']:.2f} ms  ({r['latency_samples']} windows)"
        if r["latency_p50_ms"] is not None
        else "no windows published"
    )
    return "\n".join(
        [
            f"edge-gateway bench: {r['tags']} tags at {r['hz']:g} Hz ({r['mode']}) for {r['seconds']:.1f} s "
            f"on {r['machine']}, "
            f"inference {r['backend']}",
            f"  values acquired        {r['values_per_s']:>10,.0f}/s   ({100 * r['delivered_fraction']:.2f}% of expected)",
            f"  windows inferred       {r['windows_per_s']:>10,.1f}/s",
            f"  acquisition -> PUBACK  {lat}",
            f"  gateway CPU            {r['cpu_percent']:>9.1f}%  of one core   peak RSS {r['peak_rss_mb']:.0f} MB",
            f"  simulated PLC CPU      {r['plc_cpu_percent']:>9.1f}%   broker CPU {r['broker_cpu_percent']:.1f}%",
            f"  values per CPU-second  {r['values_per_cpu_s']:>10,}"
            + (
                f"   naive one-Read-per-node reader {r['naive_values_per_cpu_s']:,} ({r['batched_vs_naive']}x)"
                if r["naive_values_per_cpu_s"] is not None
                else ""
            ),
            f"  missed sample ticks    {r['missed_ticks']:>10}   scores dropped {r['scores_dropped']}",
        ]
    )


async def run_bench(
    *, tags: int, hz: float, seconds: float, as_json: bool, mode: str = "poll", naive_seconds: float = 5.0
) -> int:
    """CLI entry: run one measurement and print it."""
    if find_mosquitto() is None:
        raise GatewayError("the benchmark needs the mosquitto broker: apt-get install mosquitto")
    logging.getLogger("gateway").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="edge-gateway-bench-") as wd:
        result = await measure(
            tags=tags, hz=hz, seconds=seconds, workdir=Path(wd), mode=mode, naive_seconds=naive_seconds
        )
    print(json.dumps(result) if as_json else render(result))
    return 0
