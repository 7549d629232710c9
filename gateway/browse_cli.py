"""`edge-gateway browse` command line: flags checked into BrowseOptions, then the browse run.

Security flags are a source's `security:` block spelled as flags (--private-key for private_key) and
are checked by the same model, so a usage error names the flags the way the config names its keys.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args
from urllib.parse import urlparse

from pydantic import ValidationError

from gateway.browse import BrowseError, connected, format_tree, tags_yaml
from gateway.config import SourceConfig, SourceSecurity
from gateway.errors import EXIT_OK, EXIT_USAGE
from gateway.sources.nodes import NodeRef, parse_node_ref

# A --root/--yaml written as a node id; anything else not starting with '/' is a path below Objects.
_NODE_ID_START = re.compile(r"^(?:ns=|nsu=|[isgb]=)")
_OBJECTS_PATH = "/Objects/"


class UsageError(Exception):
    """Command-line options that do not fit together; the message names the flags."""


@dataclass(frozen=True)
class BrowseOptions:
    """The checked command line: the session to open and what to print."""

    source: SourceConfig
    # Where to start (None: Objects); with `tags`, the object whose variables become a tags block.
    start: NodeRef | None
    tags: bool
    depth: int
    show_all: bool


# Every key of a source's security block, each set by the flag --<key with dashes>.
_SECURITY_FIELDS = tuple(SourceSecurity.model_fields)
# A field name in a SourceSecurity message ("a username" reads "--username"); "security policy" is prose.
_FIELD_WORD = re.compile(r"\b(?:a )?(?<!security )(" + "|".join(_SECURITY_FIELDS) + r")\b")


def _flag_words(message: str) -> str:
    """A SourceSecurity validation message with its field names written as this command's flags."""
    return _FIELD_WORD.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def start_ref(spec: str | None) -> NodeRef | None:
    """--root/--yaml: a config node_id (ns=/nsu=/i=.., /Objects/..), or a path below Objects like 2:Line1/2:pump01.

    None means Objects; ValueError (the config's syntax help) when it is malformed.
    """
    if spec is None or spec.rstrip("/") in ("", "/Objects"):
        return None
    if spec.startswith("/") or _NODE_ID_START.match(spec):
        return parse_node_ref(spec)
    # Parsed as the config's absolute form, reported as typed.
    return dataclasses.replace(parse_node_ref(_OBJECTS_PATH + spec.rstrip("/")), text=spec)


def browse_options(args: argparse.Namespace) -> BrowseOptions:
    """Check the parsed command line; UsageError naming the flags, BrowseError for an endpoint of the wrong form."""
    url = urlparse(args.endpoint)
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme != "opc.tcp" or not url.hostname or port is None:
        raise BrowseError(f"endpoint must look like opc.tcp://HOST:PORT/, got {args.endpoint!r}")
    flag = "--yaml" if args.yaml is not None else "--root"
    try:
        start = start_ref(args.yaml if args.yaml is not None else args.root)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    # Only the flags given, so the model's rules about which keys go together see what was typed.
    given = {f: getattr(args, f) for f in _SECURITY_FIELDS if getattr(args, f) not in (None, False)}
    try:
        security = SourceSecurity(**given) if given else None
        source = SourceConfig(
            name="browse", endpoint=args.endpoint, timeout_s=args.timeout, security=security
        )
    except ValidationError as exc:
        problems = [str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()]
        raise UsageError(_flag_words("; ".join(problems))) from None
    return BrowseOptions(source, start, args.yaml is not None, args.depth, args.all)


async def run_browse(opts: BrowseOptions) -> int:
    """Connect, then print the tree or the tags block; BrowseError or SecurityError on any failure."""
    async with connected(opts.source) as space:
        if opts.tags:
            print(await tags_yaml(space, opts.start))
        else:
            root = await space.resolve(opts.start)
            print(format_tree(await space.tree(root, opts.depth, show_all=opts.show_all)))
    return EXIT_OK


def cmd_browse(args: argparse.Namespace) -> int:
    """Print a server's address space, or a tags block for one object; options that do not fit exit 2."""
    try:
        opts = browse_options(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(run_browse(opts))


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
    """Register `browse ENDPOINT [--depth N] [--root NODE | --yaml OBJECT] [--all] [--timeout S] [security]`."""
    b = subparsers.add_parser(
        "browse", help="print an OPC-UA server's address space, or a tags block for one object (--yaml)"
    )
    b.add_argument("endpoint", help="server URL, e.g. opc.tcp://192.168.0.10:4840")
    b.add_argument("--depth", type=_positive(int), default=3, help="levels below the start node (default 3)")
    start = b.add_mutually_exclusive_group()
    start.add_argument(
        "--root",
        default=None,
        help="start node, in any form a tag's node_id takes (ns=2;s=Line1, nsu=URI;s=Line1, "
        "/Objects/2:Line1) or a browse path below Objects (2:Line1/2:pump01)",
    )
    start.add_argument(
        "--yaml",
        metavar="OBJECT",
        default=None,
        help="print a config tags block for the variables of OBJECT (a node like --root's, e.g. 2:pump01)",
    )
    b.add_argument("--all", action="store_true", help="include the standard Server object")
    b.add_argument(
        "--timeout", type=_positive(float), default=4.0, help="seconds to wait for each answer (default 4)"
    )
    sec = b.add_argument_group(
        "security",
        "as a source's security: block in the config; without these, an anonymous unsecured session",
    )
    sec.add_argument(
        "--policy",
        choices=get_args(SourceSecurity.model_fields["policy"].annotation),
        help="message security policy (default None)",
    )
    sec.add_argument(
        "--mode",
        choices=get_args(SourceSecurity.model_fields["mode"].annotation),
        help="message security mode (default SignAndEncrypt)",
    )
    sec.add_argument(
        "--certificate", type=Path, metavar="PATH", help="this client's certificate (DER or PEM)"
    )
    sec.add_argument("--private-key", type=Path, metavar="PATH", help="its unencrypted RSA key")
    sec.add_argument(
        "--application-uri", metavar="URI", help="default: the URI in the certificate's SubjectAltName"
    )
    sec.add_argument(
        "--trust-dir",
        type=Path,
        metavar="DIR",
        help="trusted server certificates; unknown ones go to DIR/rejected/",
    )
    sec.add_argument(
        "--trust-on-first-use",
        action="store_true",
        help="save an unknown server certificate to --trust-dir once",
    )
    sec.add_argument(
        "--username", metavar="NAME", help="log in as NAME (needs --password-env or --password-file)"
    )
    sec.add_argument("--password-env", metavar="VAR", help="environment variable holding the password")
    sec.add_argument("--password-file", type=Path, metavar="PATH", help="file holding the password")
    b.set_defaults(func=cmd_browse)
