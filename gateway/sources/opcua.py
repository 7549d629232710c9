"""OPC-UA polling source: one Read per tick for all of a source's tags, and its own reconnect.

Polling (not subscriptions) because the gateway samples at a fixed rate anyway: one Read of N nodes
is one request and one response, while a subscription delivers N separate notifications. The
request is encoded once and responses are decoded with NumPy (see uabinary): together they cost well
under a microsecond per tag instead of about ten. A server whose MaxNodesPerRead operation limit is
below the tag count gets the tick as several Read requests, sent together so they pipeline.

Tags are resolved on every connect (see nodes): namespace URIs, browse paths, and each node's data
type. A tag that cannot be read as a number is left out of the Read and keeps its Bad status until
the next connect; a value whose type differs from its node's data type is stored as BadTypeMismatch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from asyncua import Client, ua
from asyncua.common.utils import Buffer

from gateway.config import SourceConfig
from gateway.errors import GatewayError, SourceError
from gateway.latest import BAD_COMMUNICATION_ERROR, BAD_NOT_CONNECTED, LatestValues, tag_rows
from gateway.sources.nodes import Resolved, parse_node_ref, resolve
from gateway.sources.security import connect_client, new_client
from gateway.sources.uabinary import EncodedRead, ReadDecoder
from gateway.tasks import Pulse, backoff_delay, wait_event

logger = logging.getLogger(__name__)

# Read results that mean the configuration, not the plant, is wrong: reported once per connection.
_CONFIG_ERRORS = frozenset(
    {
        ua.StatusCodes.BadNodeIdUnknown,
        ua.StatusCodes.BadNodeIdInvalid,
        ua.StatusCodes.BadAttributeIdInvalid,
        ua.StatusCodes.BadNotReadable,
        ua.StatusCodes.BadUserAccessDenied,
    }
)
_MAX_TAG_LINES = 10
_HEALTH_PERIOD_NS = 1_000_000_000
# Bad (10) and the reserved severity 11 both set the top bit.
_BAD_SEVERITY = 0x80000000
# Nodes per Read while resolving tags on a server that states no MaxNodesPerRead.
_DEFAULT_MAX_PER_READ = 1000
# A session ends and a reconnect starts on these; anything else is a bug and ends the task.
_IO_ERRORS = (OSError, asyncio.TimeoutError, ua.UaError, SourceError)
_HEALTH_KEYS = (
    "connected", "last_error", "last_read_at", "reads_per_s", "values_per_s", "bad_by_status", "reconnects"
)


async def read_operation_limit(client: Client, limit_id: int) -> int | None:
    """One OperationLimits variable (its ObjectIds number) in one Read; None where the server sets none."""
    node = ua.NodeId(ua.Int32(limit_id))
    params = ua.ReadParameters(NodesToRead=[ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value)])
    results = await client.uaclient.read(params)
    if len(results) != 1 or results[0].Value is None:
        return None
    status = results[0].StatusCode
    if status is not None and not status.is_good():
        return None
    limit = results[0].Value.Value
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        return None
    return limit


async def read_max_nodes_per_read(client: Client) -> int | None:
    """The server's MaxNodesPerRead operation limit in one Read; None where it sets none (0, missing, Bad)."""
    return await read_operation_limit(
        client, ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead
    )


@dataclass(frozen=True)
class SourceTag:
    """One tag to read: its first row in LatestValues, its node id string and, for a 1-D array, its length.

    An array tag fills `array_length` consecutive rows from `index`, one per element.
    """

    index: int
    node_id: str
    array_length: int | None = None

    @property
    def width(self) -> int:
        """Rows of the table this tag fills."""
        return self.array_length or 1


@dataclass
class HealthStats:
    """The health figures every source reports (status output, the periodic health log line)."""

    connected: bool = False
    connects: int = 0
    connect_errors: int = 0
    # Channel values stored: one per scalar tag, one per array element.
    values: int = 0
    last_error: str | None = None
    # Refreshed at most once per second while values arrive, on connect, on disconnect and by health().
    last_read_at: str | None = None  # UTC ISO 8601 time values last arrived
    # Deliveries (Read responses, or publish responses with data) and values per second.
    reads_per_s: float = 0.0
    values_per_s: float = 0.0
    # Tags of this source now carrying each Bad status, by status name.
    bad_by_status: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0


@dataclass
class SourceStats(HealthStats):
    """Counters of one polling source, read by status reporting and tests."""

    reads: int = 0
    # Read service calls: one per chunk of at most chunk_size nodes, so reads * chunks per tick.
    read_requests: int = 0
    # Nodes per Read in effect: the tag count, capped by the server's MaxNodesPerRead and the config.
    chunk_size: int | None = None
    read_errors: int = 0
    missed_ticks: int = 0
    # Read responses decoded by the NumPy fast path / by asyncua's generic decoder (strings, ...).
    fast_decodes: int = 0
    slow_decodes: int = 0


class OpcUaSource:
    """The session life every OPC-UA source shares: connect, acquire, mark tags Bad, back off, retry.

    Subclasses implement `_acquire` (the connected part of a session) and `_count_session_error`.
    """

    stats: HealthStats

    def __init__(self, cfg: SourceConfig, tags: Sequence[SourceTag], latest: LatestValues) -> None:
        if not tags:
            raise SourceError(f"source {cfg.name}: no tags to read")
        refs = []
        for tag in tags:
            if not (0 <= tag.index and tag.index + tag.width <= len(latest)):
                raise SourceError(
                    f"source {cfg.name}: tag {tag.node_id!r} has index {tag.index} outside the table"
                )
            try:
                refs.append(parse_node_ref(tag.node_id))
            except ValueError as exc:
                raise SourceError(
                    f"source {cfg.name}: invalid node id {tag.node_id!r} (tag #{tag.index}): {exc}"
                ) from exc
        # Ids by namespace URI or browse path are known only once connected (_resolve_tags); until
        # then they stand as the null node, which no server has.
        nodes = [r.node_id if r.uri is None and not r.path else ua.NodeId() for r in refs]
        self.name = cfg.name
        self.cfg = cfg
        self.tags = tuple(tags)
        self.latest = latest
        self._first = np.array([t.index for t in tags], dtype=np.intp)
        self._width = np.array([t.width for t in tags], dtype=np.intp)
        # Per tag: 0 for a scalar, else the exact length its array values must have.
        self._lengths = [t.array_length or 0 for t in tags]
        self._rows = tag_rows(self._first, self._width)
        self._refs = refs
        self._nodes: list[ua.NodeId] = nodes
        self._connected = asyncio.Event()
        # Samplers of this source's assets wake on it, so a sample is taken as soon as values land.
        self.updated = Pulse()
        self._failures = 0
        self._previous_error: str | None = None
        self._deliveries = 0
        self._last_delivery_time: float | None = None
        # (monotonic ns, deliveries, values) at the last health refresh: the rates' window start.
        self._rate_since = (time.monotonic_ns(), 0, 0)

    def rows_of(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """The table rows of the tags at `positions` (indexes into `tags`), an array's rows in element order."""
        pos = np.asarray(positions, dtype=np.intp)
        return tag_rows(self._first[pos], self._width[pos])

    async def wait_connected(self, timeout: float) -> bool:
        """True once a session is up and its first values are stored, False if `timeout` s pass first."""
        return await wait_event(self._connected, timeout)

    async def run(self) -> None:
        """Connect, acquire and reconnect until cancelled; tags are Bad whenever there is no session."""
        try:
            while True:
                await self._session()
                delay = self._backoff()
                self._log_failure(delay)
                await asyncio.sleep(delay)
        finally:
            self._set_disconnected(BAD_NOT_CONNECTED)

    async def _session(self) -> None:
        """One connection's life: returns after a failure (already recorded), raises only CancelledError."""
        # Without the library's auto-reconnect, which would race this loop's own; see run().
        client = new_client(self.cfg)
        lost: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        async def on_lost(exc: Exception) -> None:
            if not lost.done():
                lost.set_result(exc)

        client.connection_lost_callback = on_lost
        opened = False
        try:
            try:
                await asyncio.wait_for(connect_client(client, self.cfg), self.cfg.timeout_s)
            except _IO_ERRORS as exc:
                self.stats.connect_errors += 1
                self._fail(exc, BAD_NOT_CONNECTED)
                return
            opened = True
            self.stats.connects += 1
            try:
                await self._acquire(client, lost)
            except _IO_ERRORS as exc:
                self._count_session_error()
                self._fail(exc, BAD_COMMUNICATION_ERROR)
        finally:
            await self._close(client, opened)

    async def _acquire(self, client: Client, lost: asyncio.Future[Exception]) -> None:
        """Keep the tags current over a connected `client` until an I/O error, which it raises."""
        raise NotImplementedError

    def _count_session_error(self) -> None:
        """Count a failure after the connect in the subclass's own stats."""
        raise NotImplementedError

    def _mark_connected(self) -> None:
        """The session delivers values: reset the backoff and wake wait_connected()."""
        self._failures = 0
        self.stats.connected = True
        self.stats.last_error = None
        self._connected.set()

    async def _resolve_tags(self, client: Client) -> tuple[list[Resolved], int | None]:
        """Resolve every tag on the server now connected: namespace URIs, browse paths, data types.

        Called once per session, since a reprogrammed PLC may renumber its namespaces. Tags that
        cannot be read get their status in the table until the next connect and one log line each;
        `_nodes` holds the resolved ids afterwards (the null node for the others). Also returns the
        server's MaxNodesPerRead (None: no limit), which the resolving Reads already respect.
        """
        server_limit = await read_max_nodes_per_read(client)
        limits = [x for x in (server_limit, self.cfg.max_nodes_per_read) if x is not None]
        arrays = [bool(n) for n in self._lengths]
        resolved = await resolve(client, self._refs, min(limits, default=_DEFAULT_MAX_PER_READ), arrays)
        self._nodes = [ua.NodeId() if r.node_id is None else r.node_id for r in resolved]
        bad = [i for i, r in enumerate(resolved) if r.problem is not None]
        if bad:
            self._store_status(bad, [resolved[i].status for i in bad])
            self._report_tags([(i, str(resolved[i].problem)) for i in bad])
        return resolved, server_limit

    def _store_status(self, positions: Sequence[int], codes: Sequence[int]) -> None:
        """Store one status (and NaN) on every row of the tags at `positions`, e.g. why they cannot be read."""
        rows = self.rows_of(positions)
        status = np.repeat(np.array(codes, dtype=np.uint32), self._width[list(positions)])
        nan, zero = np.full(len(rows), np.nan), np.zeros(len(rows), dtype=np.int64)
        self.latest.write(rows, nan, status, zero, time.monotonic_ns())
        self.updated.notify()

    def _report_tags(self, problems: Sequence[tuple[int, str]]) -> None:
        """One warning per (tag position, reason), the first few only, then a count."""
        for i, reason in problems[:_MAX_TAG_LINES]:
            logger.warning("source %s: tag %s: %s", self.name, self.tags[i].node_id, reason)
        if len(problems) > _MAX_TAG_LINES:
            logger.warning(
                "source %s: %d more tags cannot be read", self.name, len(problems) - _MAX_TAG_LINES
            )

    def _fail(self, exc: BaseException, status: int) -> None:
        """Record why the session ended and flag every tag of this source Bad."""
        if isinstance(exc, asyncio.TimeoutError):
            reason = f"no answer within {self.cfg.timeout_s:g} s"
        elif isinstance(exc, GatewayError):  # our own messages are already written for a person
            reason = str(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._previous_error = self.stats.last_error
        self.stats.last_error = reason
        self._set_disconnected(status)

    def _set_disconnected(self, status: int) -> None:
        self.stats.connected = False
        self._connected.clear()
        self.latest.mark_bad(self._rows, status, time.monotonic_ns())
        self.updated.notify()
        self._refresh_health()
        self.stats.reads_per_s = self.stats.values_per_s = 0.0

    def _delivered(self, rows: np.ndarray, value: np.ndarray, status: np.ndarray, source_ts: np.ndarray) -> None:
        """Store one delivery (a Read's or a publish response's values) with one write and count it."""
        recv_ns = time.monotonic_ns()
        self.latest.write(rows, value, status, source_ts, recv_ns)
        self.updated.notify()
        self._deliveries += 1
        self.stats.values += len(rows)
        self._last_delivery_time = time.time()
        if recv_ns - self._rate_since[0] >= _HEALTH_PERIOD_NS:
            self._refresh_health()

    def _refresh_health(self) -> None:
        """Update the rates (since the last refresh), the last delivery time and the Bad tags by status."""
        now = time.monotonic_ns()
        since, deliveries, values = self._rate_since
        if now > since:
            self.stats.reads_per_s = (self._deliveries - deliveries) * 1e9 / (now - since)
            self.stats.values_per_s = (self.stats.values - values) * 1e9 / (now - since)
        self._rate_since = (now, self._deliveries, self.stats.values)
        if self._last_delivery_time is not None:
            stamp = datetime.fromtimestamp(self._last_delivery_time, timezone.utc)
            self.stats.last_read_at = stamp.isoformat(timespec="milliseconds")
        self.stats.reconnects = max(self.stats.connects - 1, 0)
        # Per tag: every row of an array tag carries the tag's status.
        codes, counts = np.unique(self.latest.status[self._first], return_counts=True)
        self.stats.bad_by_status = {
            ua.StatusCode(ua.UInt32(c)).name: n
            for c, n in zip(codes.tolist(), counts.tolist(), strict=True)
            if c & _BAD_SEVERITY
        }

    def health(self) -> dict[str, Any]:
        """The health figures now: connected, last delivery, rates, Bad tags by status, reconnects."""
        if time.monotonic_ns() - self._rate_since[0] >= _HEALTH_PERIOD_NS:
            self._refresh_health()
        return {k: getattr(self.stats, k) for k in _HEALTH_KEYS}

    def health_line(self) -> str:
        """The health figures as one log line, e.g. `source plc1: connected, 80 values/s, ...`."""
        h = self.health()
        if h["connected"]:
            state = f"connected, {h['values_per_s']:.0f} values/s in {h['reads_per_s']:.1f} deliveries/s"
        else:
            state = f"DISCONNECTED ({self.stats.last_error or 'not connected yet'})"
        bad = ", ".join(f"{n} {name}" for name, n in sorted(h["bad_by_status"].items())) or "none"
        return (
            f"source {self.name}: {state}, last values at {h['last_read_at'] or 'never'}, "
            f"Bad tags: {bad}, {h['reconnects']} reconnect(s)"
        )

    def status(self) -> dict[str, Any]:
        """Every counter of this source, with the health figures refreshed when stale."""
        self.health()
        return vars(self.stats).copy()

    def _log_failure(self, delay: float) -> None:
        # A PLC that stays off would repeat the same line every backoff period; say it once.
        level = logging.DEBUG if self.stats.last_error == self._previous_error else logging.WARNING
        logger.log(level, "source %s: %s; retrying in %.1f s", self.name, self.stats.last_error, delay)

    def _backoff(self) -> float:
        """Capped exponential backoff with jitter, from reconnect_min_s up to reconnect_max_s."""
        delay = backoff_delay(self._failures, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        self._failures += 1
        return delay

    async def _close(self, client: Client, opened: bool) -> None:
        """Close the session politely when it is up, bounded so a stuck server cannot hang us."""
        try:
            if opened:
                await asyncio.wait_for(client.disconnect(), self.cfg.timeout_s)
        except _IO_ERRORS as exc:
            logger.debug("source %s: disconnect: %r", self.name, exc)
        finally:
            client.disconnect_socket()


class OpcUaPollSource(OpcUaSource):
    """Polls all tags of one OPC-UA server into LatestValues: one Read per tick, chunked to the limits."""

    stats: SourceStats

    def __init__(self, cfg: SourceConfig, tags: Sequence[SourceTag], latest: LatestValues) -> None:
        super().__init__(cfg, tags, latest)
        self.stats = SourceStats()
        # Built at connect, once the tags are resolved and the server's MaxNodesPerRead is known.
        self._chunks: list[tuple[EncodedRead, ReadDecoder]] = []
        # The tags in the Read (the resolved ones), their table rows, and the arrays decoders fill
        # (aligned with the rows, so one tick is stored with one write).
        self._read_pos: list[int] = []
        self._read_idx = self._rows[:0]
        self._read_value = np.zeros(0)
        self._read_status = np.zeros(0, dtype=np.uint32)
        self._read_ts = np.zeros(0, dtype=np.int64)
        self._slot_start = np.zeros(1, dtype=np.intp)

    async def _acquire(self, client: Client, lost: asyncio.Future[Exception]) -> None:
        """Resolve the tags and plan the Read chunks for this server, then poll until an I/O error."""
        resolved, server_limit = await self._resolve_tags(client)
        self._plan_chunks(resolved, server_limit)
        await self._poll(client, lost)

    def _count_session_error(self) -> None:
        self.stats.read_errors += 1

    async def _poll(self, client: Client, lost: asyncio.Future[Exception]) -> None:
        """Read on a fixed grid of the monotonic clock; a late read skips the ticks it overran."""
        period = self.cfg.poll_interval_ms / 1000.0
        t0 = time.monotonic()
        tick = 0
        while True:
            await self._read(client)
            if not self._connected.is_set():
                self._on_first_read()
            tick += 1
            delay = t0 + tick * period - time.monotonic()
            if delay < 0:
                skipped = int(-delay / period)
                tick += skipped
                self.stats.missed_ticks += skipped
                continue
            # Waiting on the loss signal instead of sleeping marks the tags Bad as soon as the server goes.
            await asyncio.wait((lost,), timeout=delay)
            if lost.done():
                raise lost.result()

    def _plan_chunks(self, resolved: Sequence[Resolved], server_limit: int | None) -> None:
        """Split the resolved tags into Reads of at most the server's and the config's MaxNodesPerRead."""
        pos = self._read_pos = [i for i, r in enumerate(resolved) if r.problem is None]
        n = len(pos)
        self._read_idx = self.rows_of(pos)
        m = len(self._read_idx)
        self._read_value = np.full(m, np.nan)
        self._read_status = np.zeros(m, dtype=np.uint32)
        self._read_ts = np.zeros(m, dtype=np.int64)
        # Where each read tag's rows start among the read rows; an array tag fills several.
        self._slot_start = np.concatenate([[0], np.cumsum(self._width[pos])]).astype(np.intp)
        nodes = [self._nodes[i] for i in pos]
        types = [resolved[i].variant_type for i in pos]
        lengths = [self._lengths[i] for i in pos]
        size = min(x for x in (n, server_limit, self.cfg.max_nodes_per_read) if x is not None)
        self._chunks = [
            self._chunk(nodes, types, lengths, start, min(start + size, n)) for start in range(0, n, max(size, 1))
        ]
        self.stats.chunk_size = size

    def _chunk(
        self, nodes: Sequence[ua.NodeId], types: Sequence[int], lengths: Sequence[int], start: int, stop: int
    ) -> tuple[EncodedRead, ReadDecoder]:
        """The Read of nodes start..stop-1, encoded once (every tick sends the same), and its decoder."""
        params = ua.ReadParameters(
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            NodesToRead=[
                ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value) for node in nodes[start:stop]
            ],
        )
        rows = slice(self._slot_start[start], self._slot_start[stop])
        out = (self._read_value[rows], self._read_status[rows], self._read_ts[rows])
        decoder = ReadDecoder(stop - start, out=out, expected=types[start:stop], lengths=lengths[start:stop])
        return EncodedRead(params), decoder

    async def _read(self, client: Client) -> None:
        """One Read per chunk, all sent at once to pipeline on the channel; stored in one write."""
        chunks = self._chunks
        uaclient = client.uaclient
        self.stats.read_requests += len(chunks)
        bodies: list[Buffer | BaseException]
        if len(chunks) == 1:
            bodies = [await chunks[0][0].send(uaclient)]
        else:
            # Every answer is awaited even when one fails, so no request outlives its tick.
            bodies = await asyncio.gather(*(req.send(uaclient) for req, _ in chunks), return_exceptions=True)
        for (_, decoder), body in zip(chunks, bodies, strict=True):
            if isinstance(body, BaseException):
                raise body
            if decoder.decode(body):
                self.stats.fast_decodes += 1
            else:
                self.stats.slow_decodes += 1
        # Written only once every chunk is decoded: samplers never see half a tick.
        self.stats.reads += 1
        self._delivered(self._read_idx, self._read_value, self._read_status, self._read_ts)

    def _on_first_read(self) -> None:
        """The session works: say so once and name the tags the server does not know."""
        self._mark_connected()
        logger.info(
            "source %s: connected to %s, reading %d of %d tags in %d Read requests of up to %d nodes",
            self.name,
            self.cfg.endpoint,
            len(self._read_pos),
            len(self.tags),
            len(self._chunks),
            self.stats.chunk_size,
        )
        # Per read tag, the status of its first row (an array's rows share it).
        codes = self._read_status[self._slot_start[:-1]].tolist()
        self._report_tags(
            [
                (self._read_pos[k], ua.StatusCode(ua.UInt32(code)).name)
                for k, code in enumerate(codes)
                if code in _CONFIG_ERRORS
            ]
        )
        self._refresh_health()
