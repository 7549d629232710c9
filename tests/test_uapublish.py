"""The NumPy PublishResponse decoder against asyncua's own decoder + datavalues_to_arrays."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from asyncua import ua
from asyncua.ua.ua_binary import struct_to_binary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import SourceError
from gateway.latest import BAD_TYPE_MISMATCH
from gateway.sources.uapublish import OWN_PUBLISH_LOOP, PublishDecoder, Published
from tests.test_uabinary import (
    BAD,
    NUMERIC,
    STAMP,
    SUPPORTED,
    UNCERTAIN,
    VT,
    datavalue,
    edge_values,
    presence,
)

Item = tuple[int, ua.DataValue]


def response_bytes(
    items: Sequence[Item] = (), *, extra: Sequence[Any] = (), sequence: int = 7, available: Sequence[int] = ()
) -> bytes:
    """A PublishResponse of subscription 5 as asyncua encodes it, the items in one DataChangeNotification."""
    data: list[Any] = []
    if items:
        monitored = [ua.MonitoredItemNotification(ClientHandle=h, Value=dv) for h, dv in items]
        data.append(ua.DataChangeNotification(MonitoredItems=monitored))
    result = ua.PublishResult(
        SubscriptionId=5,
        AvailableSequenceNumbers=list(available),
        NotificationMessage=ua.NotificationMessage(SequenceNumber=sequence, NotificationData=[*data, *extra]),
    )
    return struct_to_binary(ua.PublishResponse(Parameters=result))


def both_ways(decoder: PublishDecoder, data: bytes) -> Published:
    """Decode with the fast decoder and with asyncua's; assert they agree; the fast decoder's answer."""
    fast, generic = decoder.decode(data), decoder.decode_generic(data)
    assert not generic.fast
    for name in ("subscription_id", "sequence_number", "has_data", "available", "status_change"):
        assert getattr(fast, name) == getattr(generic, name), name
    assert (fast.items is None) == (generic.items is None)
    if fast.items is not None and generic.items is not None:
        for name in ("positions", "value", "status", "source_ts"):
            np.testing.assert_array_equal(
                getattr(fast.items, name), getattr(generic.items, name), err_msg=name
            )
    return fast


def double(x: float, status: int = 0) -> ua.DataValue:
    return ua.DataValue(
        ua.Variant(x, VT.Double), ua.StatusCode(status), SourceTimestamp=STAMP, ServerTimestamp=STAMP
    )


def test_own_loop_is_used_on_this_asyncua() -> None:
    assert OWN_PUBLISH_LOOP


def test_uniform_items_of_every_type_decode_with_numpy() -> None:
    codes = [0, UNCERTAIN, BAD]
    for vt in NUMERIC:
        values = edge_values(vt)
        items = [
            (
                h,
                ua.DataValue(
                    ua.Variant(x, vt),
                    ua.StatusCode(codes[h % 3]),
                    SourceTimestamp=STAMP,
                    ServerTimestamp=STAMP,
                ),
            )
            for h, x in enumerate(values)
        ]
        n = len(items)
        for expected in ([int(vt)] * n, [0] * n):
            message = both_ways(PublishDecoder(expected, [0] * n), response_bytes(items, available=[6, 7]))
            assert message.fast and message.items is not None, vt
            assert message.has_data and message.available == 2 and message.sequence_number == 7
            assert message.items.positions.tolist() == list(range(n))


def test_a_value_of_another_type_is_nan_with_bad_type_mismatch_unless_already_bad() -> None:
    # Tag 0 is a Float, tag 2 an Int32: Doubles for them are mismatches; tag 2's Bad status stays.
    decoder = PublishDecoder([int(VT.Float), int(VT.Double), int(VT.Int32)], [0, 0, 0])
    message = both_ways(decoder, response_bytes([(0, double(1.5)), (1, double(2.5)), (2, double(3.5, BAD))]))
    assert message.fast and message.items is not None
    value, status = message.items.value, message.items.status
    assert math.isnan(value[0]) and status[0] == BAD_TYPE_MISMATCH
    assert value[1] == 2.5 and status[1] == 0
    assert math.isnan(value[2]) and status[2] == BAD


def test_the_newest_value_of_an_item_wins() -> None:
    # queue_size > 1: an item reports several values in one response, oldest first.
    items = [(0, double(1.0)), (1, double(5.0)), (0, double(2.0)), (2, double(7.0)), (0, double(3.0))]
    text = (1, ua.DataValue(ua.Variant("text", VT.String)))
    for batch, fast in ((items, True), ([*items, text], False)):
        message = both_ways(PublishDecoder([0, 0, 0], [0, 0, 0]), response_bytes(batch))
        assert message.fast is fast and message.items is not None
        newest = dict(zip(message.items.positions.tolist(), message.items.value.tolist(), strict=True))
        assert len(message.items.positions) == 3 and newest[0] == 3.0 and newest[2] == 7.0
        assert newest[1] == 5.0 if fast else math.isnan(newest[1])


def test_mixed_shapes_and_array_tags_take_asyncua_s_decoder() -> None:
    int32 = ua.DataValue(ua.Variant(4, VT.Int32), ua.StatusCode(0), SourceTimestamp=STAMP)
    array = ua.DataValue(ua.Variant([1.0, 2.0, 3.0], VT.Double), ua.StatusCode(0))
    short = ua.DataValue(ua.Variant([1.0], VT.Double), ua.StatusCode(0))
    decoder = PublishDecoder([int(VT.Double), int(VT.Int32), int(VT.Double)], [0, 0, 3])
    mixed = both_ways(decoder, response_bytes([(0, double(1.5)), (1, int32)]))
    assert not mixed.fast and mixed.items is not None and mixed.items.value.tolist() == [1.5, 4.0]
    # Uniform Doubles, but tag 2 is an array tag of 3 elements: three slots.
    arrays = both_ways(decoder, response_bytes([(0, double(1.5)), (2, array)]))
    assert (
        not arrays.fast and arrays.items is not None and arrays.items.value.tolist() == [1.5, 1.0, 2.0, 3.0]
    )
    wrong = both_ways(decoder, response_bytes([(2, short)]))
    assert wrong.items is not None and (wrong.items.status == BAD_TYPE_MISMATCH).all()
    # Diagnostics after the items: asyncua decodes them.
    data = struct_to_binary(
        ua.PublishResponse(
            Parameters=ua.PublishResult(
                NotificationMessage=ua.NotificationMessage(
                    NotificationData=[
                        ua.DataChangeNotification(
                            MonitoredItems=[ua.MonitoredItemNotification(ClientHandle=0, Value=double(2.0))],
                            DiagnosticInfos=[ua.DiagnosticInfo()],
                        )
                    ]
                )
            )
        )
    )
    assert not both_ways(decoder, data).fast


def test_keepalive_status_change_and_events() -> None:
    decoder = PublishDecoder([0], [0])
    keepalive = both_ways(decoder, response_bytes())
    assert not keepalive.has_data and keepalive.items is None and keepalive.status_change is None
    gone = ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.BadTimeout))
    ended = both_ways(decoder, response_bytes([(0, double(1.0))], extra=[gone]))
    assert ended.status_change == ua.StatusCodes.BadTimeout and ended.items is not None
    events = both_ways(decoder, response_bytes(extra=[ua.EventNotificationList()]))
    assert events.has_data and events.items is None and events.status_change is None


def test_service_faults_raise_their_status_and_foreign_handles_end_the_session() -> None:
    fault = ua.ServiceFault()
    fault.ResponseHeader.ServiceResult = ua.StatusCode(ua.StatusCodes.BadTooManyPublishRequests)
    with pytest.raises(ua.UaStatusCodeError, match="BadTooManyPublishRequests"):
        PublishDecoder([0], [0]).decode(struct_to_binary(fault))
    for data in (response_bytes([(3, double(1.0))]), response_bytes([(0, double(1.0)), (3, double(1.0))])):
        for decode in (PublishDecoder([0, 0], [0, 0]).decode, PublishDecoder([0, 0], [0, 0]).decode_generic):
            with pytest.raises(SourceError, match="monitored item 3"):
                decode(data)


def test_a_truncated_notification_is_refused() -> None:
    data = response_bytes([(0, double(1.0))])
    # The body length of the one notification, after its TypeId (4 bytes) and encoding byte.
    at = data.index(struct.pack("<HB", ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary, 1)) + 3
    broken = data[:at] + struct.pack("<i", len(data)) + data[at + 4 :]
    with pytest.raises(SourceError, match="notification of"):
        PublishDecoder([0], [0]).decode(broken)


@st.composite
def items(draw: st.DrawFn, uniform: bool) -> tuple[list[Item], list[int]]:
    """1-30 items of up to 8 tags (handles repeat), of one shape or each its own; each tag's expected type."""
    n_tags = draw(st.integers(1, 8))
    kinds = st.sampled_from([*SUPPORTED, VT.String])
    kind, present = draw(kinds), draw(presence)
    drawn = []
    for _ in range(draw(st.integers(1, 30))):
        if not uniform:
            kind, present = draw(kinds), draw(presence)
        drawn.append((draw(st.integers(0, n_tags - 1)), datavalue(draw, kind, present)))
    expected = draw(
        st.lists(st.sampled_from([0, *(int(vt) for vt in NUMERIC)]), min_size=n_tags, max_size=n_tags)
    )
    return drawn, expected


def fast_shape(batch: list[Item]) -> bool:
    """True if every item has the first one's shape: a numeric scalar Value and the same optional fields."""

    def shape(dv: ua.DataValue) -> tuple[Any, ...]:
        fields = (
            "StatusCode",
            "SourceTimestamp",
            "ServerTimestamp",
            "SourcePicoseconds",
            "ServerPicoseconds",
        )
        return (None if dv.Value is None else dv.Value.VariantType, *(getattr(dv, f) is None for f in fields))

    first = shape(batch[0][1])
    return first[0] in NUMERIC and all(shape(dv) == first for _, dv in batch)


@given(items(uniform=True))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_uniform_responses(case: tuple[list[Item], list[int]]) -> None:
    batch, expected = case
    message = both_ways(PublishDecoder(expected, [0] * len(expected)), response_bytes(batch))
    assert message.fast is fast_shape(batch)


@given(items(uniform=False))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_mixed_responses(case: tuple[list[Item], list[int]]) -> None:
    batch, expected = case
    message = both_ways(PublishDecoder(expected, [0] * len(expected)), response_bytes(batch))
    assert message.fast is fast_shape(batch)
