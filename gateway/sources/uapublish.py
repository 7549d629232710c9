"""OPC-UA subscription fast path: the source's own publish loop, PublishResponses decoded with NumPy.

asyncua's publish loop decodes every PublishResponse into Python objects, about 7.5 µs per item
value. Here a subscription is created without it (asyncua starts its loop once a callback is
registered), a few PublishRequests are kept outstanding on the session's connection, and each raw
response body is decoded like uabinary decodes Read responses.

PublishResponse layout (OPC 10000-4 5.13.5, binary per 10000-6): TypeId, ResponseHeader,
SubscriptionId UInt32, AvailableSequenceNumbers UInt32[], MoreNotifications Boolean, then the
NotificationMessage: SequenceNumber UInt32, PublishTime DateTime, NotificationData
ExtensionObject[] (TypeId, encoding byte, Int32 length, body); Results and DiagnosticInfos follow.
A DataChangeNotification body is MonitoredItems, an array of {ClientHandle UInt32, DataValue},
then DiagnosticInfos. The items of one response usually share one DataValue shape (one mask, one
scalar type): each then has the same size, so after a vectorised check of the mask and type bytes
at that stride every field is a strided NumPy view. Any other response (mixed shapes, strings,
array tags) is decoded by asyncua, with exactly the same result.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from asyncua import ua
from asyncua.client.ua_client import UaClient, UASocketProtocol
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import nodeid_from_binary, struct_from_binary

from gateway.errors import SourceError
from gateway.latest import BAD_TYPE_MISMATCH
from gateway.sources.uabinary import (
    AFTER_VALUE,
    BAD_BIT,
    MASK_SOURCE_TS,
    MASK_STATUS,
    MASK_VALUE,
    PRE_ENCODED_SEND,
    VALUE_DTYPES,
    datavalues_to_arrays,
    slot_count,
    us1601_to_unix_ns,
)

logger = logging.getLogger(__name__)


def _send_returns_future() -> bool:
    """UASocketProtocol._send_request(request, timeout, ...) -> Future of the raw body, as in asyncua 2.x."""
    send = getattr(UASocketProtocol, "_send_request", None)
    return send is not None and list(inspect.signature(send).parameters)[:3] == ["self", "request", "timeout"]


# The asyncua internals PublishLoop relies on; elsewhere the source lets asyncua's publish loop run.
OWN_PUBLISH_LOOP = PRE_ENCODED_SEND and _send_returns_future()

_PUBLISH_RESPONSE = ua.ObjectIds.PublishResponse_Encoding_DefaultBinary
_DATA_CHANGE = ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary
_STATUS_CHANGE = ua.ObjectIds.StatusChangeNotification_Encoding_DefaultBinary
_INT32 = struct.Struct("<i")
_UINT32 = struct.Struct("<I")
_SUBSCRIPTION = struct.Struct("<Ii")  # SubscriptionId, AvailableSequenceNumbers length
_MESSAGE = struct.Struct("<Iqi")  # SequenceNumber, PublishTime, NotificationData length
_HAS_BODY = 0x01


@dataclass(frozen=True)
class ItemValues:
    """Item values of one publish response, the newest per item: tag positions and their slot arrays.

    A scalar tag fills one slot, an array tag of length L fills L consecutive slots (as OpcUaSource.rows_of).
    """

    positions: np.ndarray
    value: np.ndarray
    status: np.ndarray
    source_ts: np.ndarray


@dataclass(frozen=True)
class Published:
    """One PublishResponse as the source needs it."""

    subscription_id: int
    sequence_number: int
    # NotificationData not empty: the server keeps the message until it is acknowledged.
    has_data: bool
    # Messages the server still keeps for retransmission (AvailableSequenceNumbers).
    available: int
    # The Status of a StatusChangeNotification: the subscription is gone.
    status_change: int | None
    items: ItemValues | None
    fast: bool


def newest(handles: np.ndarray) -> np.ndarray | None:
    """Indexes of the last occurrence of each handle, in order; None when no handle repeats."""
    # With queue_size > 1 an item can report several values in one response, oldest first; NumPy
    # leaves the winner of repeated fancy-index assignments unspecified, so duplicates go first.
    n = len(handles)
    if n < 2:
        return None
    _, last = np.unique(handles[::-1], return_index=True)
    return None if len(last) == n else np.sort(n - 1 - last)


def items_to_arrays(
    items: Sequence[ua.MonitoredItemNotification], expected: Sequence[int], lengths: Sequence[int]
) -> ItemValues:
    """The generic path: decoded items, newest per ClientHandle, through datavalues_to_arrays."""
    # expected, lengths: per tag position (= ClientHandle), as datavalues_to_arrays takes them per node.
    handles = np.fromiter((item.ClientHandle for item in items), dtype=np.intp, count=len(items))
    _check_handles(handles, len(expected))
    keep = newest(handles)
    if keep is not None:
        handles, items = handles[keep], [items[k] for k in keep.tolist()]
    positions = handles.tolist()
    widths = [lengths[p] for p in positions]
    m = slot_count(widths, len(positions))
    value, status, source_ts = np.empty(m), np.empty(m, dtype=np.uint32), np.empty(m, dtype=np.int64)
    datavalues_to_arrays(
        [item.Value for item in items], value, status, source_ts, [expected[p] for p in positions], widths
    )
    return ItemValues(handles, value, status, source_ts)


def _check_handles(handles: np.ndarray, n_tags: int) -> None:
    if len(handles) and (handles.min() < 0 or handles.max() >= n_tags):
        raise SourceError(f"publish response names monitored item {handles.max()}, not one of ours")


class PublishDecoder:
    """Decodes PublishResponse bodies of one subscription; per tag position the expected type and length."""

    def __init__(self, expected: Sequence[int], lengths: Sequence[int]) -> None:
        # expected: the Variant type each tag's values must arrive as (0: any number or Boolean);
        # lengths: 0 for a scalar tag, else the exact length of its array values.
        if len(expected) != len(lengths):
            raise ValueError(f"{len(expected)} expected types for {len(lengths)} lengths")
        self._expected_list = [int(x) for x in expected]
        self._lengths_list = [int(x) for x in lengths]
        self._expected = np.array(self._expected_list, dtype=np.uint8)
        self._arrays = np.array(self._lengths_list, dtype=np.intp) > 0

    def decode(self, data: Buffer | bytes) -> Published:
        """One response body (TypeId onwards); raises the UaStatusCodeError of a ServiceFault."""
        raw = bytes(data)
        buf = Buffer(raw)
        type_id = nodeid_from_binary(buf)
        struct_from_binary(ua.ResponseHeader, buf).ServiceResult.check()
        if type_id.NamespaceIndex != 0 or type_id.Identifier != _PUBLISH_RESPONSE:
            raise SourceError(f"a PublishRequest answered with {type_id.to_string()}")
        p = buf.cur_pos
        subscription_id, available = _SUBSCRIPTION.unpack_from(raw, p)
        p += _SUBSCRIPTION.size + 4 * max(available, 0) + 1  # and MoreNotifications
        sequence_number, _, count = _MESSAGE.unpack_from(raw, p)
        p += _MESSAGE.size
        bodies: list[tuple[int, int]] = []
        status_change = None
        for _ in range(count):
            buf = Buffer(raw, p)
            kind = nodeid_from_binary(buf)
            p = buf.cur_pos + 1
            if not raw[p - 1] & _HAS_BODY:
                continue
            (length,) = _INT32.unpack_from(raw, p)
            p += 4
            if not 0 <= length <= len(raw) - p:
                raise SourceError(f"notification of {length} bytes in a {len(raw)}-byte publish response")
            if kind.NamespaceIndex == 0 and kind.Identifier == _DATA_CHANGE:
                bodies.append((p, p + length))
            elif kind.NamespaceIndex == 0 and kind.Identifier == _STATUS_CHANGE:
                (status_change,) = _UINT32.unpack_from(raw, p)
            p += length
        items, fast = None, False
        if len(bodies) == 1:
            items = self._fast_items(raw, *bodies[0])
            fast = items is not None
        if bodies and items is None:
            notifications = [
                struct_from_binary(ua.DataChangeNotification, Buffer(raw, a, b - a)) for a, b in bodies
            ]
            items = self._generic([item for n in notifications for item in n.MonitoredItems])
        return Published(
            subscription_id, sequence_number, count > 0, max(available, 0), status_change, items, fast
        )

    def decode_generic(self, data: Buffer | bytes) -> Published:
        """The same through asyncua's own decoder: the reference the fast path must equal."""
        response = struct_from_binary(ua.PublishResponse, Buffer(bytes(data)))
        response.ResponseHeader.ServiceResult.check()
        return self.from_result(response.Parameters)

    def from_result(self, result: ua.PublishResult) -> Published:
        """A PublishResult asyncua decoded (its publish loop's, or decode_generic's)."""
        message = result.NotificationMessage
        items: list[ua.MonitoredItemNotification] = []
        status_change = None
        for notification in message.NotificationData:
            if isinstance(notification, ua.DataChangeNotification):
                items += notification.MonitoredItems
            elif isinstance(notification, ua.StatusChangeNotification):
                status_change = notification.Status.value
        has_data = bool(message.NotificationData)
        values = self._generic(items) if items else None
        available = len(result.AvailableSequenceNumbers or ())
        return Published(
            result.SubscriptionId, message.SequenceNumber, has_data, available, status_change, values, False
        )

    def _generic(self, items: list[ua.MonitoredItemNotification]) -> ItemValues | None:
        return items_to_arrays(items, self._expected_list, self._lengths_list) if items else None

    def _fast_items(self, raw: bytes, start: int, stop: int) -> ItemValues | None:
        """The MonitoredItems of the DataChangeNotification body raw[start:stop] with NumPy, or None
        unless every item is a scalar number or Boolean of one shape, with an empty DiagnosticInfos."""
        (n,) = _INT32.unpack_from(raw, start)
        first = start + 4
        if n <= 0 or first + 6 > stop:
            return None
        mask, tbyte = raw[first + 4], raw[first + 5]
        dtype = VALUE_DTYPES.get(tbyte)  # arrays (bit 0x80) and Null are not in it
        if dtype is None or not mask & MASK_VALUE or mask > 0x3F:
            return None
        stride = 6 + dtype.itemsize + AFTER_VALUE[mask]
        end = first + n * stride
        # An item with the first one's mask and type byte has its size: if all have them, item k
        # starts at first + k * stride and the DiagnosticInfos array comes right after the last.
        if end + 4 != stop or _INT32.unpack_from(raw, end)[0] > 0:
            return None

        def column(offset: int, dt: str | np.dtype[np.generic]) -> np.ndarray:
            return np.ndarray((n,), dtype=dt, buffer=raw, offset=first + offset, strides=(stride,))

        if not ((column(4, "u1") == mask).all() and (column(5, "u1") == tbyte).all()):
            return None
        handles = column(0, "<u4").astype(np.intp)
        _check_handles(handles, len(self._expected))
        if self._arrays[handles].any():
            return None
        pick = newest(handles)
        select = slice(None) if pick is None else pick
        handles = handles[select]
        raw_value = column(6, dtype)[select]
        value = (
            (raw_value != 0).astype(np.float64)
            if tbyte == ua.VariantType.Boolean
            else raw_value.astype(np.float64)
        )
        at = 6 + dtype.itemsize
        if mask & MASK_STATUS:
            status = column(at, "<u4")[select].astype(np.uint32)
            at += 4
        else:
            status = np.zeros(len(handles), dtype=np.uint32)
        ticks = column(at, "<i8")[select] if mask & MASK_SOURCE_TS else np.zeros(len(handles), dtype=np.int64)
        source_ts = us1601_to_unix_ns(ticks // 10)
        expected = self._expected[handles]
        wrong = (expected != 0) & (expected != tbyte)
        if wrong.any():
            value[wrong] = np.nan
            status[wrong] = np.where(status[wrong] & BAD_BIT, status[wrong], BAD_TYPE_MISMATCH)
        return ItemValues(handles, value, status, source_ts)


async def create_subscription(
    uaclient: UaClient, params: ua.CreateSubscriptionParameters
) -> ua.CreateSubscriptionResult:
    """The CreateSubscription service without registering a callback, which starts asyncua's publish loop."""
    proto = uaclient.protocol
    if proto is None:
        raise ConnectionError("Connection is not open")
    data = await proto.send_request(ua.CreateSubscriptionRequest(Parameters=params))
    response = struct_from_binary(ua.CreateSubscriptionResponse, data)
    response.ResponseHeader.ServiceResult.check()
    return response.Parameters


class PublishLoop:
    """Keeps `depth` PublishRequests outstanding on one connection; each response goes to `on_message`.

    No task: a response's future runs `_on_done`, which decodes it and at once sends the next request,
    carrying the acknowledgement of the response's sequence number, so the server never runs out of
    requests and its retransmission queue stays empty. A failure goes to `on_error` once, which ends
    the session. `stop()` when the session ends (late responses go unread), `cancel()` once its
    connection is closed (no response can come any more): then no future is left pending.
    """

    def __init__(
        self,
        proto: UASocketProtocol,
        decoder: PublishDecoder,
        on_message: Callable[[Published], None],
        on_error: Callable[[Exception], None],
        *,
        depth: int = 3,
    ) -> None:
        self.depth = depth
        self._proto = proto
        self._decoder = decoder
        self._on_message = on_message
        self._on_error = on_error
        self._acks: list[ua.SubscriptionAcknowledgement] = []
        self._pending: set[asyncio.Future[Buffer]] = set()
        self._stopped = False
        self._shrunk = False

    def start(self) -> None:
        """Send the first `depth` requests."""
        for _ in range(self.depth):
            if not self._send():
                return

    def stop(self) -> None:
        """Send nothing more; responses still to come are left unread."""
        self._stopped = True

    def cancel(self) -> None:
        """Stop, and cancel the requests still pending (call once the connection is closed)."""
        self._stopped = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()

    def _send(self) -> bool:
        acks, self._acks = self._acks, []
        request = ua.PublishRequest(Parameters=ua.PublishParameters(SubscriptionAcknowledgements=acks))
        try:
            # TimeoutHint 0 and no client timeout: a request waits at the server until there is
            # something to send; silence is the source's watch (keepalive period + timeout_s).
            future: asyncio.Future[Buffer] = self._proto._send_request(request, timeout=0)
        except Exception as exc:  # e.g. ConnectionError: the connection closed under us
            self._fail(exc)
            return False
        self._pending.add(future)
        future.add_done_callback(self._on_done)
        return True

    def _on_done(self, future: asyncio.Future[Buffer]) -> None:
        self._pending.discard(future)
        if future.cancelled():
            return
        exc = future.exception()
        if self._stopped:
            return
        if exc is not None:
            # asyncua fails pending requests with ConnectionError when the channel or socket closes.
            self._fail(exc if isinstance(exc, Exception) else ConnectionError(repr(exc)))
            return
        try:
            message = self._decoder.decode(future.result())
        except ua.UaStatusCodeError as fault:
            self._on_fault(fault)
            return
        except Exception as error:
            self._fail(SourceError(f"undecodable publish response: {error!r}"))
            return
        if message.has_data:
            self._acks.append(
                ua.SubscriptionAcknowledgement(
                    SubscriptionId=message.subscription_id, SequenceNumber=message.sequence_number
                )
            )
        if self._send():
            try:
                self._on_message(message)
            except Exception as error:
                self._fail(error)

    def _on_fault(self, fault: ua.UaStatusCodeError) -> None:
        """A ServiceFault in answer to a PublishRequest: take one back, send it again, or give up."""
        if fault.code == ua.StatusCodes.BadTooManyPublishRequests:
            # The server dropped its oldest request of ours: keep one fewer outstanding, and say so
            # once (a server with a low limit evicts one per request above it).
            if self.depth > 1:
                level = logging.DEBUG if self._shrunk else logging.WARNING
                self.depth -= 1
                self._shrunk = True
                logger.log(
                    level,
                    "server refused a publish request as one too many; keeping %d outstanding",
                    self.depth,
                )
                return
        elif fault.code == ua.StatusCodes.BadTimeout:
            self._send()  # the server timed a request out; the subscription goes on
            return
        name = ua.StatusCode(ua.UInt32(fault.code)).name
        self._fail(SourceError(f"publish request refused: {name}"))

    def _fail(self, exc: Exception) -> None:
        if not self._stopped:
            self._stopped = True
            self._on_error(exc)
