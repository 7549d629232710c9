"""OPC-UA polling source: one Read per tick for all of a source's tags, and its own reconnect.

Polling (not subscriptions) because the gateway samples at a fixed rate anyway: one Read of N nodes
is one request and one response, while a subscription delivers N separate notifications. The
request is encoded once and responses are decoded with NumPy (see uabinary): together they cost well
under a microsecond per tag instead of about ten. A server whose MaxNodesPerRead operation limit is
below the tag count gets the tick as several Read requests, sent together so they pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from asyncua import Client, ua
from asyncua.common.utils import Buffer

from gateway.config import SourceConfig
from gateway.errors import GatewayError, SourceError
from gateway.latest import BAD_COMMUNICATION_ERROR, BAD_NOT_CONNECTED, LatestValues
from gateway.sources.security import connect_client
from gateway.sources.uabinary import EncodedRead, ReadDecoder
from gateway.tasks import Pulse, wait_event

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
_SESSION_TIMEOUT_MS = 60_000
# A session ends and a reconnect starts on these; anything else is a bug and ends the task.
_IO_ERRORS = (OSError, asyncio.TimeoutError, ua.UaError, SourceError)
_MAX_NODES_PER_READ = ua.NodeId(
    ua.Int32(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)
)


async def read_max_nodes_per_read(client: Client) -> int | None:
    """The server's MaxNodesPerRead operation limit in one Read; None where it sets none (0, missing, Bad)."""
    params = ua.ReadParameters(
        NodesToRead=[ua.ReadValueId(NodeId=_MAX_NODES_PER_READ, AttributeId=ua.AttributeIds.Value)]
    )
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


@dataclass(frozen=True)
class SourceTag:
    """One tag to read: its row in LatestValues and its node id string from the config."""

    index: int
    node_id: str


@dataclass
class SourceStats:
    """Health counters of one source, read by status reporting and tests."""

    connected: bool = False
    reads: int = 0
    # Read service calls: one per chunk of at most chunk_size nodes, so reads * chunks per tick.
    read_requests: int = 0
    # Nodes per Read in effect: the tag count, capped by the server's MaxNodesPerRead and the config.
    chunk_size: int | None = None
    read_errors: int = 0
    connects: int = 0
    connect_errors: int = 0
    missed_ticks: int = 0
    values: int = 0
    # Read responses decoded by the NumPy fast path / by asyncua's generic decoder (strings, arrays, ...).
    fast_decodes: int = 0
    slow_decodes: int = 0
    last_error: str | None = None


class OpcUaPollSource:
    """Polls all tags of one OPC-UA server into LatestValues: one Read per tick, chunked to the limits."""

    def __init__(self, cfg: SourceConfig, tags: Sequence[SourceTag], latest: LatestValues) -> None:
        if not tags:
            raise SourceError(f"source {cfg.name}: no tags to read")
        nodes = []
        for tag in tags:
            if not 0 <= tag.index < len(latest):
                raise SourceError(
                    f"source {cfg.name}: tag {tag.node_id!r} has index {tag.index} outside the table"
                )
            try:
                nodes.append(ua.NodeId.from_string(tag.node_id))
            except ua.UaError as exc:
                raise SourceError(
                    f"source {cfg.name}: invalid node id {tag.node_id!r} (tag #{tag.index})"
                ) from exc
        self.name = cfg.name
        self.cfg = cfg
        self.tags = tuple(tags)
        self.latest = latest
        self.stats = SourceStats()
        self._idx = np.array([t.index for t in tags], dtype=np.intp)
        self._nodes = nodes
        # Each chunk's decoder fills its slice of these, so one tick is stored with one write.
        self._value = np.full(len(nodes), np.nan)
        self._status = np.zeros(len(nodes), dtype=np.uint32)
        self._source_ts = np.zeros(len(nodes), dtype=np.int64)
        # Built at connect, when the server's MaxNodesPerRead is known; kept while the size stays.
        self._chunks: list[tuple[EncodedRead, ReadDecoder]] = []
        self._connected = asyncio.Event()
        # Samplers of this source's assets wake on it, so a sample is taken as soon as a read lands.
        self.updated = Pulse()
        self._failures = 0
        self._previous_error: str | None = None

    async def wait_connected(self, timeout: float) -> bool:
        """True once a session is up and its first Read is stored, False if `timeout` s pass first."""
        return await wait_event(self._connected, timeout)

    async def run(self) -> None:
        """Connect, poll and reconnect until cancelled; tags are Bad whenever there is no session."""
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
        # The library's auto-reconnect would race this loop's own; see run().
        client = Client(self.cfg.endpoint, timeout=self.cfg.timeout_s, auto_reconnect=False)
        # asyncua asks for an hour and warns when servers grant less; its 1 s watchdog keeps a minute alive.
        client.session_timeout = _SESSION_TIMEOUT_MS
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
                self._plan_chunks(await read_max_nodes_per_read(client))
                await self._poll(client, lost)
            except _IO_ERRORS as exc:
                self.stats.read_errors += 1
                self._fail(exc, BAD_COMMUNICATION_ERROR)
        finally:
            await self._close(client, opened)

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

    def _plan_chunks(self, server_limit: int | None) -> None:
        """Split the tags into Reads of at most the server's and the config's MaxNodesPerRead."""
        n = len(self._nodes)
        size = min(x for x in (n, server_limit, self.cfg.max_nodes_per_read) if x is not None)
        if size == self.stats.chunk_size:
            return
        self._chunks = [self._chunk(start, min(start + size, n)) for start in range(0, n, size)]
        self.stats.chunk_size = size

    def _chunk(self, start: int, stop: int) -> tuple[EncodedRead, ReadDecoder]:
        """The Read of tags start..stop-1, encoded once (every tick sends the same), and its decoder."""
        params = ua.ReadParameters(
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            NodesToRead=[
                ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value)
                for node in self._nodes[start:stop]
            ],
        )
        out = (self._value[start:stop], self._status[start:stop], self._source_ts[start:stop])
        return EncodedRead(params), ReadDecoder(stop - start, out=out)

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
        recv_ns = time.monotonic_ns()
        for (_, decoder), body in zip(chunks, bodies, strict=True):
            if isinstance(body, BaseException):
                raise body
            if decoder.decode(body):
                self.stats.fast_decodes += 1
            else:
                self.stats.slow_decodes += 1
        # Written only once every chunk is decoded: samplers never see half a tick.
        self.latest.write(self._idx, self._value, self._status, self._source_ts, recv_ns)
        self.updated.notify()
        self.stats.reads += 1
        self.stats.values += len(self._nodes)

    def _on_first_read(self) -> None:
        """The session works: say so once and name the tags the server does not know."""
        self._failures = 0
        self.stats.connected = True
        self.stats.last_error = None
        self._connected.set()
        logger.info(
            "source %s: connected to %s, reading %d tags in %d Read requests of up to %d nodes",
            self.name,
            self.cfg.endpoint,
            len(self.tags),
            len(self._chunks),
            self.stats.chunk_size,
        )
        bad = [i for i, code in enumerate(self._status.tolist()) if code in _CONFIG_ERRORS]
        for i in bad[:_MAX_TAG_LINES]:
            logger.warning(
                "source %s: tag %s: %s",
                self.name,
                self.tags[i].node_id,
                ua.StatusCode(ua.UInt32(self._status[i])).name,
            )
        if len(bad) > _MAX_TAG_LINES:
            logger.warning("source %s: %d more tags cannot be read", self.name, len(bad) - _MAX_TAG_LINES)

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
        self.latest.mark_bad(self._idx, status, time.monotonic_ns())
        self.updated.notify()

    def _log_failure(self, delay: float) -> None:
        # A PLC that stays off would repeat the same line every backoff period; say it once.
        level = logging.DEBUG if self.stats.last_error == self._previous_error else logging.WARNING
        logger.log(level, "source %s: %s; retrying in %.1f s", self.name, self.stats.last_error, delay)

    def _backoff(self) -> float:
        """Capped exponential backoff with jitter, from reconnect_min_s up to reconnect_max_s."""
        lo, hi = self.cfg.reconnect_min_s, self.cfg.reconnect_max_s
        cap = min(hi, lo * 2.0 ** min(self._failures, 32))
        self._failures += 1
        return max(lo, random.uniform(cap / 2.0, cap))

    async def _close(self, client: Client, opened: bool) -> None:
        """Close the session politely when it is up, bounded so a stuck server cannot hang us."""
        try:
            if opened:
                await asyncio.wait_for(client.disconnect(), self.cfg.timeout_s)
        except _IO_ERRORS as exc:
            logger.debug("source %s: disconnect: %r", self.name, exc)
        finally:
            client.disconnect_socket()
