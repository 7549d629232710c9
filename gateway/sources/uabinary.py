"""OPC-UA binary fast paths for polling: a Read request encoded once, Read responses decoded with NumPy.

asyncua spends about 2 µs per node encoding a ReadRequest that is the same every tick, and about
7 µs per node decoding the response into DataValue objects. Here the request's parameters are
encoded once and the response's Results array is read with vectorised gathers, a few tens of ns a value.

Results layout (OPC 10000-6 5.2.2.17): each DataValue is an encoding mask byte, then the fields its
bits announce: 0x01 Value (Variant: type byte, then the value), 0x02 StatusCode (UInt32),
0x04 SourceTimestamp (Int64), 0x10 SourcePicoseconds (UInt16), 0x08 ServerTimestamp (Int64),
0x20 ServerPicoseconds (UInt16). asyncua writes ServerTimestamp before SourcePicoseconds; both
orders put the three fields used here at the same offsets and give an entry the same size.

A node's DataValue keeps its shape from one Read to the next, so the byte layout found by one scan
of a response is kept and each later response is checked against it with a vectorised compare of
the mask and type bytes: if entry i starts where it did and has the same mask and scalar type, it
has the same size, so entry i + 1 starts where it did too. Responses with anything other than
scalar numbers, Booleans, null values and absent values (strings, arrays, other types) are decoded
by asyncua, with exactly the same result.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np
from asyncua import ua
from asyncua.client.ua_client import UaClient, UASocketProtocol, UASocketState
from asyncua.common.utils import Buffer, wait_for
from asyncua.ua.ua_binary import nodeid_from_binary, nodeid_to_binary, struct_from_binary, struct_to_binary
from asyncua.ua.uatypes import FILETIME_EPOCH_AS_UTC_DATETIME

from gateway.errors import SourceError
from gateway.latest import BAD_TYPE_MISMATCH, tag_rows

logger = logging.getLogger(__name__)

# Bad (10) and the reserved severity 11 both set the top bit.
BAD_BIT = 0x80000000
_READ_REQUEST_TYPE_ID = nodeid_to_binary(ua.ReadRequest().TypeId)
# The asyncua 2.x internals EncodedRead.send relies on; older releases lack them and get the generic send.
PRE_ENCODED_SEND = all(
    hasattr(UASocketProtocol, name) for name in ("_setup_request_header", "revolve_security_token")
)

# Variant type byte -> value dtype for the scalars stored as numbers; Null (0) has no value bytes.
VALUE_DTYPES: dict[int, np.dtype[Any]] = {
    int(vt): np.dtype(code)
    for vt, code in (
        (ua.VariantType.Boolean, "u1"),
        (ua.VariantType.SByte, "i1"),
        (ua.VariantType.Byte, "u1"),
        (ua.VariantType.Int16, "<i2"),
        (ua.VariantType.UInt16, "<u2"),
        (ua.VariantType.Int32, "<i4"),
        (ua.VariantType.UInt32, "<u4"),
        (ua.VariantType.Int64, "<i8"),
        (ua.VariantType.UInt64, "<u8"),
        (ua.VariantType.Float, "<f4"),
        (ua.VariantType.Double, "<f8"),
    )
}
_VALUE_SIZES = {0: 0, **{vt: dt.itemsize for vt, dt in VALUE_DTYPES.items()}}
_BOOLEAN = int(ua.VariantType.Boolean)
MASK_VALUE, MASK_STATUS, MASK_SOURCE_TS = 0x01, 0x02, 0x04
# Bytes of a DataValue after its Variant, by encoding mask: status, both timestamps, both picoseconds.
AFTER_VALUE = [
    4 * bool(m & MASK_STATUS)
    + 8 * bool(m & MASK_SOURCE_TS)
    + 8 * bool(m & 0x08)
    + 2 * bool(m & 0x10)
    + 2 * bool(m & 0x20)
    for m in range(64)
]
_INT32 = struct.Struct("<i")
# Variant encoding byte: the built-in type in the low six bits, 0x80 for a one-dimensional array
# (Int32 length, then the elements), 0x40 for ArrayDimensions after it (not decoded here).
_ARRAY_BIT = 0x80

# asyncua keeps microseconds; so does the table, whichever path decoded the response.
_US = timedelta(microseconds=1)
_UNIX_EPOCH_US = 11_644_473_600_000_000  # 1970-01-01 in µs since 1601-01-01
_MAX_US = _UNIX_EPOCH_US + (2**63 - 1) // 1000  # the last µs an int64 of ns since 1970 holds (year 2262)


def us1601_to_unix_ns(us: np.ndarray) -> np.ndarray:
    """µs since 1601 -> int64 ns since 1970; 0 and below (no timestamp) give 0, later than 2262 clamps."""
    # asyncua's own clamping (below 0, from year 9999 on) falls inside these bounds, so raw ticks // 10 agree.
    return np.where(us > 0, (np.minimum(us, _MAX_US) - _UNIX_EPOCH_US) * 1000, 0)


def slot_count(lengths: Sequence[int] | None, n: int) -> int:
    """Table rows n nodes fill: one per scalar, one per element of an array (lengths: 0 for a scalar)."""
    return n if lengths is None else sum(max(1, x) for x in lengths)


def datavalues_to_arrays(
    results: Sequence[ua.DataValue],
    value: np.ndarray,
    status: np.ndarray,
    source_ts: np.ndarray,
    expected: Sequence[int] | None = None,
    lengths: Sequence[int] | None = None,
) -> None:
    """The generic path: decoded DataValues into value, status and source_ts (ns since 1970) arrays."""
    # expected: per node, the Variant type byte its value must have (0: any number or Boolean).
    # lengths: per node, 0 for a scalar or the element count of a one-dimensional array, whose
    # elements fill that many consecutive slots; a value of another shape is a type mismatch.
    n = len(results) if lengths is None else len(lengths)
    if len(results) != n or len(value) != slot_count(lengths, n):
        raise SourceError(f"Read returned {len(results)} results for {n} nodes")
    # Python lists take the per-item stores (cheaper than numpy item assignment), then one copy each.
    m = len(value)
    values: list[float] = [0.0] * m
    codes: list[int] = [0] * m
    stamps: list[int] = [0] * m
    nan = float("nan")
    slot = 0
    for i, dv in enumerate(results):
        sc = dv.StatusCode
        code = 0 if sc is None else sc.value
        var = dv.Value
        x: Any = None if var is None else var.Value
        kind = type(x)
        type_ok = expected is None or not expected[i] or expected[i] == var.VariantType.value  # type: ignore[union-attr]
        ts = dv.SourceTimestamp
        stamp = 0 if ts is None else (ts - FILETIME_EPOCH_AS_UTC_DATETIME) // _US
        width = lengths[i] if lengths is not None else 0
        if not width:
            if (kind is float or kind is int or kind is bool) and type_ok:
                values[slot] = x
            else:
                values[slot] = nan
                if not code & BAD_BIT:
                    code = BAD_TYPE_MISMATCH
            codes[slot] = code
            stamps[slot] = stamp
            slot += 1
            continue
        stop = slot + width
        if kind is list and len(x) == width and type_ok and var.VariantType.value in VALUE_DTYPES:  # type: ignore[union-attr]
            values[slot:stop] = x
        else:
            values[slot:stop] = [nan] * width
            if not code & BAD_BIT:
                code = BAD_TYPE_MISMATCH
        codes[slot:stop] = [code] * width
        stamps[slot:stop] = [stamp] * width
        slot = stop
    value[:] = values
    status[:] = codes
    source_ts[:] = us1601_to_unix_ns(np.array(stamps, dtype=np.int64))


class _Layout:
    """Where each field of each DataValue of one Results array lies, relative to the array's first entry.

    Values go to slots (one per scalar, one per array element, see ReadDecoder); status and source
    timestamp to per-node arrays.
    """

    def __init__(
        self,
        offsets: list[int],
        masks: list[int],
        type_bytes: list[int],
        counts: list[int],
        end: int,
        expected: np.ndarray | None,
        lengths: np.ndarray | None,
    ) -> None:
        # counts: the Int32 length of each array value as sent (-1: a null array); unused for scalars.
        off = np.array(offsets, dtype=np.intp)
        mask = np.array(masks, dtype=np.uint8)
        tbyte = np.array(type_bytes, dtype=np.uint8)
        count = np.array(counts, dtype=np.intp)
        is_array = (tbyte & _ARRAY_BIT) != 0
        vt = tbyte & ~np.uint8(_ARRAY_BIT)
        has_value = (mask & MASK_VALUE) != 0
        item_size = np.array([_VALUE_SIZES[v] for v in vt.tolist()], dtype=np.intp)
        value_size = np.where(is_array, 4 + np.maximum(count, 0) * item_size, item_size)
        status_off = off + 1 + np.where(has_value, 1 + value_size, 0)
        ts_off = status_off + np.where(mask & MASK_STATUS, 4, 0)
        self.n = len(offsets)
        self.end = end
        # The bytes that fix every entry's size: its mask, with a value its variant type byte, and
        # with an array its Int32 length.
        array_at = off[is_array] + 2
        self.key_at = np.concatenate([off, off[has_value] + 1, *(array_at + k for k in range(4))])
        lengths_le = count[is_array].astype("<i4").view(np.uint8).reshape(-1, 4)
        self.key = np.concatenate([mask, tbyte[has_value], *(lengths_le[:, k] for k in range(4))])
        self.status_rows, self.status_at = _gather_plan(np.flatnonzero(mask & MASK_STATUS), status_off, 4)
        self.ts_rows, self.ts_at = _gather_plan(np.flatnonzero(mask & MASK_SOURCE_TS), ts_off, 8)
        # Values of another type or shape than expected are left out: checked once per layout, since
        # the fast path only ever extracts from bodies with these same type and length bytes.
        want = np.zeros(self.n, dtype=np.intp) if lengths is None else lengths
        usable = has_value & np.where(want > 0, count == want, ~is_array)
        if expected is not None:
            usable &= (expected == 0) | (expected == vt)
        width = np.maximum(want, 1)
        first_slot = np.cumsum(width) - width
        data_off = off + np.where(is_array, 6, 2)
        self.values = []
        for code, dtype in VALUE_DTYPES.items():
            nodes = np.flatnonzero(usable & (vt == code))
            if len(nodes):
                slots = tag_rows(first_slot[nodes], width[nodes])
                element = slots - np.repeat(first_slot[nodes], width[nodes])
                starts = np.repeat(data_off[nodes], width[nodes]) + element * dtype.itemsize
                self.values.append((slots, starts[:, None] + np.arange(dtype.itemsize), dtype, code == _BOOLEAN))
        self.no_value_rows = np.flatnonzero(~(usable & np.isin(vt, list(VALUE_DTYPES))))

    def matches(self, body: np.ndarray) -> bool:
        """True if `body` (bytes from the first entry on) holds entries of exactly this layout."""
        return len(body) >= self.end and bool((body[self.key_at] == self.key).all())

    def extract(self, body: np.ndarray, value: np.ndarray, status: np.ndarray, source_ts: np.ndarray) -> None:
        """Fill slot values and node status and source_ts from a body that matches(); as datavalues_to_arrays."""
        status[:] = 0
        status[self.status_rows] = body[self.status_at].view("<u4").ravel()
        value[:] = np.nan
        for slots, at, dtype, boolean in self.values:
            raw = body[at].view(dtype).ravel()
            value[slots] = raw != 0 if boolean else raw
        if len(self.no_value_rows):
            codes = status[self.no_value_rows]
            status[self.no_value_rows] = np.where(codes & BAD_BIT, codes, BAD_TYPE_MISMATCH)
        ticks = np.zeros(self.n, dtype=np.int64)
        ticks[self.ts_rows] = body[self.ts_at].view("<i8").ravel()
        source_ts[:] = us1601_to_unix_ns(ticks // 10)


def _gather_plan(rows: np.ndarray, offsets: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The `rows` and the byte indices of their `size`-byte field, one row of indices per entry."""
    return rows, offsets[rows, None] + np.arange(size, dtype=np.intp)


def _scan_layout(
    raw: bytes, start: int, n: int, expected: np.ndarray | None = None, lengths: np.ndarray | None = None
) -> _Layout | None:
    """Walk n DataValues from raw[start]; None if one holds anything but numbers, Booleans or null.

    Numbers and Booleans may be scalars or one-dimensional arrays (without ArrayDimensions).
    """
    offsets, masks, type_bytes, counts = [0] * n, [0] * n, [0] * n, [0] * n
    p, size = start, len(raw)
    sizes = _VALUE_SIZES
    for i in range(n):
        if p >= size:
            return None
        mask = raw[p]
        if mask > 0x3F:
            return None
        q = p + 1
        tbyte = 0
        if mask & MASK_VALUE:
            if q >= size:
                return None
            tbyte = raw[q]
            vt = tbyte & ~_ARRAY_BIT
            if vt not in sizes or (tbyte & _ARRAY_BIT and vt == 0):
                return None
            q += 1
            if tbyte & _ARRAY_BIT:
                if q + 4 > size:
                    return None
                (counts[i],) = _INT32.unpack_from(raw, q)
                # A null array (length -1) has no elements, like an empty one.
                q += 4 + max(counts[i], 0) * sizes[vt]
            else:
                q += sizes[vt]
        offsets[i], masks[i], type_bytes[i] = p - start, mask, tbyte
        p = q + AFTER_VALUE[mask]
    if p > size:
        return None
    return _Layout(offsets, masks, type_bytes, counts, p - start, expected, lengths)


class ReadDecoder:
    """Decodes Read response bodies for a fixed list of n nodes into preallocated slot arrays.

    A scalar node fills one slot, a one-dimensional array node of length L (see `lengths`) fills L
    consecutive slots, each with the node's status and source timestamp.
    """

    def __init__(
        self,
        n: int,
        *,
        out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        expected: Sequence[int] | None = None,
        lengths: Sequence[int] | None = None,
    ) -> None:
        # `out`: (value, status, source_ts) arrays to fill in place, e.g. slices of a larger table
        # shared by the decoders of one request's chunks.
        # `expected`: per node, the Variant type byte its value must arrive as, 0 for any number or
        # Boolean; a value of another type is stored as NaN with BAD_TYPE_MISMATCH, never cast.
        # `lengths`: per node, 0 for a scalar or the exact length of its array value; another
        # shape is a type mismatch too. None: all scalars.
        for name, per_node in (("expected", expected), ("lengths", lengths)):
            if per_node is not None and len(per_node) != n:
                raise ValueError(f"{name} must have {n} entries, got {len(per_node)}")
        m = slot_count(lengths, n)
        if out is None:
            out = (np.full(m, np.nan), np.zeros(m, dtype=np.uint32), np.zeros(m, dtype=np.int64))
        for array, dtype in zip(out, (np.float64, np.uint32, np.int64), strict=True):
            if array.shape != (m,) or array.dtype != dtype:
                raise ValueError(
                    f"out arrays must be ({m},) float64, uint32, int64; got {array.shape} {array.dtype}"
                )
        self.n = n
        # source_ts: ns since 1970, 0 where the server sent no source timestamp.
        self.value, self.status, self.source_ts = out
        self.layout_scans = 0
        self.expected = None if expected is None else np.array(expected, dtype=np.uint8)
        self._expected_list = None if expected is None else [int(x) for x in expected]
        arrays = lengths is not None and any(lengths)
        self._lengths_list = [int(x) for x in lengths] if arrays else None  # type: ignore[union-attr]
        self.lengths = np.array(self._lengths_list, dtype=np.intp) if arrays else None
        # Status and timestamps are per node; with arrays they are decoded here, then spread to slots.
        if self.lengths is None:
            self._slot_node = None
            self._node_status, self._node_ts = self.status, self.source_ts
        else:
            self._slot_node = np.repeat(np.arange(n), np.maximum(self.lengths, 1))
            self._node_status, self._node_ts = np.zeros(n, dtype=np.uint32), np.zeros(n, dtype=np.int64)
        self._layout: _Layout | None = None

    def decode(self, data: Buffer | bytes) -> bool:
        """Fill value/status/source_ts from one response body; True if NumPy did it, False if asyncua did."""
        raw = bytes(data)
        buf = Buffer(raw)
        nodeid_from_binary(buf)
        header = struct_from_binary(ua.ResponseHeader, buf)
        header.ServiceResult.check()
        count = _INT32.unpack(buf.read(4))[0]
        if count != self.n:
            raise SourceError(f"Read returned {max(count, 0)} results for {self.n} nodes")
        start = buf.cur_pos
        body = np.frombuffer(raw, dtype=np.uint8)[start:]
        layout = self._layout
        if layout is None or not layout.matches(body):
            self.layout_scans += 1
            layout = self._layout = _scan_layout(raw, start, self.n, self.expected, self.lengths)
            if layout is None:
                logger.debug("Read of %d nodes: entries NumPy cannot decode, using asyncua's decoder", self.n)
                self.decode_generic(raw)
                return False
        layout.extract(body, self.value, self._node_status, self._node_ts)
        if self._slot_node is not None:
            np.take(self._node_status, self._slot_node, out=self.status)
            np.take(self._node_ts, self._slot_node, out=self.source_ts)
        return True

    def decode_generic(self, data: Buffer | bytes) -> None:
        """Fill the arrays through asyncua's own decoder: the reference the fast path must equal."""
        response = struct_from_binary(ua.ReadResponse, Buffer(bytes(data)))
        response.ResponseHeader.ServiceResult.check()
        datavalues_to_arrays(
            response.Results, self.value, self.status, self.source_ts, self._expected_list, self._lengths_list
        )


class EncodedRead:
    """A ReadRequest whose parameters are encoded once; each send adds a fresh request header."""

    def __init__(self, params: ua.ReadParameters, *, pre_encoded: bool = PRE_ENCODED_SEND) -> None:
        self.params = params
        self.pre_encoded = pre_encoded
        self._params_bin = struct_to_binary(params)

    def to_binary(self, header: ua.RequestHeader) -> bytes:
        """The request as asyncua's struct_to_binary would encode it with this header."""
        return b"".join((_READ_REQUEST_TYPE_ID, struct_to_binary(header), self._params_bin))

    async def send(self, uaclient: UaClient) -> Buffer:
        """One Read on the client's session; the raw response body (TypeId onwards)."""
        proto = uaclient.protocol
        if proto is None:
            raise ConnectionError("Connection is not open")
        if not self.pre_encoded:
            return await proto.send_request(ua.ReadRequest(Parameters=self.params))
        timeout = proto.timeout
        if proto.pre_request_hook is not None:
            await proto.pre_request_hook()
        try:
            data: Buffer = await wait_for(self._submit(proto, timeout), timeout or None)
        except (ua.UaError, asyncio.TimeoutError):
            raise
        except Exception as exc:
            # As UASocketProtocol.send_request: a failure on a closed socket is a lost connection.
            if proto.state is not UASocketState.OPEN:
                raise ConnectionError("Connection is closed") from exc
            raise
        proto.check_answer(data, " in response to ReadRequest")
        return data

    def _submit(self, proto: UASocketProtocol, timeout: float) -> asyncio.Future[Buffer]:
        """UASocketProtocol._send_request of asyncua 2.1, with the request body from to_binary()."""
        # asyncua encodes the whole request inside that method, so the header, ids and security
        # token handling are repeated here step by step; the connection layer still chunks, signs
        # and encrypts the message.
        if proto.transport is None:
            raise ConnectionError("Connection is not open")
        header = ua.RequestHeader()
        proto._setup_request_header(header, timeout)
        request_id = proto._request_id + 1
        try:
            binreq = self.to_binary(header)
            proto.revolve_security_token()
            msg = proto._connection.message_to_binary(
                binreq, message_type=ua.MessageType.SecureMessage, request_id=request_id
            )
        except Exception:
            proto._request_handle -= 1
            raise
        proto._request_id = request_id
        future: asyncio.Future[Buffer] = asyncio.get_running_loop().create_future()
        proto._callbackmap[request_id] = future
        proto.transport.write(msg)
        return future
