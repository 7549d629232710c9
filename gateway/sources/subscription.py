"""OPC-UA subscription source: monitored items report changes, stored with one write per publish.

The session life (connect, backoff, marking tags Bad, close) is OpcUaSource's; this module only
creates one subscription per session and turns its publish responses into LatestValues writes.

asyncua's `Subscription` class delivers each changed item as its own event, dispatched in its own
task to a handler. This source registers a plain callback for the subscription id on the session
instead (`UaClient.create_subscription(params, callback)`), which the session's publish loop calls
once per PublishResponse: every DataChangeNotification in it is converted in one pass and stored
with a single `latest.write`, so there is no per-value task or queue.

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

import numpy as np
from asyncua import Client, ua

from gateway.config import SourceConfig
from gateway.errors import SourceError
from gateway.latest import LatestValues
from gateway.sources.opcua import HealthStats, OpcUaSource, SourceTag, read_operation_limit
from gateway.sources.uabinary import datavalues_to_arrays

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


class OpcUaSubscriptionSource(OpcUaSource):
    """Subscribes to all tags of one OPC-UA server; each publish response is one LatestValues write."""

    stats: SubscriptionStats

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

    def _count_session_error(self) -> None:
        self.stats.session_errors += 1

    async def _subscribe(self, client: Client) -> float:
        """One subscription, its items in as few calls as the server allows; returns the silence limit in s."""
        cfg = self.cfg
        # Ids by URI or browse path are known only now; unresolved tags already carry their status.
        resolved, _ = await self._resolve_tags(client)
        self._types = [r.variant_type for r in resolved]
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
        """The session's publish loop calls this once per PublishResponse, keepalives included."""
        self._last_publish = time.monotonic()
        data = result.NotificationMessage.NotificationData
        if not data or self._lost is None:  # a late response after the session ended must not store Good
            return
        items: list[ua.MonitoredItemNotification] = []
        for notification in data:
            if isinstance(notification, ua.DataChangeNotification):
                items += notification.MonitoredItems
            elif isinstance(notification, ua.StatusChangeNotification):
                # asyncua sends BadShutdown/BadConnectionClosed here when the link drops; the server
                # BadTimeout when the subscription expired. Either way the subscription is gone.
                lost = self._lost
                if lost is not None and not lost.done():
                    status = notification.Status
                    lost.set_result(SourceError(f"subscription ended: {status.name}"))
        if items:
            self._store(items)

    def _store(self, items: list[ua.MonitoredItemNotification]) -> None:
        """Convert every item value of one publish response and store them with one write."""
        n = len(items)
        handles = np.fromiter((item.ClientHandle for item in items), dtype=np.intp, count=n)
        if n > 1:
            # With queue_size > 1 an item can report several values in one response, oldest first:
            # keep the newest of each, since NumPy leaves the winner of repeated indices unspecified.
            _, last = np.unique(handles[::-1], return_index=True)
            if len(last) < n:
                keep = np.sort(n - 1 - last)
                handles, items = handles[keep], [items[k] for k in keep.tolist()]
        positions = handles.tolist()
        rows = self.rows_of(handles)
        value = np.empty(len(rows))
        status = np.empty(len(rows), dtype=np.uint32)
        source_ts = np.empty(len(rows), dtype=np.int64)
        datavalues_to_arrays(
            [item.Value for item in items],
            value,
            status,
            source_ts,
            expected=[self._types[p] for p in positions],
            lengths=[self._lengths[p] for p in positions],
        )
        self.stats.notifications += 1
        self._delivered(rows, value, status, source_ts)
        if not self._connected.is_set():
            self._mark_connected()
