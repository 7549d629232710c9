"""Data-change notifications of array-backed variables, computed and encoded with NumPy.

asyncua's server spends tens of µs per monitored item and change: write_attribute_value calls each
item's callback, which deep-copies the DataValue, compares it with the previous one and queues a
MonitoredItemNotification object that the publish encodes field by field. Here asyncua keeps
everything but that: it creates and deletes subscriptions and items (ids, revised parameters,
results), queues PublishRequests, counts keepalives and lifetimes, numbers the messages, keeps the
unacknowledged ones for Republish and handles acknowledgements. Only the notifications of "fast"
items are made here: at each update() one block per subscription holds every fast item whose value
changed, found by comparing arrays, and is queued where asyncua queues an item's notification. When
asyncua publishes, each DataChangeNotification holding blocks is encoded into an ExtensionObject
(OPC 10000-6 5.2.2.15) whose MonitoredItemNotifications are vectorised fixed-size entries:
ClientHandle, then the DataValue asyncua would send for the same value (see encode_datavalues).

A fast item is a Reporting item of a client subscription on a Value attribute (no IndexRange, no
DataEncoding) with no filter or a DataChangeFilter with no deadband or an absolute one. It reports
as OPC 10000-4 7.22.2 says: a status change always; with Trigger StatusValue (the default) a value
change, beyond the deadband if there is one, against the last value reported, NaN differing from
every value; with StatusValueTimestamp every update. (asyncua compares with the previous sample
and lets a deadband suppress status changes.) Each item keeps its newest RevisedQueueSize values
per publish; a subscription holds at most _PENDING_BLOCKS updates unpublished, dropping the oldest.
Every other item (Sampling or Disabled mode, percent deadband, other filters, server-internal
subscriptions) gets its asyncua callback called at each update, as write_attribute_value would.
A write from elsewhere notifies every item through asyncua; fast items then report at the next
update whatever its value. asyncua's own notifications of a fast item (its first value, such a
write) do not count against its queue size.

The hooks wrap asyncua 2.1's UaProcessor.forward_publish_response and MonitoredItemService's modify
and set-mode calls once per process and read the subscriptions' internals; PUBLISH_HOOK says
whether this asyncua is one it knows (else every item goes through asyncua, with one warning).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import asyncua
import numpy as np
from asyncua import Server, ua
from asyncua.server.internal_subscription import InternalSubscription
from asyncua.server.monitored_item_service import MonitoredItemData, MonitoredItemService
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import struct_to_binary
from asyncua.ua.uaprotocol_auto import DataChangeFilter

if TYPE_CHECKING:
    from asyncua.server.address_space import AttributeValue

logger = logging.getLogger(__name__)

PUBLISH_HOOK = (
    asyncua.__version__.split(".")[:2] == ["2", "1"]
    and list(inspect.signature(UaProcessor.forward_publish_response).parameters)
    == ["self", "result", "requestdata"]
    and list(inspect.signature(InternalSubscription.enqueue_datachange_event).parameters)
    == ["self", "mid", "eventdata", "maxsize"]
    and list(inspect.signature(MonitoredItemService.datachange_callback).parameters)
    == ["self", "handle", "value", "error"]
    and list(inspect.signature(MonitoredItemService.modify_monitored_items).parameters) == ["self", "params"]
    and list(inspect.signature(MonitoredItemService.set_monitoring_mode).parameters)
    == ["self", "mode", "ids"]
)

BAD_BIT = 0x80000000
# Unpublished updates kept per subscription; overflow policy: the oldest block is dropped (counted).
_PENDING_BLOCKS = 64
# Unacknowledged messages asyncua keeps per subscription for Republish (its default is 5,000).
_UNACKED_MESSAGES = 100
# A last-reported status no item can have: the next update reports the item whatever its value.
_UNKNOWN_STATUS = 0xFFFFFFFF
_STATUS_VALUE = int(ua.DataChangeTrigger.StatusValue)
_TRIGGER_STATUS = int(ua.DataChangeTrigger.Status)
_TRIGGER_TIMESTAMP = int(ua.DataChangeTrigger.StatusValueTimestamp)
_DATA_CHANGE_ID = ua.typeid_by_extension_objects[ua.DataChangeNotification]
_NO_ENCODING = ua.QualifiedName()
# One DataValue with Value, StatusCode, SourceTimestamp and ServerTimestamp; packed, 30 bytes.
_DATAVALUE_FIELDS = [
    ("mask", "u1"),
    ("vtype", "u1"),
    ("value", "<f8"),
    ("status", "<u4"),
    ("source", "<i8"),
    ("server", "<i8"),
]
_DATAVALUE = np.dtype(_DATAVALUE_FIELDS)
# One MonitoredItemNotification: its ClientHandle, then the DataValue.
_NOTIFICATION = np.dtype([("handle", "<u4"), *_DATAVALUE_FIELDS])
# A fast item: (item id, row, item, trigger, absolute deadband).
_Item = tuple[int, int, MonitoredItemData, int, float]


def encode_datavalues(
    value: np.ndarray, status: np.ndarray, ticks: int, handles: np.ndarray | None = None
) -> bytes:
    """Entries (no count) as asyncua encodes DataValue(Variant(v, Double), StatusCode(s), t, t), each
    after its ClientHandle when `handles` is given; a Bad status gets a Null Variant instead.

    ticks: the timestamp in 100 ns since 1601 (ua.datetime_to_win_epoch).
    """
    dtype = _DATAVALUE if handles is None else _NOTIFICATION
    entries = np.empty(len(value), dtype=dtype)
    if handles is not None:
        entries["handle"] = handles
    entries["mask"] = 0x0F
    entries["vtype"] = int(ua.VariantType.Double)
    entries["value"] = value
    entries["status"] = status
    entries["source"] = ticks
    entries["server"] = ticks
    raw = entries.view(np.uint8)
    bad = np.flatnonzero(status & BAD_BIT)
    if len(bad):
        # Where the DataValue starts in an entry: after the mask, the Variant type, then the value.
        head = dtype.itemsize - _DATAVALUE.itemsize
        starts = bad * dtype.itemsize + head
        raw[starts + 1] = int(ua.VariantType.Null)
        # A Null Variant has no value bytes.
        raw = np.delete(raw, (starts[:, None] + np.arange(2, 10)).ravel())
    return raw.tobytes()


class _SubscriptionPlan:
    """The fast items of one subscription, in arrays, with what each last reported."""

    def __init__(self, sub: InternalSubscription, items: list[_Item]) -> None:
        self.sub = sub
        self.mids = [mid for mid, *_ in items]
        self.rows = np.array([row for _, row, *_ in items], dtype=np.intp)
        self.handles = np.array([m.client_handle for _, _, m, *_ in items], dtype=np.uint32)
        self.queue_size = np.array([max(1, m.queue_size) for _, _, m, *_ in items], dtype=np.int64)
        self.trigger = np.array([t for *_, t, _ in items], dtype=np.uint8)
        self.deadband = np.array([d for *_, d in items])
        # Most subscriptions want every change of value or status: one comparison suffices.
        self.plain = bool((self.trigger == _STATUS_VALUE).all() and not self.deadband.any())
        self.last_value = np.zeros(len(items))
        self.last_status = np.zeros(len(items), dtype=np.uint32)
        # Keys of this plan's blocks that asyncua has not published yet, oldest first.
        self.pending: deque[int] = deque()

    def changed(self, value: np.ndarray, status: np.ndarray) -> np.ndarray:
        """Which items report `value`/`status` (their rows' current values), by their filters."""
        bad = (status & BAD_BIT) != 0
        moved = value != self.last_value
        if not self.plain:
            with np.errstate(invalid="ignore"):  # inf - inf: NaN, equal infinities are caught above
                moved &= ~(np.abs(value - self.last_value) <= self.deadband)
        changed = (status != self.last_status) | (moved & ~bad)
        if not self.plain:
            changed = np.where(self.trigger == _TRIGGER_STATUS, status != self.last_status, changed)
            changed |= self.trigger == _TRIGGER_TIMESTAMP
        return changed


@dataclass(eq=False)
class _Block:
    """One update's notifications of one subscription's fast items, queued in asyncua's place."""

    plan: _SubscriptionPlan
    items: np.ndarray
    value: np.ndarray
    status: np.ndarray
    ticks: int


class ArrayNotifier:
    """Notifies the monitored items of array-backed Double variables after each update (see module doc)."""

    def __init__(self, server: Server, attrs: Sequence[AttributeValue]) -> None:
        self.server = server
        self.attrs = list(attrs)
        self.enabled = PUBLISH_HOOK
        # Items whose notifications the arrays make, blocks queued, blocks dropped unpublished.
        self.fast_items = 0
        self.blocks = 0
        self.dropped_blocks = 0
        self._plans: dict[InternalSubscription, _SubscriptionPlan] = {}
        self._fast_handles: set[int] = set()
        self._slow_rows: list[int] = []
        self._key: tuple[int, int, int] | None = None
        self._block_keys = itertools.count(-1, -1)
        if self.enabled:
            _install_publish_hook()
            iserver = server.iserver
            iserver.max_unacked_messages_per_subscription = min(
                iserver.max_unacked_messages_per_subscription, _UNACKED_MESSAGES
            )
        else:
            logger.warning(
                "asyncua %s lacks the internals fast subscriptions use; notifications go through asyncua",
                asyncua.__version__,
            )

    def refresh(self, value: np.ndarray, status: np.ndarray) -> None:
        """Re-plan if items came, went or changed; call before the arrays change (new items last saw these)."""
        if not self.enabled:
            # Plain asyncua: every callback is called, found anew at each update.
            self._slow_rows = [row for row, attr in enumerate(self.attrs) if attr.datachange_callbacks]
            return
        aspace = self.server.iserver.aspace
        # Adding a callback bumps the counter, deleting one shrinks the map; modify and mode changes count too.
        key = (aspace._datachange_callback_counter, len(aspace._handle_to_attribute_map), _item_changes)
        if key == self._key:
            return
        self._key = key
        grouped: dict[InternalSubscription, list[_Item]] = {}
        self._fast_handles.clear()
        self._slow_rows = []
        for row, attr in enumerate(self.attrs):
            slow = False
            for handle, callback in attr.datachange_callbacks.items():
                fast = _fast_item(handle, callback)
                if fast is None:
                    slow = True
                    continue
                sub, item = fast
                grouped.setdefault(sub, []).append((item[0], row, *item[1:]))
                self._fast_handles.add(handle)
            if slow:
                self._slow_rows.append(row)
        old, self._plans = self._plans, {}
        for sub, items in grouped.items():
            plan = self._plans[sub] = _SubscriptionPlan(sub, items)
            plan.last_value[:] = value[plan.rows]
            plan.last_status[:] = status[plan.rows]
            previous = old.get(sub)
            if previous is not None:
                plan.pending = previous.pending
                kept = {mid: i for i, mid in enumerate(previous.mids)}
                pairs = [(i, kept[mid]) for i, mid in enumerate(plan.mids) if mid in kept]
                if pairs:
                    new, was = np.array(pairs).T
                    plan.last_value[new] = previous.last_value[was]
                    plan.last_status[new] = previous.last_status[was]
        self.fast_items = len(self._fast_handles)
        logger.debug("%d fast monitored items in %d subscriptions", self.fast_items, len(self._plans))

    async def notify(
        self,
        value: np.ndarray,
        status: np.ndarray,
        ticks: int,
        written: Sequence[int],
        data_value: Callable[[int], ua.DataValue],
    ) -> None:
        """Queue this update's notifications; `written`: rows whose clients last got a value from elsewhere."""
        for plan in self._plans.values():
            if written:
                plan.last_status[np.isin(plan.rows, written)] = _UNKNOWN_STATUS
            v, s = value[plan.rows], status[plan.rows]
            items = np.flatnonzero(plan.changed(v, s))
            if len(items):
                plan.last_value[items] = v[items]
                plan.last_status[items] = s[items]
                await self._enqueue(plan, _Block(plan, items, v[items], s[items], ticks))
        for row in self._slow_rows:
            dv = data_value(row)
            for handle, callback in list(self.attrs[row].datachange_callbacks.items()):
                if handle in self._fast_handles:
                    continue
                try:
                    await callback(handle, dv)
                except Exception:  # as write_attribute_value: one failing callback must not stop the others
                    logger.exception("data-change callback %s failed", handle)

    async def _enqueue(self, plan: _SubscriptionPlan, block: _Block) -> None:
        """Queue `block` as asyncua queues an item's notification, each block under its own key so
        that the published list keeps the order of updates and of asyncua's own notifications."""
        queue = plan.sub._triggered_datachanges
        pending = plan.pending
        while pending and pending[0] not in queue:
            pending.popleft()
        if len(pending) >= _PENDING_BLOCKS:
            queue.pop(pending.popleft(), None)
            self.dropped_blocks += 1
        key = next(self._block_keys)
        pending.append(key)
        self.blocks += 1
        await plan.sub.enqueue_datachange_event(key, cast(Any, block), 0)


def _fast_item(
    handle: int, callback: Any
) -> tuple[InternalSubscription, tuple[int, MonitoredItemData, int, float]] | None:
    """(subscription, (item id, item, trigger, absolute deadband)) if the arrays can notify this item."""
    owner = getattr(callback, "__self__", None)
    if not isinstance(owner, MonitoredItemService) or callback.__func__ is not _ORIGINAL_DATACHANGE:
        return None
    mid = owner._monitored_datachange.get(handle)
    mdata = owner._monitored_items.get(mid) if mid is not None else None
    sub = owner.isub
    if (
        mid is None
        or mdata is None
        or sub.pub_request_callback is None
        or mdata.mode != ua.MonitoringMode.Reporting
    ):
        return None
    target = mdata.read_value_id
    if target is None or target.IndexRange or target.DataEncoding not in (None, _NO_ENCODING):
        return None
    flt = mdata.filter
    # No filter arrives as an empty ExtensionObject, which is falsy, as asyncua tests it.
    if not flt:
        return sub, (mid, mdata, _STATUS_VALUE, 0.0)
    # Decoded filters are the generated class; ua.DataChangeFilter is a subclass of it.
    if not isinstance(flt, DataChangeFilter) or flt.DeadbandType not in _DEADBANDS:
        return None
    deadband = float(flt.DeadbandValue) if flt.DeadbandType == ua.DeadbandType.Absolute else 0.0
    return sub, (mid, mdata, int(flt.Trigger), deadband)


def encode_data_change(notification: ua.DataChangeNotification) -> ua.ExtensionObject:
    """The DataChangeNotification, blocks included, as the ExtensionObject asyncua would send for it."""
    items = notification.MonitoredItems
    kept = _kept_entries([item for item in items if type(item) is _Block])
    parts: list[bytes] = []
    count = 0
    for item in items:
        if type(item) is _Block:
            keep = kept[id(item)]
            plan = item.plan
            parts.append(
                encode_datavalues(
                    item.value[keep], item.status[keep], item.ticks, plan.handles[item.items[keep]]
                )
            )
            count += int(keep.sum())
        else:
            parts.append(struct_to_binary(item))
            count += 1
    # The DiagnosticInfos array after the items, as asyncua encodes it.
    tail = struct_to_binary(ua.DataChangeNotification(DiagnosticInfos=notification.DiagnosticInfos))[4:]
    body = b"".join((struct.pack("<i", count), *parts, tail))
    return ua.ExtensionObject(TypeId=_DATA_CHANGE_ID, Body=ua.ByteString(body))


def _kept_entries(blocks: list[_Block]) -> dict[int, np.ndarray]:
    """Per block, which entries stay: each item's newest queue-size values, counted newest first."""
    counts: dict[int, np.ndarray] = {}
    kept: dict[int, np.ndarray] = {}
    for block in reversed(blocks):
        plan = block.plan
        seen = counts.setdefault(id(plan), np.zeros(len(plan.mids), dtype=np.int64))
        kept[id(block)] = seen[block.items] < plan.queue_size[block.items]
        seen[block.items] += 1
    return kept


_ORIGINAL_DATACHANGE = MonitoredItemService.datachange_callback
_DEADBANDS = (ua.DeadbandType.None_, ua.DeadbandType.Absolute)
# Modify and SetMonitoringMode calls so far: either can make an item fast or slow.
_item_changes = 0
_original_forward: Any = None


def _install_publish_hook() -> None:
    """Encode DataChangeNotifications that hold blocks before asyncua sends (and keeps) them, and
    count item modifications; idempotent."""
    global _original_forward
    if _original_forward is not None:
        return
    original = _original_forward = UaProcessor.forward_publish_response
    modify, set_mode = MonitoredItemService.modify_monitored_items, MonitoredItemService.set_monitoring_mode

    async def forward_publish_response(self: UaProcessor, result: ua.PublishResult, requestdata: Any) -> None:
        data = result.NotificationMessage.NotificationData
        for i, notification in enumerate(data):
            if isinstance(notification, ua.DataChangeNotification) and any(
                type(item) is _Block for item in notification.MonitoredItems
            ):
                # Replaced in place: the message asyncua keeps for Republish is this one, encoded once.
                data[i] = encode_data_change(notification)
        await original(self, result, requestdata)

    def modify_monitored_items(self: MonitoredItemService, params: Any) -> Any:
        global _item_changes
        _item_changes += 1
        return modify(self, params)

    async def set_monitoring_mode(self: MonitoredItemService, mode: Any, ids: Any) -> Any:
        global _item_changes
        _item_changes += 1
        return await set_mode(self, mode, ids)

    UaProcessor.forward_publish_response = forward_publish_response  # type: ignore[method-assign]
    MonitoredItemService.modify_monitored_items = modify_monitored_items  # type: ignore[method-assign]
    MonitoredItemService.set_monitoring_mode = set_monitoring_mode  # type: ignore[method-assign]
