"""`edge-gateway browse`: a server's address space as a tree, and a ready-to-edit tags block for one object.

Browsing goes level by level: one Browse request for every node of a level and one Read of the
DataType, ValueRank and ArrayDimensions of every variable of that level, so a plant of 5,000
variables costs a handful of requests rather than one per node. The session is opened exactly as a
source's (a SourceConfig with the same security block, gateway.sources.security.new_client and
connect_client), so a browse that works proves the config's security settings work too. The command
line is gateway.browse_cli.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import yaml
from asyncua import Client, ua

from gateway.config import SourceConfig
from gateway.errors import SourceError
from gateway.sources.nodes import NodeRef, base_type, locate_nodes
from gateway.sources.security import connect_client, new_client

_OBJECTS = ua.NodeId(ua.ObjectIds.ObjectsFolder)
_SERVER = ua.NodeId(ua.ObjectIds.Server)
_HIERARCHICAL = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
_HAS_PROPERTY = ua.NodeId(ua.ObjectIds.HasProperty)
# Requests stay well below asyncua's and most PLCs' MaxNodesPerBrowse / MaxNodesPerRead.
_CHUNK = 1000
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
_NAME_MAX = 64
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Built-in types a tag can be read as a number from; Number/Integer/UInteger are their abstract parents.
_NUMERIC_BASES = frozenset(range(ua.VariantType.Boolean.value, ua.VariantType.Double.value + 1)) | {
    26,
    27,
    28,
}
_ENUMERATION = 29
_RANKS = {-3: "scalar or array", -2: "any rank", -1: "scalar", 0: "array (one or more dims)"}


class BrowseError(SourceError):
    """The server could not be reached or browsed, or the node asked for does not exist."""


@dataclass
class BrowsedNode:
    """One node of the browsed tree; variables carry their data type and value rank."""

    node_id: ua.NodeId
    browse_name: ua.QualifiedName
    node_class: ua.NodeClass
    data_type: ua.NodeId | None = None
    type_name: str = ""
    value_rank: int | None = None
    dimensions: list[int] | None = None
    # Reached again through another reference: listed, not expanded a second time.
    repeated: bool = False
    children: list[BrowsedNode] = field(default_factory=list)

    @property
    def qualified_name(self) -> str:
        """Browse name with its namespace index, e.g. '2:pump01'."""
        return f"{self.browse_name.NamespaceIndex}:{self.browse_name.Name}"

    def rank_text(self) -> str:
        """'scalar', 'array[3]', 'array[2x?]', ...; '' when not a variable."""
        if self.value_rank is None:
            return ""
        if self.value_rank >= 1:
            dims = self.dimensions or [0] * self.value_rank
            return "array[" + "x".join(str(d) if d else "?" for d in dims) + "]"
        return _RANKS.get(self.value_rank, f"value rank {self.value_rank}")

    @property
    def array_length(self) -> int | None:
        """L for a one-dimensional array of fixed length (ValueRank 1, ArrayDimensions [L], L > 0), else None."""
        if self.value_rank == 1 and self.dimensions is not None and len(self.dimensions) == 1:
            return self.dimensions[0] or None
        return None

    def line(self) -> str:
        """One line of the tree for this node, without indentation."""
        parts = [self.qualified_name, self.node_class.name, self.node_id.to_string()]
        if self.node_class == ua.NodeClass.Variable:
            parts += [self.type_name or "?", self.rank_text()]
        if self.repeated:
            parts.append("(listed above)")
        return "  ".join(parts)


def _plain(node_id: ua.NodeId) -> ua.NodeId:
    """A local NodeId from a browse result's ExpandedNodeId, so it compares and prints like a config's."""
    return ua.NodeId(node_id.Identifier, node_id.NamespaceIndex, node_id.NodeIdType)


class AddressSpace:
    """Batched browse and read helpers over one connected client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._type_names: dict[ua.NodeId, str] = {}

    async def references(
        self, nodes: Sequence[ua.NodeId], ref_type: ua.NodeId = _HIERARCHICAL
    ) -> list[list[ua.ReferenceDescription]]:
        """Forward references of the given type (and subtypes) of every node, in few Browse requests."""
        out: list[list[ua.ReferenceDescription]] = []
        for start in range(0, len(nodes), _CHUNK):
            params = ua.BrowseParameters()
            params.NodesToBrowse = [
                ua.BrowseDescription(
                    NodeId=n,
                    BrowseDirection=ua.BrowseDirection.Forward,
                    ReferenceTypeId=ref_type,
                    IncludeSubtypes=True,
                    NodeClassMask=0,
                    ResultMask=ua.BrowseResultMask.All,
                )
                for n in nodes[start : start + _CHUNK]
            ]
            results = await self.client.uaclient.browse(params)
            refs = [list(r.References or []) for r in results]
            await self._continue(results, refs)
            out += refs
        return out

    async def _continue(
        self, results: list[ua.BrowseResult], refs: list[list[ua.ReferenceDescription]]
    ) -> None:
        """Follow continuation points until every node's references are in."""
        pending = {i: r.ContinuationPoint for i, r in enumerate(results) if r.ContinuationPoint}
        while pending:
            params = ua.BrowseNextParameters(
                ReleaseContinuationPoints=False, ContinuationPoints=list(pending.values())
            )
            more = await self.client.uaclient.browse_next(params)
            nxt: dict[int, bytes] = {}
            for i, r in zip(list(pending), more, strict=True):
                refs[i] += r.References or []
                if r.ContinuationPoint:
                    nxt[i] = r.ContinuationPoint
            pending = nxt

    async def read(
        self, nodes: Sequence[ua.NodeId], attrs: Sequence[ua.AttributeIds]
    ) -> list[list[ua.DataValue]]:
        """`attrs` of every node, one row per node, in few Read requests."""
        rows: list[list[ua.DataValue]] = []
        step = max(1, _CHUNK // len(attrs))
        for start in range(0, len(nodes), step):
            params = ua.ReadParameters()
            params.NodesToRead = [
                ua.ReadValueId(NodeId=n, AttributeId=a) for n in nodes[start : start + step] for a in attrs
            ]
            values = await self.client.uaclient.read(params)
            rows += [values[i : i + len(attrs)] for i in range(0, len(values), len(attrs))]
        return rows

    async def node(self, node_id: ua.NodeId) -> BrowsedNode:
        """The node with this id, checked to exist."""
        ((name, cls),) = await self.read([node_id], [ua.AttributeIds.BrowseName, ua.AttributeIds.NodeClass])
        if not name.StatusCode.is_good():
            raise BrowseError(f"unknown node {node_id.to_string()}: {name.StatusCode.name}")
        return BrowsedNode(node_id, name.Value.Value, ua.NodeClass(cls.Value.Value))

    async def resolve(self, ref: NodeRef | None) -> BrowsedNode:
        """The start node `ref` (see browse_cli.start_ref) on this server, checked to exist; None is Objects."""
        if ref is None:
            return await self.node(_OBJECTS)
        (found,) = await locate_nodes(self.client, [ref])
        if found.node_id is not None:
            return await self.node(found.node_id)
        if found.status == ua.StatusCodes.BadNodeIdUnknown:
            # A namespace URI the server does not have.
            raise BrowseError(f"unknown node {ref.text!r}: {found.problem}")
        # A config's bare name is namespace 0, as here; plant objects rarely are.
        hint = "; a name without 'N:' is in namespace 0" if any(ns == 0 for ns, _ in ref.path) else ""
        raise BrowseError(f"unknown browse path {ref.text!r}: {found.problem}{hint}")

    async def describe(self, variables: Sequence[BrowsedNode]) -> None:
        """Fill in data type, its name, value rank and array dimensions of variables, in one pass."""
        attrs = [ua.AttributeIds.DataType, ua.AttributeIds.ValueRank, ua.AttributeIds.ArrayDimensions]
        rows = await self.read([v.node_id for v in variables], attrs)
        for var, (dtype, rank, dims) in zip(variables, rows, strict=True):
            if dtype.StatusCode.is_good():
                var.data_type = dtype.Value.Value
            if rank.StatusCode.is_good():
                var.value_rank = int(rank.Value.Value)
            if dims.StatusCode.is_good() and dims.Value.Value:
                var.dimensions = [int(d) for d in dims.Value.Value]
        unknown = sorted(
            {v.data_type for v in variables if v.data_type is not None} - set(self._type_names), key=str
        )
        ns0 = [t for t in unknown if t.NamespaceIndex == 0 and t.Identifier in ua.ObjectIdNames]
        for t in ns0:
            self._type_names[t] = ua.ObjectIdNames[t.Identifier]
        others = [t for t in unknown if t not in self._type_names]
        for t, (name,) in zip(others, await self.read(others, [ua.AttributeIds.BrowseName]), strict=True):
            self._type_names[t] = name.Value.Value.Name if name.StatusCode.is_good() else t.to_string()
        for var in variables:
            if var.data_type is not None:
                var.type_name = self._type_names[var.data_type]

    async def tree(self, root: BrowsedNode, depth: int, *, show_all: bool) -> BrowsedNode:
        """Fill `root.children` down to `depth` levels, breadth first, one batch per level."""
        if root.node_class == ua.NodeClass.Variable:
            await self.describe([root])
        seen = {root.node_id}
        level = [root]
        for _ in range(depth):
            parents = [n for n in level if not n.repeated]
            if not parents:
                break
            level = []
            for parent, refs in zip(
                parents, await self.references([p.node_id for p in parents]), strict=True
            ):
                for ref in refs:
                    node_id = _plain(ref.NodeId)
                    if node_id == _SERVER and not show_all:
                        continue
                    child = BrowsedNode(node_id, ref.BrowseName, ref.NodeClass, repeated=node_id in seen)
                    seen.add(node_id)
                    parent.children.append(child)
                    level.append(child)
            await self.describe([n for n in level if n.node_class == ua.NodeClass.Variable])
        return root

    async def units(self, variables: Sequence[BrowsedNode]) -> dict[ua.NodeId, str]:
        """DisplayName of each variable's EngineeringUnits property, where it has one."""
        props: dict[ua.NodeId, ua.NodeId] = {}
        for var, refs in zip(
            variables, await self.references([v.node_id for v in variables], _HAS_PROPERTY), strict=True
        ):
            for ref in refs:
                if ref.BrowseName.NamespaceIndex == 0 and ref.BrowseName.Name == "EngineeringUnits":
                    props[var.node_id] = _plain(ref.NodeId)
        rows = await self.read(list(props.values()), [ua.AttributeIds.Value])
        units: dict[ua.NodeId, str] = {}
        for var_id, (value,) in zip(props, rows, strict=True):
            eu = value.Value.Value if value.StatusCode.is_good() and value.Value is not None else None
            if isinstance(eu, ua.EUInformation) and eu.DisplayName.Text:
                units[var_id] = eu.DisplayName.Text
        return units


@contextlib.asynccontextmanager
async def connected(cfg: SourceConfig) -> AsyncIterator[AddressSpace]:
    """A session opened like the gateway's source `cfg` opens one; I/O and protocol failures become BrowseError.

    Security and login refusals come as the SecurityError lines the gateway logs for a source.
    """
    endpoint, timeout = cfg.endpoint, cfg.timeout_s
    client = new_client(cfg)
    opened = False
    try:
        try:
            await asyncio.wait_for(connect_client(client, cfg), timeout)
            opened = True
            yield AddressSpace(client)
        except asyncio.TimeoutError as exc:
            raise BrowseError(f"{endpoint}: no answer within {timeout:g} s") from exc
        except (OSError, ua.UaError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise BrowseError(f"{endpoint}: {reason}") from exc
    finally:
        with contextlib.suppress(OSError, asyncio.TimeoutError, ua.UaError):
            if opened:
                await asyncio.wait_for(client.disconnect(), timeout)
        client.disconnect_socket()


def format_tree(root: BrowsedNode) -> str:
    """The tree as indented lines, two spaces per level."""
    lines: list[str] = []

    def walk(node: BrowsedNode, indent: int) -> None:
        lines.append("  " * indent + node.line())
        for child in node.children:
            walk(child, indent + 1)

    walk(root, 0)
    return "\n".join(lines)


def tag_name(browse_name: str, taken: set[str]) -> str:
    """A config Name (^[A-Za-z0-9][A-Za-z0-9_.-]*$, 64 chars) from a browse name, unique among `taken`."""
    name = _NAME_BAD.sub("_", browse_name).lstrip("_.-")[:_NAME_MAX] or "tag"
    base, n = name, 1
    while name in taken:
        n += 1
        suffix = f"_{n}"
        name = base[: _NAME_MAX - len(suffix)] + suffix
    taken.add(name)
    return name


def _scalar(text: str) -> str:
    """`text` as a YAML scalar: plain when YAML reads it back as this string (not `on`, `1e3`), else quoted."""
    return text if _PLAIN.fullmatch(text) and yaml.safe_load(text) == text else json.dumps(text)


def _why_not_a_tag(var: BrowsedNode, bases: dict[ua.NodeId, int | None]) -> str | None:
    """None when the variable can be a gateway tag (numeric or boolean, a scalar or a fixed 1-D array), else why.

    `bases` maps each data type to the built-in type it derives from (nodes.base_type).
    """
    if var.data_type is None:
        return "data type unreadable"
    if var.value_rank == 1 and var.array_length is None:
        return f"{var.type_name} {var.rank_text()}: length unknown (no fixed ArrayDimensions)"
    if var.value_rank != -1 and var.array_length is None:
        return f"{var.type_name} {var.rank_text()}, not a scalar or a one-dimensional array"
    base = bases[var.data_type]
    if base == _ENUMERATION:
        return f"{var.type_name} is an enumeration"
    if base not in _NUMERIC_BASES:
        return f"{var.type_name} is not numeric"
    return None


async def tags_yaml(space: AddressSpace, ref: NodeRef | None) -> str:
    """A `tags:` block for the numeric and boolean scalars and fixed-length 1-D arrays directly under `ref`."""
    obj = await space.resolve(ref)
    (refs,) = await space.references([obj.node_id])
    variables = [
        BrowsedNode(_plain(r.NodeId), r.BrowseName, r.NodeClass)
        for r in refs
        if r.NodeClass == ua.NodeClass.Variable
    ]
    await space.describe(variables)
    # One lookup per distinct data type, the built-ins without a request.
    types = {v.data_type for v in variables if v.data_type is not None}
    bases = {t: await base_type(space.client, t) for t in types}
    reasons = [_why_not_a_tag(v, bases) for v in variables]
    units = await space.units([v for v, why in zip(variables, reasons, strict=True) if why is None])
    kept = sum(why is None for why in reasons)
    lines = [
        f"# {obj.qualified_name} ({obj.node_id.to_string()}): {kept} of {len(variables)} variable(s) usable as tags",
        "tags:" if kept else "tags: []",
    ]
    taken: set[str] = set()
    for var, why in zip(variables, reasons, strict=True):
        name = tag_name(var.browse_name.Name, taken)
        length = f", array_length: {var.array_length}" if var.array_length is not None else ""
        entry = (
            f"- {{name: {_scalar(name)}, node_id: {json.dumps(var.node_id.to_string())}, "
            f"unit: {json.dumps(units.get(var.node_id, ''))}{length}}}"
        )
        lines.append(f"  {entry}" if why is None else f"  # {entry}  # left out: {why}")
    return "\n".join(lines)
