"""YAML loading that remembers where every key and item came from, for error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

Loc = tuple[Any, ...]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _index_lines(node: yaml.Node, loc: Loc, out: dict[Loc, int]) -> None:
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            _index_lines(value_node, loc + (key,), out)
            # The key's own line is more useful than the value's for a block mapping or list.
            out[loc + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, loc + (i,), out)


class YamlDocument:
    """Parsed YAML plus a map from each path (keys and list indexes) to its 1-based line."""

    def __init__(self, text: str, filename: str) -> None:
        self.filename = filename
        self.lines: dict[Loc, int] = {}
        try:
            node = yaml.compose(text, Loader=_UniqueKeyLoader)
            self.data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 0
            raise YamlSyntaxError(f"{filename}:{line} {exc.problem or exc}") from exc
        if node is not None:
            _index_lines(node, (), self.lines)

    @classmethod
    def from_path(cls, path: Path) -> YamlDocument:
        """Read and parse a file; I/O and syntax errors become YamlSyntaxError."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise YamlSyntaxError(f"{path}: cannot read: {exc}") from exc
        return cls(text, str(path))

    def line_of(self, loc: Loc) -> int:
        """Line of the deepest prefix of `loc` present in the document (0 if none)."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return 0

    def where(self, loc: Loc) -> str:
        """`file:line path` for a location, e.g. `config.yaml:17 assets[2].tags[0].node_id`."""
        return f"{self.filename}:{self.line_of(loc)} {format_loc(loc)}"


class YamlSyntaxError(Exception):
    """The file is not readable YAML; the message already carries file and line."""


def format_loc(loc: Loc) -> str:
    """Render ('assets', 2, 'tags', 0, 'node_id') as assets[2].tags[0].node_id."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"
