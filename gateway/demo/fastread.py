"""Double variables of an asyncua server whose values live in NumPy arrays, with Reads answered from them.

asyncua's server spends several µs per value on a Read: it decodes each ReadValueId, returns the
stored DataValue object and encodes it field by field. A poller sends the same ReadRequest
parameters every tick, so here the parameter bytes are looked up in a small cache; a request whose
nodes are all these variables' Value attributes (TimestampsToReturn Source or Both, no IndexRange,
no DataEncoding) gets its Results encoded by vectorised assignment into fixed-size entries (OPC
10000-6 5.2.2.17): mask 0x0F, Variant type Double and 8 value bytes, StatusCode, source and server
timestamps. A Bad entry carries a Null Variant (no value bytes), as asyncua's write path stores it.
The bytes are the ones asyncua would send for the same DataValues. Any other request is handed to
asyncua unchanged.

Every other path sees the same values: each variable's Value attribute gets a value callback that
builds its DataValue from the arrays when asyncua reads it (plain Reads, monitored items' first
value) and a value setter, so a write from elsewhere is kept until the next update(). "Current" is
exact: every path returns the values of the latest update(), whose timestamp is source and server
timestamp alike. update() notifies the variables' monitored items from the arrays as well
(fastpublish.ArrayNotifier).

The Read interception wraps asyncua 2.1's UaProcessor._process_message, once per process, and acts
only for servers that registered here; READ_HOOK says whether this asyncua has the internals it uses.
"""

from __future__ import annotations

import inspect
import logging
import struct
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import asyncua
import numpy as np
from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.common.connection import SecureConnection
from asyncua.common.utils import Buffer
from asyncua.server.address_space import NodeData
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import nodeid_to_binary, struct_from_binary, struct_to_binary

from gateway.demo.fastpublish import BAD_BIT, ArrayNotifier, encode_datavalues

logger = logging.getLogger(__name__)

# The asyncua 2.1 internals the Read hook relies on; without them every Read goes through asyncua.
READ_HOOK = (
    list(inspect.signature(UaProcessor._process_message).parameters)
    == ["self", "typeid", "requesthdr", "seqhdr", "body"]
    and hasattr(SecureConnection, "message_to_binary")
    and all(hasattr(InternalSession, name) for name in ("is_activated", "touch"))
)

_VALUE_ID = ua.AttributeIds.Value
_DOUBLE = ua.VariantType.Double
_NULL = ua.Variant(None, ua.VariantType.Null)
_GOOD = ua.StatusCode(ua.UInt32(ua.StatusCodes.Good))
_READ_REQUEST = ua.NodeId(ua.Int32(ua.ObjectIds.ReadRequest_Encoding_DefaultBinary))
_READ_RESPONSE_ID = nodeid_to_binary(ua.ReadResponse().TypeId)
_NO_DIAGNOSTICS = struct.pack("<i", 0)
_NO_ENCODING = ua.QualifiedName()
# Distinct Read parameter sets remembered: a poller sends one per request chunk.
_PLANS = 64
_ANSWERED_TIMESTAMPS = (ua.TimestampsToReturn.Source, ua.TimestampsToReturn.Both)


def encode_results(value: np.ndarray, status: np.ndarray, ticks: int) -> bytes:
    """A ReadResponse's Results array (count, then entries) for Double values, as asyncua encodes
    DataValue(Variant(v, Double), StatusCode(s), t, t); a Bad status gets a Null Variant instead.

    ticks: the timestamp in 100 ns since 1601 (ua.datetime_to_win_epoch).
    """
    return struct.pack("<i", len(value)) + encode_datavalues(value, status, ticks)


class ArrayVariables:
    """Double Value attributes of `server` backed by arrays; update() publishes, Reads come from the arrays."""

    def __init__(self, server: Server, node_ids: Sequence[ua.NodeId]) -> None:
        n = len(node_ids)
        self.server = server
        self.node_ids = list(node_ids)
        self.value = np.zeros(n)
        self.status = np.zeros(n, dtype=np.uint32)
        self.timestamp: ua.DateTime | None = None
        # Read requests answered from the arrays, handed to asyncua, and parameter decodes (cache misses).
        self.fast_reads = 0
        self.plain_reads = 0
        self.plans = 0
        self._ticks = 0
        self._rows = {nid: row for row, nid in enumerate(self.node_ids)}
        aspace = server.iserver.aspace
        self._attrs = [aspace[nid].attributes[_VALUE_ID] for nid in self.node_ids]
        # Rows written from outside since the last update(), served as written until then.
        self._written: dict[int, ua.DataValue] = {}
        # Parameter bytes -> rows to answer from, or None for a request asyncua answers.
        # Bounded by _PLANS; overflow policy: the least recently used entry is evicted.
        self._plans: OrderedDict[bytes, np.ndarray | None] = OrderedDict()
        for nid in self.node_ids:
            server.set_attribute_value_callback(nid, self._read_value)
            server.set_attribute_value_setter(nid, self._store_write)
        # Monitored items of these variables are notified from the arrays too.
        self.notifier = ArrayNotifier(server, self._attrs)
        self._iserver: InternalServer | None = None
        if READ_HOOK:
            _install_read_hook()
            self._iserver = server.iserver
            _responders[server.iserver] = self
        else:
            logger.warning(
                "asyncua %s lacks the internals fast Reads use; Reads go through asyncua", asyncua.__version__
            )

    def close(self) -> None:
        """Stop answering Reads here (the value callbacks stay, with the last values)."""
        if self._iserver is not None:
            _responders.pop(self._iserver, None)
            self._iserver = None

    def data_value(self, row: int) -> ua.DataValue:
        """The DataValue a Read of this row's variable returns now."""
        written = self._written.get(row)
        if written is not None:
            return written
        code = int(self.status[row])
        status = _GOOD if code == 0 else ua.StatusCode(ua.UInt32(code))
        variant = _NULL if code & BAD_BIT else ua.Variant(float(self.value[row]), _DOUBLE)
        return ua.DataValue(variant, status, self.timestamp, self.timestamp)

    async def update(self, value: np.ndarray, status: np.ndarray, timestamp: ua.DateTime) -> None:
        """Publish new values and status codes, stamped `timestamp`; monitored items are notified."""
        written = list(self._written)
        self.notifier.refresh(self.value, self.status)
        self.value[:] = value
        self.status[:] = status
        self.timestamp = timestamp
        self._ticks = ua.datetime_to_win_epoch(timestamp)
        self._written.clear()
        await self.notifier.notify(self.value, self.status, self._ticks, written, self.data_value)

    def _read_value(self, nodeid: ua.NodeId, _attr: ua.AttributeIds) -> ua.DataValue:
        return self.data_value(self._rows[nodeid])

    def _store_write(self, node: NodeData, _attr: ua.AttributeIds, value: ua.DataValue) -> None:
        self._written[self._rows[node.nodeid]] = value

    def answer_read(self, proc: UaProcessor, request_handle: int, seqhdr: Any, body: Buffer) -> bool:
        """Send the response to a ReadRequest from the arrays; False (nothing sent) if asyncua must answer."""
        session = proc.session
        # Refusals (no session, not activated, not permitted) and read callbacks are asyncua's to handle.
        permissions = proc._connection.security_policy.permissions
        # Keyed by CallbackType at run time, whatever the annotation says.
        listeners: dict[Any, Any] = self.server.iserver.callback_service._listeners
        if (
            session is None
            or not session.is_activated()
            or (permissions is not None and not permissions.check_validity(session.user, _READ_REQUEST, body))
            or listeners.get(CallbackType.PreRead)
            or listeners.get(CallbackType.PostRead)
        ):
            self.plain_reads += 1
            return False
        key = bytes(body.copy().read(len(body)))
        rows = self._plan(key)
        if rows is None or (self._written and np.isin(list(self._written), rows).any()):
            self.plain_reads += 1
            return False
        # What asyncua does for every request of an activated session, so the session stays alive.
        proc.session_last_activity = time.monotonic()
        session.touch()
        header = struct_to_binary(ua.ResponseHeader(RequestHandle=request_handle))
        results = encode_results(self.value[rows], self.status[rows], self._ticks)
        message = proc._connection.message_to_binary(
            b"".join((_READ_RESPONSE_ID, header, results, _NO_DIAGNOSTICS)), request_id=seqhdr.RequestId
        )
        proc._transport.write(message)
        self.fast_reads += 1
        return True

    def _plan(self, key: bytes) -> np.ndarray | None:
        """The rows a request with these parameter bytes reads, or None if it is not for the arrays."""
        plans = self._plans
        if key in plans:
            plans.move_to_end(key)
            return plans[key]
        self.plans += 1
        params = struct_from_binary(ua.ReadParameters, Buffer(key))
        rows: np.ndarray | None = None
        if params.TimestampsToReturn in _ANSWERED_TIMESTAMPS and all(
            r.AttributeId == _VALUE_ID
            and r.NodeId in self._rows
            and not r.IndexRange
            and r.DataEncoding == _NO_ENCODING
            for r in params.NodesToRead
        ):
            rows = np.array([self._rows[r.NodeId] for r in params.NodesToRead], dtype=np.intp)
        plans[key] = rows
        if len(plans) > _PLANS:
            plans.popitem(last=False)
        return rows


_responders: weakref.WeakKeyDictionary[InternalServer, ArrayVariables] = weakref.WeakKeyDictionary()
_original_process_message: Any = None


def _install_read_hook() -> None:
    """Route ReadRequests of registered servers to their ArrayVariables; idempotent."""
    global _original_process_message
    if _original_process_message is not None:
        return
    original = _original_process_message = UaProcessor._process_message

    async def _process_message(
        self: UaProcessor, typeid: ua.NodeId, requesthdr: Any, seqhdr: Any, body: Buffer
    ) -> Any:
        if typeid == _READ_REQUEST:
            variables = _responders.get(self.iserver)
            if variables is not None and variables.answer_read(self, requesthdr.RequestHandle, seqhdr, body):
                return True
        return await original(self, typeid, requesthdr, seqhdr, body)

    UaProcessor._process_message = _process_message  # type: ignore[method-assign]
