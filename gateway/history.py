"""History on the device: `edge-gateway alarms`, `events` (tables or JSON) and `plot`, read from the
gateway's SQLite file without disturbing a running daemon.

The file is opened read-only (`mode=ro`; WAL readers never block the writer). Times given on the
command line are ISO 8601 or relative to now; times printed are local, with their UTC offset.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from gateway.alarms import LifecycleState
from gateway.errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, GatewayError

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

DEFAULT_CONFIG = Path("/etc/edge-gateway/config.yaml")
GATEWAY_TABLES = ("alarms", "alarm_events", "scores")
STATE_CHOICES = (*get_args(LifecycleState), "open")
# Below this a panel per tag has no room for its axis labels.
MIN_PLOT_PX = (320, 240)
_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
TIME_HELP = (
    "ISO 8601 (2026-11-25T08:00, 2026-11-25, with Z or +01:00; without an offset it is local time) "
    "or relative to now (-2h, 30m, 7d, 90s, 1w, now)"
)


class HistoryError(GatewayError):
    """A history command cannot answer; the message is one line for a person, `exit_code` the process's."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An aware datetime from ISO 8601 (naive means local time) or a relative time before `now`."""
    now = now or datetime.now(timezone.utc)
    spec = text.strip()
    if spec.lower() == "now":
        return now
    m = _RELATIVE.match(spec)
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
    # Python 3.10's fromisoformat does not read a trailing Z.
    iso = spec[:-1] + "+00:00" if spec[-1:] in ("Z", "z") else spec
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: use {TIME_HELP}") from None
    return when if when.tzinfo is not None else when.astimezone()


def to_ns(when: datetime) -> int:
    """Nanoseconds since the epoch of an aware datetime, as the gateway stores times."""
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def time_arg(text: str) -> int:
    """An argparse type: a time (see parse_time) as epoch nanoseconds."""
    try:
        return to_ns(parse_time(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_ns(ns: int | None) -> str:
    """Local time with its UTC offset, to the second ('-' for none)."""
    if ns is None:
        return "-"
    when = datetime.fromtimestamp(ns / 1e9, timezone.utc).astimezone()
    return when.isoformat(sep=" ", timespec="seconds")


def format_value(v: float | None) -> str:
    """A measured value in 4 significant digits ('-' for none)."""
    return "-" if v is None else f"{v:.4g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width columns, two spaces apart, under a header and a rule."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def read_source(args: argparse.Namespace) -> tuple[Path, GatewayConfig | None]:
    """The database to read and the config that named it: --db, else storage.path of --config (default
    DEFAULT_CONFIG) resolved as the daemon resolves it, relative to the config's folder."""
    if args.db is not None:
        return Path(args.db), None
    from gateway.config import load_config

    cfg = load_config(args.config or DEFAULT_CONFIG)
    return cfg.storage.path, cfg


def open_db(path: Path) -> sqlite3.Connection:
    """A read-only connection to a gateway database; HistoryError if it is missing or not one."""
    if not path.is_file():
        raise HistoryError(f"no database at {path}")
    real = path.resolve()  # SQLite keeps the WAL beside the file a link points to
    uri = real.as_uri() + "?mode=ro"
    if not Path(f"{real}-wal").exists():
        # No WAL file: no gateway has the file open (it removes it on a clean stop). Read it as it
        # stands, since a WAL reader would create -wal and -shm files owned by this user, which a
        # daemon running as another user could then not open.
        uri += "&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot open {path}: {exc}") from None
    try:
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError as exc:
        conn.close()
        raise HistoryError(f"cannot read {path}: {exc}") from None
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise HistoryError(f"{path} is not a gateway database: {exc}") from None
    missing = [t for t in GATEWAY_TABLES if t not in have]
    if missing:
        conn.close()
        raise HistoryError(f"{path} is not a gateway database (no table {', '.join(missing)})")
    conn.row_factory = sqlite3.Row
    return conn


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    """Whether the database has table `name` (samples is absent in files from older gateways)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]).fetchone() is not None


def _distinct_assets(conn: sqlite3.Connection, table: str) -> set[str]:
    """The assets in `table`, one index seek per asset rather than a scan of years of rows."""
    found: set[str] = set()
    row = conn.execute(f"SELECT min(asset) FROM {table}").fetchone()
    while row is not None and row[0] is not None:
        found.add(row[0])
        row = conn.execute(f"SELECT min(asset) FROM {table} WHERE asset > ?", [row[0]]).fetchone()
    return found


def check_asset(conn: sqlite3.Connection, asset: str, *, configured: Sequence[str] = ()) -> None:
    """HistoryError (exit 2) naming the known assets when `asset` is neither configured nor in the file."""
    tables = ["alarms", "scores", *(["samples"] if has_table(conn, "samples") else [])]
    if asset in configured or any(
        conn.execute(f"SELECT 1 FROM {t} WHERE asset = ? LIMIT 1", [asset]).fetchone() for t in tables
    ):
        return
    known = set(configured).union(*(_distinct_assets(conn, t) for t in tables))
    listed = ", ".join(sorted(known)) or "none"
    raise HistoryError(f"unknown asset {asset!r}; known assets: {listed}", EXIT_USAGE)


def _jsonable(row: sqlite3.Row, skip: Sequence[str] = ()) -> dict[str, Any]:
    """A row's columns, non-finite numbers as null, and each `*_ns` time also as local ISO text (`*`)."""
    out: dict[str, Any] = {}
    for key in row.keys():
        if key in skip:
            continue
        v = row[key]
        out[key] = None if isinstance(v, float) and not math.isfinite(v) else v
        if key.endswith("_ns") and v:  # 0 means none (not shelved, no PLC time)
            out[key[:-3]] = datetime.fromtimestamp(v / 1e9, timezone.utc).astimezone().isoformat()
    return out


def query_alarms(
    conn: sqlite3.Connection, *, asset: str | None = None, since_ns: int | None = None,
    state: str | None = None, limit: int = 100,
) -> list[sqlite3.Row]:  # fmt: skip
    """The newest `limit` alarm occurrences raised or updated since `since_ns`, oldest first.

    `state` is a lifecycle state, or `open` for every state but normal.
    """
    where: list[str] = []
    params: list[Any] = []
    if asset is not None:
        where.append("asset = ?")
        params.append(asset)
    if since_ns is not None:
        where.append("(coalesce(raised_at_ns, 0) >= ? OR coalesce(updated_at_ns, 0) >= ?)")
        params += [since_ns, since_ns]
    if state == "open":
        where.append("state != 'normal'")
    elif state is not None:
        where.append("state = ?")
        params.append(state)
    sql = "SELECT * FROM alarms" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY coalesce(raised_at_ns, updated_at_ns) DESC, alarm_id LIMIT ?"
    return conn.execute(sql, [*params, limit]).fetchall()[::-1]


def query_events(
    conn: sqlite3.Connection, *, asset: str | None = None, rule: str | None = None,
    since_ns: int | None = None, until_ns: int | None = None, limit: int = 100,
) -> list[sqlite3.Row]:  # fmt: skip
    """The newest `limit` alarm transitions decided within [since, until], oldest first."""
    where: list[str] = []
    params: list[Any] = []
    for clause, value in (
        ("asset = ?", asset), ("rule = ?", rule),
        ("decided_at_ns >= ?", since_ns), ("decided_at_ns <= ?", until_ns),
    ):  # fmt: skip
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = "SELECT * FROM alarm_events" + (" WHERE " + " AND ".join(where) if where else "")
    return conn.execute(sql + " ORDER BY decided_at_ns DESC, seq DESC LIMIT ?", [*params, limit]).fetchall()[::-1]


def _operator(cause: str | None) -> str:
    return "-" if not cause else cause.removeprefix("operator:")


def alarms_table(rows: Sequence[sqlite3.Row]) -> str:
    """One line per alarm occurrence; the id is shortened to its first 8 characters."""
    headers = ("ALARM", "ASSET", "RULE", "SEVERITY", "STATE", "RAISED", "VALUE", "CLEARED", "ACKED BY", "ACKED AT")
    return format_table(headers, [
        (r["alarm_id"][:8], r["asset"] or "-", r["rule"] or "-", r["severity"] or "-", r["state"],
         format_ns(r["raised_at_ns"]), format_value(r["raised_value"]), format_ns(r["cleared_at_ns"]),
         _operator(r["acked_by"]), format_ns(r["acked_at_ns"]))
        for r in rows
    ])  # fmt: skip


def _published(r: sqlite3.Row) -> str:
    if r["dropped_at_ns"] is not None:
        return "dropped"
    return "no" if r["published_at_ns"] is None else "yes"


def events_table(rows: Sequence[sqlite3.Row]) -> str:
    """One line per alarm transition, with whether the broker acknowledged it (or the quota dropped it)."""
    headers = ("DECIDED AT", "ASSET", "RULE", "EVENT", "STATE", "SEQ", "CAUSE", "VALUE", "THRESHOLD", "PUBLISHED")
    return format_table(headers, [
        (format_ns(r["decided_at_ns"]), r["asset"] or "-", r["rule"] or "-", r["event"], r["state"] or "-",
         str(r["event_seq"] or "-"), r["cause"] or "-", format_value(r["value"]), format_value(r["threshold"]),
         _published(r))
        for r in rows
    ])  # fmt: skip


def cmd_alarms(args: argparse.Namespace) -> int:
    """Print alarm occurrences as a table or a JSON array."""
    with _opened(args) as (conn, _):
        rows = query_alarms(conn, asset=args.asset, since_ns=args.since, state=args.state, limit=args.limit)
    if args.json:
        print(json.dumps([_jsonable(r) for r in rows], indent=2))
    elif rows:
        print(alarms_table(rows))
    else:
        print("no alarms match", file=sys.stderr)
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    """Print alarm transitions as a table or a JSON array."""
    with _opened(args) as (conn, _):
        rows = query_events(
            conn, asset=args.asset, rule=args.rule, since_ns=args.since, until_ns=args.until, limit=args.limit
        )
    if args.json:
        # The payload is the MQTT message, the same fields again; the topic says where it went.
        print(json.dumps([_jsonable(r, skip=("payload",)) for r in rows], indent=2))
    elif rows:
        print(events_table(rows))
    else:
        print("no alarm events match", file=sys.stderr)
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw one asset's tags, scores with thresholds and alarm periods into a PNG."""
    from gateway.plot import config_thresholds, load_plot_data, render_plot

    if args.width < MIN_PLOT_PX[0] or args.height < MIN_PLOT_PX[1]:
        raise HistoryError(f"--width/--height: at least {MIN_PLOT_PX[0]}x{MIN_PLOT_PX[1]} pixels", EXIT_USAGE)
    until = args.until if args.until is not None else time.time_ns()
    if args.since >= until:
        raise HistoryError(f"--since ({format_ns(args.since)}) must be before --until ({format_ns(until)})", EXIT_USAGE)
    tags = [t for t in args.tags.split(",") if t] if args.tags else None
    with _opened(args) as (conn, cfg):
        configured = config_thresholds(cfg, args.asset) if cfg is not None else {}
        data = load_plot_data(conn, args.asset, args.since, until, tags=tags, configured=configured)
    if data.empty:
        raise HistoryError(
            f"no data for {args.asset} between {format_ns(args.since)} and {format_ns(until)}: nothing plotted"
        )
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    render_plot(data, args.output, width=args.width, height=args.height, dpi=args.dpi)
    print(f"{args.output}: {args.width}x{args.height} px, {data.summary()}")
    return EXIT_OK


@contextmanager
def _opened(args: argparse.Namespace) -> Iterator[tuple[sqlite3.Connection, GatewayConfig | None]]:
    """The database the arguments name (read-only, closed afterwards) and their config, with --asset
    checked; read errors become HistoryError."""
    path, cfg = read_source(args)
    conn = open_db(path)
    try:
        if args.asset is not None:
            check_asset(conn, args.asset, configured=[a.name for a in cfg.assets] if cfg is not None else ())
        yield conn, cfg
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot read {path}: {exc}") from None
    finally:
        conn.close()


def _guarded(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run `cmd`, turning a HistoryError into its one line on stderr and its exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except HistoryError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code

    return run


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _common_options(p: argparse.ArgumentParser) -> None:
    # argparse takes `--since -2h` for a missing value followed by an unknown option, as it reads
    # only plain negative numbers as values; a relative time is read as one too. (No option of
    # these commands looks like one.)
    p._negative_number_matcher = _RELATIVE
    src = p.add_mutually_exclusive_group()
    src.add_argument("--db", type=Path, metavar="PATH", help="the gateway's SQLite file")
    src.add_argument(
        "--config", type=Path, metavar="CONFIG",
        help=f"read storage.path from this config (default {DEFAULT_CONFIG})",
    )  # fmt: skip


def add_history_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `alarms`, `events` and `plot`."""
    epilog = f"Times: {TIME_HELP}. Printed times are local, with their UTC offset."
    a = subparsers.add_parser("alarms", help="list alarm occurrences from the database", epilog=epilog)
    _common_options(a)
    a.add_argument("--asset", help="only this asset")
    a.add_argument("--since", type=time_arg, metavar="TIME", help="raised or updated since TIME")
    a.add_argument("--state", choices=STATE_CHOICES, help="a lifecycle state, or open (any but normal)")
    a.add_argument("--limit", type=_positive_int, default=100, help="the newest N (default 100)")
    a.add_argument("--json", action="store_true", help="a JSON array with every column")
    a.set_defaults(func=_guarded(cmd_alarms))
    e = subparsers.add_parser("events", help="list alarm transitions from the database", epilog=epilog)
    _common_options(e)
    e.add_argument("--asset", help="only this asset")
    e.add_argument("--rule", help="only this alarm rule")
    e.add_argument("--since", type=time_arg, metavar="TIME", help="decided at or after TIME")
    e.add_argument("--until", type=time_arg, metavar="TIME", help="decided at or before TIME")
    e.add_argument("--limit", type=_positive_int, default=100, help="the newest N (default 100)")
    e.add_argument("--json", action="store_true", help="a JSON array with every column but the payload")
    e.set_defaults(func=_guarded(cmd_events))
    p = subparsers.add_parser(
        "plot", epilog=epilog,
        help="draw an asset's tags, model scores with thresholds and alarm periods into a PNG (needs matplotlib)",
    )  # fmt: skip
    _common_options(p)
    p.add_argument("--asset", required=True)
    p.add_argument("--since", type=time_arg, metavar="TIME", required=True)
    p.add_argument("--until", type=time_arg, metavar="TIME", help="default: now")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.png")
    p.add_argument("--tags", metavar="A,B", help="only these channels (default: all)")
    p.add_argument("--width", type=_positive_int, default=1600, help="pixels (default 1600)")
    p.add_argument("--height", type=_positive_int, default=900, help="pixels (default 900)")
    p.add_argument("--dpi", type=_positive_int, default=100, help="dots per inch (default 100)")
    p.set_defaults(func=_guarded(cmd_plot))
