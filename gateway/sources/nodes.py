"""Tag addresses: node id strings and browse paths parsed at config load, resolved on every connect.

Accepted forms (OPC 10000-6 5.3.1.10 node id strings, and a browse path below Objects):

- `ns=2;s=Pump01.Temp`, `ns=2;i=1001`, `ns=2;g=<guid>`, `ns=2;b=<base64>`, `i=2258` (namespace 0)
- `nsu=urn:plant:plc1;s=Pump01.Temp` (and `;i=`, `;g=`, `;b=`): the namespace by URI
- `/Objects/2:PLC1/2:Pump01/2:Temperature`: each element `<ns index>:<name>`, `{<ns uri>}<name>`,
  or a bare `<name>` (namespace 0); names cannot contain `/`.

Namespace indexes may change when a PLC is reprogrammed, URIs do not: a URI, and every browse path,
is looked up on each connect, so the resolution is always that of the server now answering.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from collections.abc import Sequence
from dataclasses import dataclass

from asyncua import Client, Node, ua
from asyncua.common.ua_utils import get_base_data_type

from gateway.latest import BAD_TYPE_MISMATCH

_NODE_ID = re.compile(r"^(?:ns=(\d+);|nsu=([^;]+);)?([isgb])=(.+)$", re.DOTALL)
_PATH_ROOT = "/Objects/"
_ELEMENT = re.compile(r"^(?:(\d+):|\{([^}]+)\})?(.+)$", re.DOTALL)
_OBJECTS = ua.NodeId(ua.ObjectIds.ObjectsFolder)
_HIERARCHICAL = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
_NAMESPACE_ARRAY = ua.NodeId(ua.ObjectIds.Server_NamespaceArray)
# Requests stay well below most servers' operation limits for TranslateBrowsePathsToNodeIds.
_TRANSLATE_CHUNK = 1000
# Built-in ids of Boolean..Double: they equal the Variant type byte a value of that type arrives with.
_SCALAR_TYPES = range(ua.VariantType.Boolean.value, ua.VariantType.Double.value + 1)
# Number, Integer, UInteger: abstract, so a value may arrive as any numeric type.
_ABSTRACT_NUMBERS = frozenset({26, 27, 28})
_ENUMERATION = 29
_FIRST_NON_BUILTIN = 30
ANY_NUMERIC = 0
_ONE_DIMENSION_RANKS = frozenset({1, 0, -2, -3})

SYNTAX_HELP = (
    "must be a node id like 'ns=2;s=Pump01.Temp', 'ns=2;i=1001', 'ns=2;g=<guid>', 'ns=2;b=<base64>', "
    "'i=2258', 'nsu=<namespace uri>;s=Pump01.Temp', or a browse path like '/Objects/2:PLC1/2:Pump01'"
)


@dataclass(frozen=True)
class NodeRef:
    """A parsed tag address: a node id (its namespace by index or URI) or a browse path."""

    text: str
    # The node id; with `uri`, its NamespaceIndex is a placeholder until the URI is looked up.
    node_id: ua.NodeId | None = None
    uri: str | None = None
    # Browse path elements below Objects: (namespace index or URI, browse name).
    path: tuple[tuple[int | str, str], ...] = ()


def parse_node_ref(text: str) -> NodeRef:
    """Parse a config `node_id`; ValueError with SYNTAX_HELP-style text when it is malformed."""
    if text.startswith(_PATH_ROOT):
        return NodeRef(text, path=tuple(_parse_element(e, text) for e in text[len(_PATH_ROOT) :].split("/")))
    m = _NODE_ID.match(text)
    if m is None:
        raise ValueError(SYNTAX_HELP)
    ns, uri, kind, ident = m.groups()
    if kind == "b" and not ident.startswith("0x"):
        try:
            b64decode(ident, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"'b=' needs base64 bytes, got {ident!r}") from None
    try:
        parsed = ua.NodeId.from_string(text if uri is None else f"{kind}={ident}")
    except (ValueError, ua.UaError) as exc:
        cause = exc.__cause__ or exc
        raise ValueError(f"invalid {kind}= identifier {ident!r}: {cause}") from None
    node_id = ua.NodeId(parsed.Identifier, int(ns or 0), parsed.NodeIdType)
    return NodeRef(text, node_id=node_id, uri=uri)


def _parse_element(element: str, text: str) -> tuple[int | str, str]:
    """One browse path element: '2:Name', '{urn:x}Name' or 'Name' (namespace 0)."""
    m = _ELEMENT.match(element)
    if not element or m is None:
        raise ValueError(f"browse path {text!r} has an empty element")
    ns, uri, name = m.groups()
    return (uri if uri is not None else int(ns or 0)), name


@dataclass(frozen=True)
class Resolved:
    """A tag on the server now connected: its node and expected Variant type, or why it cannot be read."""

    node_id: ua.NodeId | None
    # The built-in type its values must arrive as (1 Boolean .. 11 Double), or ANY_NUMERIC.
    variant_type: int = ANY_NUMERIC
    # Set with `problem`: the status the tag carries until the next connect.
    status: int = 0
    problem: str | None = None


async def resolve(
    client: Client, refs: Sequence[NodeRef], max_per_read: int, arrays: Sequence[bool] | None = None
) -> list[Resolved]:
    """Locate every ref (locate_nodes), then check each node is a numeric or boolean scalar.

    With `arrays`, the refs where it is True must instead be one-dimensional numeric or boolean arrays.
    """
    out = await locate_nodes(client, refs)
    found = [i for i, r in enumerate(out) if r.node_id is not None]
    checked = await _check_types(
        client,
        [n for r in out if (n := r.node_id) is not None],
        max_per_read,
        [bool(arrays and arrays[i]) for i in found],
    )
    for i, result in zip(found, checked, strict=True):
        out[i] = result
    return out


async def locate_nodes(client: Client, refs: Sequence[NodeRef]) -> list[Resolved]:
    """The node id of every ref on the server now connected: URIs mapped to indexes, browse paths translated.

    The nodes are not checked to exist or to be variables; a ref that cannot be located comes back
    without node_id and with `problem` (status BadNodeIdUnknown when a namespace URI is not on the server).
    """
    uris = {r.uri for r in refs if r.uri} | {ns for r in refs for ns, _ in r.path if isinstance(ns, str)}
    index = await _namespace_indexes(client) if uris else {}
    out: list[Resolved | None] = [None] * len(refs)
    paths: list[int] = []
    for i, ref in enumerate(refs):
        missing = sorted(
            {u for u in (ref.uri, *(ns for ns, _ in ref.path)) if isinstance(u, str)} - set(index)
        )
        if missing:
            out[i] = Resolved(
                None,
                status=ua.StatusCodes.BadNodeIdUnknown,
                problem=f"namespace {missing[0]!r} not on the server",
            )
        elif ref.path:
            paths.append(i)
        elif ref.uri is not None:
            assert ref.node_id is not None
            out[i] = Resolved(ua.NodeId(ref.node_id.Identifier, index[ref.uri], ref.node_id.NodeIdType))
        else:
            out[i] = Resolved(ref.node_id)
    for i, result in zip(paths, await _translate(client, [refs[i].path for i in paths], index), strict=True):
        out[i] = result
    return out  # type: ignore[return-value]


async def _namespace_indexes(client: Client) -> dict[str, int]:
    """The server's NamespaceArray as URI -> index, in one Read."""
    params = ua.ReadParameters(
        NodesToRead=[ua.ReadValueId(NodeId=_NAMESPACE_ARRAY, AttributeId=ua.AttributeIds.Value)]
    )
    (result,) = await client.uaclient.read(params)
    result.StatusCode.check()
    return {uri: i for i, uri in enumerate(result.Value.Value or [])}


async def _translate(
    client: Client, paths: Sequence[tuple[tuple[int | str, str], ...]], index: dict[str, int]
) -> list[Resolved]:
    """All browse paths in one TranslateBrowsePathsToNodeIds call per chunk of _TRANSLATE_CHUNK."""
    out: list[Resolved] = []
    for start in range(0, len(paths), _TRANSLATE_CHUNK):
        requests = [
            ua.BrowsePath(
                StartingNode=_OBJECTS,
                RelativePath=ua.RelativePath(
                    Elements=[
                        ua.RelativePathElement(
                            ReferenceTypeId=_HIERARCHICAL,
                            IsInverse=False,
                            IncludeSubtypes=True,
                            TargetName=ua.QualifiedName(name, ns if isinstance(ns, int) else index[ns]),
                        )
                        for ns, name in path
                    ]
                ),
            )
            for path in paths[start : start + _TRANSLATE_CHUNK]
        ]
        for result in await client.uaclient.translate_browsepaths_to_nodeids(requests):
            targets = [t for t in result.Targets or [] if t.RemainingPathIndex == ua.UInt32(0xFFFFFFFF)]
            if not result.StatusCode.is_good() or not targets:
                code = (
                    result.StatusCode.value if not result.StatusCode.is_good() else ua.StatusCodes.BadNoMatch
                )
                out.append(
                    Resolved(None, status=code, problem=f"browse path not found ({ua.StatusCode(code).name})")
                )
            elif len(targets) > 1:
                out.append(
                    Resolved(
                        None,
                        status=ua.StatusCodes.BadNoMatch,
                        problem=f"browse path matches {len(targets)} nodes",
                    )
                )
            else:
                t = targets[0].TargetId
                out.append(Resolved(ua.NodeId(t.Identifier, t.NamespaceIndex, t.NodeIdType)))
    return out


async def _check_types(
    client: Client, nodes: Sequence[ua.NodeId], max_per_read: int, arrays: Sequence[bool]
) -> list[Resolved]:
    """Read DataType and ValueRank of every node (batched): keep numeric or boolean scalars, or arrays where asked."""
    attrs = (ua.AttributeIds.DataType, ua.AttributeIds.ValueRank)
    step = max(1, max_per_read // len(attrs))
    rows: list[ua.DataValue] = []
    for start in range(0, len(nodes), step):
        params = ua.ReadParameters(
            NodesToRead=[
                ua.ReadValueId(NodeId=n, AttributeId=a) for n in nodes[start : start + step] for a in attrs
            ]
        )
        rows += await client.uaclient.read(params)
    types = {d.Value.Value for d in rows[::2] if d.StatusCode.is_good()}
    # One lookup per distinct data type: a plant's tags share a handful.
    bases = {t: await base_type(client, t) for t in types}
    out: list[Resolved] = []
    for k, node in enumerate(nodes):
        dtype, rank = rows[2 * k], rows[2 * k + 1]
        if not dtype.StatusCode.is_good():
            code = dtype.StatusCode.value
            what = "not a variable" if code == ua.StatusCodes.BadAttributeIdInvalid else "cannot be read"
            out.append(Resolved(None, status=code, problem=f"{what} ({dtype.StatusCode.name})"))
            continue
        data_type: ua.NodeId = dtype.Value.Value
        value_rank = rank.Value.Value if rank.StatusCode.is_good() else -1
        base = bases[data_type]
        name = (
            ua.ObjectIdNames.get(data_type.Identifier, data_type.to_string())
            if data_type.NamespaceIndex == 0
            else data_type.to_string()
        )
        # ValueRank: -1 scalar, -2 any, -3 scalar or 1-D, 0 one or more dimensions, n >= 1 n dimensions.
        if arrays[k] and value_rank not in _ONE_DIMENSION_RANKS:
            problem = f"{name} with ValueRank {value_rank}, not a one-dimensional array"
        elif not arrays[k] and value_rank is not None and value_rank >= 0:
            problem = f"{name} array, not a scalar (set array_length for a one-dimensional array)"
        elif base == _ENUMERATION:
            problem = f"{name} is an enumeration"
        elif base in _SCALAR_TYPES:
            out.append(Resolved(node, variant_type=base))
            continue
        elif base in _ABSTRACT_NUMBERS:
            out.append(Resolved(node, variant_type=ANY_NUMERIC))
            continue
        else:
            problem = f"data type {name} is not numeric or boolean"
        out.append(Resolved(None, status=BAD_TYPE_MISMATCH, problem=problem))
    return out


async def base_type(client: Client, data_type: ua.NodeId) -> int | None:
    """Identifier of the built-in type (ns=0, i<30) a data type derives from; None if there is none.

    The built-ins themselves need no request.
    """
    if (
        data_type.NamespaceIndex == 0
        and isinstance(data_type.Identifier, int)
        and data_type.Identifier < _FIRST_NON_BUILTIN
    ):
        return data_type.Identifier
    try:
        base = await get_base_data_type(Node(client.uaclient, data_type))
    except ua.UaError:
        return None
    return int(base.nodeid.Identifier)
