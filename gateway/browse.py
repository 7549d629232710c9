"""`edge-gateway browse`: a server's address space as a tree, and a ready-to-edit tags block for one object.

Browsing goes level by level: one Browse request for every node of a level and one Read of the
DataType, ValueRank and ArrayDimensions of every variable of that level, so a plant of 5,000
variables costs a handful of requests rather than one per node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import yaml
from asyncua import Client, Node, ua
from asyncua.common.ua_utils import get_base_data_type

from gateway.errors import EXIT_OK, SourceError

_OBJECTS = ua.NodeId(ua.ObjectIds.ObjectsFolder)
_SERVER = ua.NodeId(ua.ObjectIds.Server)
_HIERARCHICAL = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
_HAS_PROPERTY = ua.NodeId(ua.ObjectIds.HasProperty)
# Requests stay well below asyncua's and most PLCs' MaxNodesPerBrowse / MaxNodesPerRead.
_CHUNK = 1000
_SESSION_TIMEOUT_MS = 60_000
_NODE_ID = re.compile(r"^(ns=\d+;)?[isgb]=.+$")
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
        self._type_bases: dict[ua.NodeId, int | None] = {}

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

    async def resolve(self, spec: str | None) -> BrowsedNode:
        """A NodeId string, or a browse path below Objects such as '2:pump01' or 'plant/pump01'."""
        if not spec:
            return await self.node(_OBJECTS)
        if _NODE_ID.match(spec):
            try:
                node_id = ua.NodeId.from_string(spec)
            except (ValueError, ua.UaError) as exc:
                raise BrowseError(f"invalid node id {spec!r}: {exc}") from exc
            return await self.node(node_id)
        current = await self.node(_OBJECTS)
        for element in spec.strip("/").split("/"):
            ns, _, name = element.rpartition(":")
            (refs,) = await self.references([current.node_id])
            found = [
                r
                for r in refs
                if r.BrowseName.Name == name and (not ns or str(r.BrowseName.NamespaceIndex) == ns)
            ]
            if len(found) != 1:
                what = "no child" if not found else f"{len(found)} children"
                raise BrowseError(
                    f"unknown browse path {spec!r}: {what} {element!r} under {current.qualified_name}"
                )
            ref = found[0]
            current = BrowsedNode(_plain(ref.NodeId), ref.BrowseName, ref.NodeClass)
        return current

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

    async def base_type(self, data_type: ua.NodeId) -> int | None:
        """Identifier of the built-in type (ns=0, i<30) a data type derives from; None if there is none."""
        if data_type not in self._type_bases:
            try:
                base = await get_base_data_type(Node(self.client.uaclient, data_type))
                self._type_bases[data_type] = int(base.nodeid.Identifier)
            except ua.UaError:
                self._type_bases[data_type] = None
        return self._type_bases[data_type]

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
async def connected(endpoint: str, timeout: float) -> AsyncIterator[AddressSpace]:
    """An anonymous session to `endpoint`; connection and protocol failures become BrowseError."""
    url = urlparse(endpoint)
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme != "opc.tcp" or not url.hostname or port is None:
        raise BrowseError(f"endpoint must look like opc.tcp://HOST:PORT/, got {endpoint!r}")
    client = Client(endpoint, timeout=timeout)
    # asyncua asks for an hour and warns when a server grants less; a browse needs far less.
    client.session_timeout = _SESSION_TIMEOUT_MS
    opened = False
    try:
        try:
            await asyncio.wait_for(client.connect(), timeout)
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


async def _why_not_a_tag(space: AddressSpace, var: BrowsedNode) -> str | None:
    """None when the variable can be a gateway tag (a numeric or boolean scalar), else the reason."""
    if var.data_type is None:
        return "data type unreadable"
    if var.value_rank != -1:
        return f"{var.type_name} {var.rank_text()}, not a scalar"
    base = await space.base_type(var.data_type)
    if base == _ENUMERATION:
        return f"{var.type_name} is an enumeration"
    if base not in _NUMERIC_BASES:
        return f"{var.type_name} is not numeric"
    return None


async def tags_yaml(space: AddressSpace, spec: str) -> str:
    """A `tags:` block for the numeric and boolean scalar variables directly under the object `spec`."""
    obj = await space.resolve(spec)
    (refs,) = await space.references([obj.node_id])
    variables = [
        BrowsedNode(_plain(r.NodeId), r.BrowseName, r.NodeClass)
        for r in refs
        if r.NodeClass == ua.NodeClass.Variable
    ]
    await space.describe(variables)
    reasons = [await _why_not_a_tag(space, v) for v in variables]
    units = await space.units([v for v, why in zip(variables, reasons, strict=True) if why is None])
    kept = sum(why is None for why in reasons)
    lines = [
        f"# {obj.qualified_name} ({obj.node_id.to_string()}): {kept} of {len(variables)} variable(s) usable as tags",
        "tags:" if kept else "tags: []",
    ]
    taken: set[str] = set()
    for var, why in zip(variables, reasons, strict=True):
        name = tag_name(var.browse_name.Name, taken)
        entry = (
            f"- {{name: {_scalar(name)}, node_id: {json.dumps(var.node_id.to_string())}, "
            f"unit: {json.dumps(units.get(var.node_id, ''))}}}"
        )
        lines.append(f"  {entry}" if why is None else f"  # {entry}  # left out: {why}")
    return "\n".join(lines)


async def run_browse(args: argparse.Namespace) -> int:
    """Connect, then print the tree or the tags block; BrowseError on any failure."""
    async with connected(args.endpoint, args.timeout) as space:
        if args.yaml is not None:
            print(await tags_yaml(space, args.yaml))
        else:
            root = await space.resolve(args.root)
            print(format_tree(await space.tree(root, args.depth, show_all=args.all)))
    return EXIT_OK


def cmd_browse(args: argparse.Namespace) -> int:
    """Print a server's address space, or a tags block for one object."""
    return asyncio.run(run_browse(args))


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a number of `kind` above zero."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_browse_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `browse ENDPOINT [--depth N] [--root NODE] [--all] [--yaml OBJECT] [--timeout S]`."""
    b = subparsers.add_parser(
        "browse", help="print an OPC-UA server's address space, or a tags block for one object (--yaml)"
    )
    b.add_argument("endpoint", help="server URL, e.g. opc.tcp://192.168.0.10:4840")
    b.add_argument("--depth", type=_positive(int), default=3, help="levels below the start node (default 3)")
    b.add_argument(
        "--root",
        default=None,
        help="start node: a NodeId (ns=2;s=Line1) or a browse path below Objects (2:Line1)",
    )
    b.add_argument("--all", action="store_true", help="include the standard Server object")
    b.add_argument(
        "--yaml",
        metavar="OBJECT",
        default=None,
        help="print a config tags block for the variables of OBJECT (browse path like 2:pump01, or a NodeId)",
    )
    b.add_argument(
        "--timeout", type=_positive(float), default=4.0, help="seconds to wait for each answer (default 4)"
    )
    b.set_defaults(func=cmd_browse)
