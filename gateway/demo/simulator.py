"""A simulated PLC: an asyncua server exposing a fleet of pumps, updated at a fixed rate.

Each pump is an object `pumpNN` under Objects with one Double variable per `signals.TAGS` entry,
addressed by string node ids `ns=2;s=pumpNN.<tag>` in the namespace `urn:edge-gateway:demo-plc`.
A schedule injects a bearing fault, a window of BadSensorFailure and a window of NaN values so the
gateway's handling of each can be demonstrated and tested.

With fast_read (`--fast-read`, what the benchmark runs) the values live in NumPy arrays
(fastread.ArrayVariables): the Read a poller repeats every tick is answered from them, subscriptions'
data-change notifications are found and encoded from them (fastpublish.ArrayNotifier), and every
other request reads the same latest values through asyncua, so the simulator, not asyncua's
per-value Read and notification handling, is what it costs.

Run it as its own process: `python -m gateway.demo.simulator --port 4840 --pumps 4`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import cast

import numpy as np
from asyncua import Server, ua
from asyncua.server.address_space import AttributeValue

from gateway.demo.fastread import ArrayVariables
from gateway.demo.signals import TAGS, PumpFleet

logger = logging.getLogger(__name__)

NAMESPACE_URI = "urn:edge-gateway:demo-plc"

_GOOD = ua.StatusCode(ua.UInt32(ua.StatusCodes.Good))
_BAD_SENSOR = ua.StatusCode(ua.UInt32(ua.StatusCodes.BadSensorFailure))
_ORGANIZES = ua.NodeId(ua.Int32(ua.ObjectIds.Organizes))
_BASE_OBJECT_TYPE = ua.NodeId(ua.Int32(ua.ObjectIds.BaseObjectType))
# What asyncua's own write path stores for a Bad status: the value is dropped (OPC 10000-4 7.7.1).
_NULL = ua.Variant(None, ua.VariantType.Null)
_DOUBLE = ua.VariantType.Double
_N_TAGS = len(TAGS)


def _string_node_id(name: str, ns: int) -> ua.NodeId:
    return ua.NodeId(ua.String(name), ua.Int16(ns))


def pump_name(pump: int) -> str:
    """Browse name of the 1-based pump number, e.g. 1 -> 'pump01'."""
    return f"pump{pump:02d}"


@dataclass
class SimulatorStats:
    """Counters of the update loop."""

    updates: int = 0
    missed_ticks: int = 0
    # Schedule time of the values now served, in seconds since start().
    sim_time_s: float = 0.0
    # Seconds spent computing and writing values, to report the per-value cost.
    busy_s: float = 0.0


class PlcSimulator:
    """An OPC-UA server with `n_pumps` pumps whose tags change every 1/rate_hz seconds."""

    def __init__(
        self,
        *,
        port: int,
        n_pumps: int = 4,
        rate_hz: float = 10.0,
        seed: int = 0,
        fault_pump: int | None = 2,
        fault_at_s: float = 20.0,
        fault_ramp_s: float = 10.0,
        bad_tag: tuple[int, str] | None = (3, "pressure"),
        bad_between_s: tuple[float, float] = (8.0, 14.0),
        nan_tag: tuple[int, str] | None = (4, "flow"),
        nan_between_s: tuple[float, float] = (16.0, 19.0),
        fast_read: bool = False,
    ) -> None:
        if n_pumps < 1:
            raise ValueError(f"n_pumps must be >= 1, got {n_pumps}")
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        if fault_pump is not None and not 1 <= fault_pump <= n_pumps:
            raise ValueError(f"fault_pump must be in 1..{n_pumps} or None, got {fault_pump}")
        self.port = port
        self.n_pumps = n_pumps
        self.rate_hz = rate_hz
        self.fault_pump = fault_pump
        self.fault_at_s = fault_at_s
        self.fault_ramp_s = fault_ramp_s
        self.bad_between_s = bad_between_s
        self.nan_between_s = nan_between_s
        self._bad_flat = self._flat_index(bad_tag, "bad_tag")
        self._nan_flat = self._flat_index(nan_tag, "nan_tag")
        self.fleet = PumpFleet(n_pumps, seed)
        self.fast_read = fast_read
        # With fast_read: the values every Read returns, and a status code per variable.
        self.variables: ArrayVariables | None = None
        self._status = np.zeros(n_pumps * _N_TAGS, dtype=np.uint32)
        self.stats = SimulatorStats()
        self.namespace_index = 2
        self.server: Server | None = None
        self._node_ids: list[ua.NodeId] = []
        # The address space's own value holders, written directly: 2-3x cheaper than write_attribute_value.
        self._attrs: list[AttributeValue] = []
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0

    def _flat_index(self, where: tuple[int, str] | None, what: str) -> int | None:
        if where is None:
            return None
        pump, tag = where
        if not 1 <= pump <= self.n_pumps or tag not in TAGS:
            raise ValueError(f"{what} must name a pump in 1..{self.n_pumps} and one of {TAGS}, got {where}")
        return (pump - 1) * _N_TAGS + TAGS.index(tag)

    @property
    def endpoint(self) -> str:
        """The URL clients connect to."""
        return f"opc.tcp://127.0.0.1:{self.port}/"

    @property
    def pumps(self) -> list[str]:
        """Pump names in order: pump01, pump02, ..."""
        return [pump_name(p) for p in range(1, self.n_pumps + 1)]

    @property
    def tags(self) -> list[str]:
        """Every variable's node id string, pump by pump in `signals.TAGS` order."""
        return [self.node_id(p, tag) for p in range(1, self.n_pumps + 1) for tag in TAGS]

    def node_id(self, pump: int, tag: str) -> str:
        """Node id string of a 1-based pump's tag, e.g. 'ns=2;s=pump01.vibration_x'."""
        return f"ns={self.namespace_index};s={pump_name(pump)}.{tag}"

    def data_value(self, pump: int, tag: str) -> ua.DataValue:
        """The DataValue a client Read of this 1-based pump's tag gets right now."""
        if self.server is None:
            raise RuntimeError("simulator is not running")
        row = (pump - 1) * _N_TAGS + TAGS.index(tag)
        if self.variables is not None:
            return self.variables.data_value(row)
        value = self._attrs[row].value
        assert value is not None, "every variable is written in start()"
        return value

    def fault_severity(self, t: float) -> float:
        """Bearing damage of the faulty pump at t seconds after start: 0 before fault_at_s, then a ramp to 1."""
        if t < self.fault_at_s:
            return 0.0
        if self.fault_ramp_s <= 0:
            return 1.0
        return min(1.0, (t - self.fault_at_s) / self.fault_ramp_s)

    async def start(self) -> None:
        """Build the address space, start accepting connections and start the update loop."""
        if self.server is not None:
            raise RuntimeError("simulator already started")
        # asyncua logs every request at INFO; keep an explicit setting if someone made one.
        server_log = logging.getLogger("asyncua.server")
        if server_log.level == logging.NOTSET:
            server_log.setLevel(logging.WARNING)
        began = time.perf_counter()
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("edge-gateway demo PLC")
        # A plain, anonymous endpoint: the secure ones would only log warnings about a missing certificate.
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_identity_tokens([ua.AnonymousIdentityToken])
        self.namespace_index = await server.register_namespace(NAMESPACE_URI)
        node_ids = await self._build_nodes(server)
        aspace = server.iserver.aspace
        self._node_ids = node_ids
        self._attrs = [aspace[nid].attributes[ua.AttributeIds.Value] for nid in node_ids]
        if self.fast_read:
            self.variables = ArrayVariables(server, node_ids)
        self.server = server
        try:
            await server.start()
        except BaseException:
            self.server = None
            self._close_variables()
            raise
        self._t0 = time.monotonic()
        await self.write_values(self.fleet.step(1.0 / self.rate_hz), 0.0)
        self._task = asyncio.create_task(self._run(), name=f"plc-simulator:{self.port}")
        logger.info(
            "simulated PLC at %s: %d pumps, %d tags, %.0f Hz (started in %.2f s)",
            self.endpoint,
            self.n_pumps,
            len(node_ids),
            self.rate_hz,
            time.perf_counter() - began,
        )

    async def _build_nodes(self, server: Server) -> list[ua.NodeId]:
        """One object per pump under Objects, each with its 8 Double variables."""
        ns = self.namespace_index
        session = server.iserver.isession
        node_ids: list[ua.NodeId] = []
        for p in range(1, self.n_pumps + 1):
            name = pump_name(p)
            # Node.add_object browses the parent on every call, quadratic in the number of pumps.
            item = ua.AddNodesItem(
                ParentNodeId=server.nodes.objects.nodeid,
                ReferenceTypeId=_ORGANIZES,
                RequestedNewNodeId=_string_node_id(name, ns),
                BrowseName=ua.QualifiedName(name, ns),
                NodeClass=ua.NodeClass.Object,
                NodeAttributes=ua.ObjectAttributes(DisplayName=ua.LocalizedText(name)),
                TypeDefinition=_BASE_OBJECT_TYPE,
            )
            (result,) = await session.add_nodes([item])
            result.StatusCode.check()
            pump = server.get_node(result.AddedNodeId)
            for tag in TAGS:
                var = await pump.add_variable(
                    _string_node_id(f"{name}.{tag}", ns), ua.QualifiedName(tag, ns), 0.0, varianttype=_DOUBLE
                )
                node_ids.append(var.nodeid)
        return node_ids

    async def stop(self) -> None:
        """Stop the update loop and the server; safe to call more than once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        server, self.server = self.server, None
        if server is not None:
            await server.stop()
        self._close_variables()

    def _close_variables(self) -> None:
        variables, self.variables = self.variables, None
        if variables is not None:
            variables.close()

    async def __aenter__(self) -> PlcSimulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _run(self) -> None:
        """Fixed-rate loop on the monotonic clock; late ticks are skipped and counted, never bursted."""
        period = 1.0 / self.rate_hz
        tick = 0
        while True:
            tick += 1
            delay = self._t0 + tick * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                steps = 1
            else:
                skipped = int(-delay / period)
                self.stats.missed_ticks += skipped
                tick += skipped
                steps = skipped + 1
                # Let clients' requests in between late ticks.
                await asyncio.sleep(0)
            began = time.perf_counter()
            t = tick * period
            if self.fault_pump is not None:
                self.fleet.fault[self.fault_pump - 1] = self.fault_severity(t)
            await self.write_values(self.fleet.step(steps * period), t)
            self.stats.busy_s += time.perf_counter() - began

    async def write_values(self, values: np.ndarray, t: float) -> None:
        """Publish one tick's values (n_pumps x len(TAGS)) as of schedule time `t` s, with the schedule's
        NaN (written into `values`) and Bad windows applied, stamped now; the update loop calls it every tick."""
        flat = values.ravel()
        if self._nan_flat is not None and self.nan_between_s[0] <= t < self.nan_between_s[1]:
            flat[self._nan_flat] = math.nan
        bad = self._bad_flat is not None and self.bad_between_s[0] <= t < self.bad_between_s[1]
        now = cast(ua.DateTime, datetime.now(timezone.utc))
        if self.variables is not None:
            if self._bad_flat is not None:
                self._status[self._bad_flat] = _BAD_SENSOR.value if bad else _GOOD.value
            await self.variables.update(flat, self._status, now)
        else:
            await self._store(flat, bad, now)
        self.stats.updates += 1
        self.stats.sim_time_s = t

    async def _store(self, flat: np.ndarray, bad: bool, now: ua.DateTime) -> None:
        """Store one DataValue per variable straight into the address space.

        A Read returns the stored DataValue as is. Variables with monitored items (subscriptions)
        go through write_attribute_value so their data-change notifications still fire.
        """
        server = self.server
        assert server is not None, "written only while running"
        DataValue, Variant = ua.DataValue, ua.Variant
        dvs = [DataValue(Variant(x, _DOUBLE), _GOOD, now, now) for x in flat.tolist()]
        if bad:
            assert self._bad_flat is not None
            dvs[self._bad_flat] = DataValue(_NULL, _BAD_SENSOR, now, now)
        for node_id, attr, dv in zip(self._node_ids, self._attrs, dvs, strict=True):
            if attr.datachange_callbacks:
                await server.write_attribute_value(node_id, dv)
            else:
                attr.value = dv


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.demo.simulator", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--port", type=int, default=4840, help="TCP port on 127.0.0.1 (default 4840)")
    parser.add_argument("--pumps", type=int, default=4, help="number of pumps, 8 tags each (default 4)")
    parser.add_argument("--rate", type=float, default=10.0, help="updates per second (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    fault = parser.add_mutually_exclusive_group()
    fault.add_argument(
        "--fault-pump", type=int, help="1-based pump that develops a bearing fault (default 2)"
    )
    fault.add_argument("--no-fault", action="store_true", help="no pump develops a fault")
    parser.add_argument("--fault-at", type=float, default=20.0, help="seconds after start the fault begins")
    parser.add_argument(
        "--no-bad-data", action="store_true", help="no Bad-status sensor (pump03) and no NaN sensor (pump04)"
    )
    parser.add_argument(
        "--fast-read",
        action="store_true",
        help="answer the Read a poller repeats and make subscriptions' notifications from NumPy arrays,"
        " not value by value (for benchmarks)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


async def _serve(sim: PlcSimulator) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with sim:
        # The address space is built and never freed: keep the collector from rescanning it each tick.
        gc.freeze()
        print(f"READY {sim.endpoint}", flush=True)
        await stop.wait()
        s = sim.stats
        logger.info(
            "stopping after %d updates (%d missed ticks, %.2f us per value)",
            s.updates,
            s.missed_ticks,
            1e6 * s.busy_s / max(1, s.updates) / (sim.n_pumps * len(TAGS)),
        )


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until SIGTERM or SIGINT; returns the process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    try:
        sim = PlcSimulator(
            port=args.port,
            n_pumps=args.pumps,
            rate_hz=args.rate,
            seed=args.seed,
            fault_pump=None if args.no_fault else args.fault_pump or min(2, args.pumps),
            fault_at_s=args.fault_at,
            # The default bad and NaN windows need pumps 3 and 4; smaller plants go without.
            bad_tag=(3, "pressure") if args.pumps >= 3 and not args.no_bad_data else None,
            nan_tag=(4, "flow") if args.pumps >= 4 and not args.no_bad_data else None,
            fast_read=args.fast_read,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(sim))
    except OSError as exc:
        print(f"error: cannot serve on port {args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
