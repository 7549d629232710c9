"""OPC-UA subscription source: monitored items report changes, stored with one write per publish.

The session life (connect, backoff, marking tags Bad, close) is OpcUaSource's; this module only
creates one subscription per session and turns its publish responses into LatestValues writes.

asyncua's `Subscription` class delivers each changed item as its own event, dispatched in its own
task to a handler, and its session's publish loop decodes every response into Python objects
(about 7.5 µs per value). This source runs its own publish loop instead (see uapublish): a few
PublishRequests outstanding, acknowledgements sent with the next one, each raw response decoded
with NumPy and stored with a single `latest.write`, with no per-value task or queue. On an asyncua
whose internals differ (OWN_PUBLISH_LOOP false) it registers a plain callback for the subscription
id on the session instead (`UaClient.create_subscription(params, callback)`), called by asyncua's
loop once per PublishResponse, and the same conversion applies.

Monitored items use ClientHandle = the tag's position in this source, so a notification maps to
its row without a lookup table. A percent deadband needs an EURange property on each node: where a
server has none it refuses the item (e.g. BadMonitoredItemFilterUnsupported) and that tag stays Bad.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from asyncua import Client, ua

from gateway.config import SourceConfig
from gateway.errors import SourceError
from gateway.latest import LatestValues
from gateway.sources.opcua import HealthStats, OpcUaSource, SourceTag, read_operation_limit
from gateway.sources.uapublish import (
    OWN_PUBLISH_LOOP,
    ItemValues,
    PublishDecoder,
    Published,
    PublishLoop,
    create_subscription,
)

logger = logging.getLogger(__name__)

_DEADBAND_TYPES = {"absolute": ua.DeadbandType.Absolute, "percent": ua.DeadbandType.Percent}
# Servers send an empty publish response (keepalive) at least this often when nothing changes.
_KEEPALIVE_S = 2.0


@dataclass
class SubscriptionStats(HealthStats):
    """Counters of one subscription source, read by status reporting and tests."""

    # Failures after the connect: creating the subscription, a lost link, a silent subscription.
    session_errors: int = 0
    # CreateMonitoredItems calls per session: the tag count over the server's MaxMonitoredItemsPerCall.
    create_calls: int = 0
    # Monitored items the server refused at the last (re)subscribe; those tags stay Bad.
    refused_items: int = 0
    # Publish responses that carried data.
    notifications: int = 0
    # Of those, decoded by the NumPy fast path / by asyncua's decoder (mixed shapes, strings, arrays).
    fast_decodes: int = 0
    slow_decodes: int = 0
    # Notification messages the server keeps for retransmission as of the last publish response,
    # that response's own included: at most publish_depth while every message is acknowledged.
    unacknowledged: int = 0


class OpcUaSubscriptionSource(OpcUaSource):
    """Subscribes to all tags of one OPC-UA server; each publish response is one LatestValues write."""

    stats: SubscriptionStats
    # The source's own publish loop (see uapublish), or asyncua's where its internals differ.
    own_publish_loop: bool = OWN_PUBLISH_LOOP
    # PublishRequests the own loop keeps at the server, so a slow link never leaves it without one.
    publish_depth: int = 3

    def __init__(self, cfg: SourceConfig, tags: Sequence[SourceTag], latest: LatestValues) -> None:
        super().__init__(cfg, tags, latest)
        self.stats = SubscriptionStats()
        # Per tag, the Variant type its values must arrive as (see nodes.Resolved), set at each subscribe.
        self._types = [0] * len(tags)
        self._filter: ua.DataChangeFilter | None = None
        if cfg.deadband is not None:
            # The default DataChangeFilter triggers on Status only; values must count too.
            self._filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=_DEADBAND_TYPES[cfg.deadband.type],
                DeadbandValue=cfg.deadband.value,
            )
        self._lost: asyncio.Future[Exception] | None = None
        self._last_publish = 0.0
        self._decoder = PublishDecoder(self._types, self._lengths)
        self._publisher: PublishLoop | None = None

    async def _acquire(self, client: Client, lost: asyncio.Future[Exception]) -> None:
        """Create the subscription and its items, then watch the link until it fails."""
        self._lost = lost
        try:
            silence_s = await self._subscribe(client)
            while True:
                # Data or keepalives arrive at least every keepalive period; silence means a dead subscription.
                await asyncio.wait((lost,), timeout=silence_s)
                if lost.done():
                    raise lost.result()
                quiet = time.monotonic() - self._last_publish
                if quiet > silence_s:
                    raise SourceError(f"no publish response for {quiet:.1f} s")
        finally:
            self._lost = None
            if self._publisher is not None:
                self._publisher.stop()

    async def _close(self, client: Client, opened: bool) -> None:
        await super()._close(client, opened)
        # The connection is closed now, so no response can come for the requests still pending.
        if self._publisher is not None:
            self._publisher.cancel()
            self._publisher = None

    def _count_session_error(self) -> None:
        self.stats.session_errors += 1

    async def _subscribe(self, client: Client) -> float:
        """One subscription, its items in as few calls as the server allows; returns the silence limit in s."""
        cfg = self.cfg
        # Ids by URI or browse path are known only now; unresolved tags already carry their status.
        resolved, _ = await self._resolve_tags(client)
        self._types = [r.variant_type for r in resolved]
        self._decoder = PublishDecoder(self._types, self._lengths)
        positions = [i for i, r in enumerate(resolved) if r.problem is None and r.node_id is not None]
        period = float(cfg.publishing_interval_ms)
        keepalive = max(1, math.ceil(_KEEPALIVE_S * 1000.0 / period))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=period,
            RequestedLifetimeCount=max(10_000, 3 * keepalive),
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        self._last_publish = time.monotonic()
        if self.own_publish_loop:
            created = await create_subscription(client.uaclient, params)
            proto = client.uaclient.protocol
            if proto is None:
                raise ConnectionError("Connection is not open")
            self._publisher = PublishLoop(
                proto, self._decoder, self._on_message, self._on_publish_error, depth=self.publish_depth
            )
            self._publisher.start()
        else:
            created = await client.uaclient.create_subscription(params, self._on_publish)
        limit = await read_operation_limit(
            client, ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall
        )
        requests = [self._request(i) for i in positions]
        size = max(1, min(len(requests), limit or len(requests)))
        results: list[ua.MonitoredItemCreateResult] = []
        for start in range(0, len(requests), size):
            results += await client.uaclient.create_monitored_items(
                ua.CreateMonitoredItemsParameters(
                    SubscriptionId=created.SubscriptionId,
                    TimestampsToReturn=ua.TimestampsToReturn.Both,
                    ItemsToCreate=requests[start : start + size],
                )
            )
        if len(results) != len(requests):
            raise SourceError(
                f"{len(results)} results for {len(requests)} monitored items"
            )
        self.stats.create_calls = math.ceil(len(requests) / size)
        refused = self._store_refused(positions, results)
        logger.info(
            "source %s: connected to %s, subscribed to %d of %d tags (%d refused) in %d call(s), publishing every %g ms",
            self.name,
            cfg.endpoint,
            len(positions),
            len(self.tags),
            refused,
            self.stats.create_calls,
            created.RevisedPublishingInterval,
        )
        if refused == len(positions):
            self._mark_connected()  # no initial values will come; the Bad rows are the answer
        revised_keepalive_s = created.RevisedPublishingInterval * created.RevisedMaxKeepAliveCount / 1000.0
        return revised_keepalive_s + cfg.timeout_s

    def _request(self, pos: int) -> ua.MonitoredItemCreateRequest:
        """The monitored item of the tag at `pos`; its ClientHandle is that position."""
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=self._nodes[pos], AttributeId=ua.AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=ua.MonitoringParameters(
                ClientHandle=pos,
                SamplingInterval=float(self.cfg.sampling_ms),
                Filter=self._filter,
                QueueSize=self.cfg.queue_size,
                DiscardOldest=True,
            ),
        )

    def _store_refused(self, positions: list[int], results: list[ua.MonitoredItemCreateResult]) -> int:
        """Tags whose item the server refused get its status (they will never report); returns their count."""
        refused = [
            (pos, r.StatusCode.value)
            for pos, r in zip(positions, results, strict=True)
            if not r.StatusCode.is_good()
        ]
        self.stats.refused_items = len(refused)
        if refused:
            self._store_status([pos for pos, _ in refused], [code for _, code in refused])
            self._report_tags([(pos, ua.StatusCode(ua.UInt32(code)).name) for pos, code in refused])
        return len(refused)

    def _on_publish(self, result: ua.PublishResult) -> None:
        """asyncua's publish loop (the fallback) calls this once per PublishResponse, keepalives included."""
        self._on_message(self._decoder.from_result(result))

    def _on_publish_error(self, exc: Exception) -> None:
        """The own publish loop failed (a lost connection, a refused request): the session ends."""
        lost = self._lost
        if lost is not None and not lost.done():
            lost.set_result(exc)

    def _on_message(self, message: Published) -> None:
        """One PublishResponse, keepalives included: store its values, end the session on a status change."""
        self._last_publish = time.monotonic()
        self.stats.unacknowledged = message.available
        if self._lost is None:  # a late response after the session ended must not store Good
            return
        if message.items is not None:
            self._store(message.items, message.fast)
        if message.status_change is not None:
            # asyncua sends BadShutdown/BadConnectionClosed here when the link drops; the server
            # BadTimeout when the subscription expired. Either way the subscription is gone.
            name = ua.StatusCode(ua.UInt32(message.status_change)).name
            self._on_publish_error(SourceError(f"subscription ended: {name}"))

    def _store(self, items: ItemValues, fast: bool) -> None:
        """Store the item values of one publish response with one write."""
        if fast:
            self.stats.fast_decodes += 1
        else:
            self.stats.slow_decodes += 1
        self.stats.notifications += 1
        self._delivered(self.rows_of(items.positions), items.value, items.status, items.source_ts)
        if not self._connected.is_set():
            self._mark_connected()
