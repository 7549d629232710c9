"""Per-value cost of one Read tick: asyncua's encode + decode + a Python loop, against the
pre-encoded request + NumPy decoder the gateway uses. Usage: python benchmarks/read_decode.py [N]"""

from __future__ import annotations

import datetime
import sys
import time

import numpy as np
from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import struct_from_binary, struct_to_binary

from gateway.sources.uabinary import EncodedRead, ReadDecoder, datavalues_to_arrays

n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
params = ua.ReadParameters(
    TimestampsToReturn=ua.TimestampsToReturn.Both,
    NodesToRead=[
        ua.ReadValueId(NodeId=ua.NodeId(f"pump{i // 8:03d}.tag{i % 8}", 2), AttributeId=ua.AttributeIds.Value)
        for i in range(n)
    ],
)
now = datetime.datetime.now(datetime.timezone.utc)


def mk(i):
    vt = ua.VariantType.Double
    return ua.DataValue(ua.Variant(float(i), vt), ua.StatusCode(0), SourceTimestamp=now, ServerTimestamp=now)


resp = struct_to_binary(ua.ReadResponse(Results=[mk(i) for i in range(n)]))
mixed = struct_to_binary(
    ua.ReadResponse(
        Results=[
            ua.DataValue(ua.Variant(i % 2 == 0, ua.VariantType.Boolean))
            if i % 3 == 0
            else ua.DataValue(ua.Variant(i, ua.VariantType.Int32), SourceTimestamp=now)
            if i % 3 == 1
            else mk(i)
            for i in range(n)
        ]
    )
)
value, status, ts = np.empty(n), np.empty(n, np.uint32), np.empty(n, np.int64)


def timeit(f, reps):
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps / n * 1e6


old_enc = timeit(lambda: struct_to_binary(ua.ReadRequest(Parameters=params)), 5)
old_dec = timeit(
    lambda: datavalues_to_arrays(
        struct_from_binary(ua.ReadResponse, Buffer(resp)).Results, value, status, ts
    ),
    5,
)
req = EncodedRead(params)
new_enc = timeit(lambda: req.to_binary(ua.RequestHeader()), 200)
dec = ReadDecoder(n)
new_dec = timeit(lambda: dec.decode(resp), 200)
decm = ReadDecoder(n)
new_decm = timeit(lambda: decm.decode(mixed), 200)
scan = timeit(lambda: ReadDecoder(n).decode(resp), 5)
print(f"n={n}: per value, µs")
print(f"  old: encode {old_enc:.3f}  decode+store loop {old_dec:.3f}  total {old_enc + old_dec:.3f}")
print(
    f"  new: encode {new_enc:.4f}  decode (homogeneous) {new_dec:.4f}  total {new_enc + new_dec:.4f}  ({(old_enc + old_dec) / (new_enc + new_dec):.0f}x)"
)
print(
    f"  new: decode mixed Boolean/Int32/Double, some without ts {new_decm:.4f}; first decode incl. layout scan {scan:.3f}"
)
