"""What the SQLite file keeps, and for how long: the tag history rows and the retention pass.

The pass runs on the store's writer thread as a generator: each step is one short transaction (a
few thousand rows at most) and yields what it deleted, so the writer commits queued alarm events
between steps instead of after the whole pass. It deletes by age first (scores and tag history older
than `days`, then alarm occurrences closed that long ago), then by size: while the file is over
`max_db_bytes` it deletes the oldest scores and samples, and only when none are left the oldest
closed alarm history. An open alarm, an alarm event not yet acknowledged by the broker and the
outbox are never deleted. Freed pages go back to the file system with `PRAGMA incremental_vacuum`.

Over the size bound, the oldest rows go whole, in insertion order, rather than keeping every Nth row
of the old ones: rows written together share pages, so deleting a run of the oldest frees whole
pages, while thinning every Nth would leave most pages partly used and the file barely smaller.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sqlite_utils import Database

from gateway.config import AssetConfig, StorageConfig
from gateway.windows import AssetSampler

logger = logging.getLogger(__name__)

# Rows per delete step: tens of milliseconds of write lock at most, so an alarm commit never waits long.
CHUNK_ROWS = 2000
CHUNK_ALARMS = 50
# Pages handed back to the file system per incremental_vacuum step (8 MiB of 4 KiB pages).
VACUUM_PAGES = 2048
# A file without incremental auto-vacuum is converted at open (one VACUUM) only up to this size.
VACUUM_AT_OPEN_MAX_BYTES = 64 * 2**20
# Over the size bound, delete down to this fraction of it, so the next passes do not delete again.
_SIZE_LOW_WATER = 0.9
# How long a checkpoint may wait for readers: the writer thread, and so alarm commits, wait with it.
_CHECKPOINT_BUSY_MS = 200
_HISTORY_TABLES = ("scores", "samples")
_NEVER = 2**63 - 1


@dataclass(frozen=True)
class RetentionPolicy:
    """How long rows are kept, how large the file may grow, and how often the pass runs."""

    days: float = 90.0
    max_db_bytes: int = 2048 * 2**20
    interval_s: float = 600.0

    @classmethod
    def from_config(cls, storage: StorageConfig) -> RetentionPolicy:
        """The policy of a `storage` config section."""
        return cls(storage.retention_days, storage.max_db_bytes, storage.retention_interval_s)


class Deleted(NamedTuple):
    """Rows one retention step deleted, by table."""

    scores: int = 0
    samples: int = 0
    alarm_events: int = 0


class HistoryRecorder:
    """Picks the assets due for a tag history row this tick: each at most `hz` rows a second.

    An asset sampled at R Hz records every ceil(R / hz)-th sample, staggered by its position so
    assets sampled together do not all record on the same tick.
    """

    def __init__(self, assets: Sequence[AssetConfig], hz: float) -> None:
        # asset -> (record every Nth sample, offset, channel names)
        self._plan: dict[str, tuple[int, int, list[str]]] = {}
        if hz > 0:
            for position, asset in enumerate(assets):
                every = max(1, math.ceil(asset.sample_rate_hz / hz - 1e-9))
                self._plan[asset.name] = (every, position % every, asset.channels)

    def rows(self, samplers: Iterable[AssetSampler]) -> list[tuple[int, str, str]]:
        """(ts_ns, asset, values_json) for each sampler due now, from its newest sample; call after sampling."""
        if not self._plan:
            return []
        rows = []
        now_ns = 0
        for sampler in samplers:
            every, offset, names = self._plan[sampler.asset]
            if (sampler.samples + offset) % every:
                continue
            now_ns = now_ns or time.time_ns()
            values = dict(zip(names, sampler.newest_values(), strict=True))
            rows.append((now_ns, sampler.asset, json.dumps(values, separators=(",", ":"), allow_nan=False)))
        return rows


@contextmanager
def immediate(db: Database) -> Iterator[None]:
    """A write transaction that takes the lock up front."""
    # A deferred BEGIN that has read and then wants to write gets SQLITE_BUSY at once, without the busy
    # timeout, when another connection writes; BEGIN IMMEDIATE waits for the lock instead.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            db.conn.rollback()
        raise


def use_incremental_vacuum(db: Database, path: Path) -> None:
    """Make the file give freed pages back on `incremental_vacuum`: at creation, or by one VACUUM if small."""
    # On a new file this takes effect as long as no table exists yet; on an old one only after VACUUM.
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        return
    size = _page_bytes(db, "page_count")
    if size > VACUUM_AT_OPEN_MAX_BYTES:
        logger.warning(
            "store: %s (%.0f MiB) has no incremental auto-vacuum and is too large to convert at start; "
            "retention frees pages for reuse, the file does not shrink",
            path,
            size / 2**20,
        )
        return
    try:
        db.execute("VACUUM")
    except sqlite3.OperationalError as exc:  # e.g. another process reading: not worth failing the start
        logger.warning(
            "store: could not convert %s to incremental auto-vacuum: %s (tried again next start)", path, exc
        )
        return
    logger.info("store: converted %s to incremental auto-vacuum (%.1f MiB)", path, size / 2**20)


def file_bytes(path: Path) -> int:
    """The database file and its WAL on disk, in bytes."""
    return _size(path) + _size(_wal(path))


def retention_pass(db: Database, path: Path, policy: RetentionPolicy, now_ns: int) -> Iterator[Deleted]:
    """One pass as steps, each a committed transaction; yields what each step deleted."""
    total = [0, 0, 0]

    def counted(step: Deleted) -> Deleted:
        for i, n in enumerate(step):
            total[i] += n
        return step

    cutoff = now_ns - int(policy.days * 86_400e9)
    for table in _HISTORY_TABLES:
        for asset in _assets(db, table):
            while n := _delete(
                db,
                f"DELETE FROM {table} WHERE rowid IN "
                f"(SELECT rowid FROM {table} WHERE asset = ? AND ts_ns < ? LIMIT {CHUNK_ROWS})",
                [asset, cutoff],
            ):
                yield counted(Deleted(**{table: n}))
    while ids := _closed_alarms(db, cutoff):
        yield counted(_delete_alarms(db, ids))
    _checkpoint(db)
    # The WAL a reader kept from being truncated counts against the bound as it is.
    wal = _size(_wal(path))
    if _live_bytes(db) + wal > policy.max_db_bytes:
        target = int(policy.max_db_bytes * _SIZE_LOW_WATER) - wal
        while _live_bytes(db) > target:
            step = _delete_oldest_history(db) or _delete_oldest_closed(db)
            if step is None:
                if _live_bytes(db) + wal > policy.max_db_bytes:
                    logger.warning(
                        "store: %s holds %.1f MiB of open alarms, undelivered events and outbox alone, "
                        "over storage.max_db_mb (%.1f MiB)",
                        path,
                        (_live_bytes(db) + wal) / 2**20,
                        policy.max_db_bytes / 2**20,
                    )
                break
            yield counted(step)
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        free = _page_bytes(db, "freelist_count")
        while free:
            # executescript steps the pragma to completion; execute() would free a single page.
            db.conn.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES})")
            yield Deleted()
            free, before = _page_bytes(db, "freelist_count"), free
            if free >= before:  # no progress: never spin the writer thread
                break
    _checkpoint(db)
    if any(total):
        logger.info(
            "store: retention deleted %d score(s), %d sample row(s) and %d alarm event(s); %s is %.1f MiB",
            *total,
            path,
            file_bytes(path) / 2**20,
        )


def _delete(db: Database, sql: str, params: Sequence[object]) -> int:
    with immediate(db):
        return db.execute(sql, params).rowcount


def _assets(db: Database, table: str) -> list[str]:
    """The distinct assets of a history table, one index seek each (a skip scan, not a table scan)."""
    rows = db.execute(
        f"WITH RECURSIVE a(asset) AS (SELECT min(asset) FROM {table} "
        f"UNION ALL SELECT (SELECT min(asset) FROM {table} WHERE asset > a.asset) FROM a WHERE a.asset IS NOT NULL) "
        "SELECT asset FROM a WHERE asset IS NOT NULL"
    ).fetchall()
    return [r[0] for r in rows]


def _closed_alarms(db: Database, closed_before_ns: int) -> list[str]:
    """The oldest occurrences back to normal before the given time whose every event the broker has."""
    rows = db.execute(
        "SELECT alarm_id FROM alarms a WHERE state = 'normal' AND updated_at_ns < ? AND NOT EXISTS "
        "(SELECT 1 FROM alarm_events e WHERE e.alarm_id = a.alarm_id AND e.published_at_ns IS NULL) "
        "ORDER BY updated_at_ns LIMIT ?",
        [closed_before_ns, CHUNK_ALARMS],
    ).fetchall()
    return [r[0] for r in rows]


def _delete_alarms(db: Database, ids: Sequence[str]) -> Deleted:
    marks = ", ".join("?" * len(ids))
    with immediate(db):
        n = db.execute(f"DELETE FROM alarm_events WHERE alarm_id IN ({marks})", ids).rowcount
        db.execute(f"DELETE FROM alarms WHERE alarm_id IN ({marks})", ids)
    return Deleted(alarm_events=n)


def _delete_oldest_history(db: Database) -> Deleted | None:
    """Delete the oldest rows of whichever of scores and samples holds the oldest; None when both are empty."""
    heads: dict[str, int] = {}
    for table in _HISTORY_TABLES:
        row = db.execute(f"SELECT ts_ns FROM {table} ORDER BY rowid LIMIT 1").fetchone()
        if row is not None:
            heads[table] = row[0]
    if not heads:
        return None
    table = min(heads, key=lambda t: heads[t])
    oldest = f"SELECT rowid FROM {table} ORDER BY rowid LIMIT {CHUNK_ROWS}"
    n = _delete(db, f"DELETE FROM {table} WHERE rowid IN ({oldest})", [])
    return Deleted(**{table: n})


def _delete_oldest_closed(db: Database) -> Deleted | None:
    """Delete the oldest closed alarm occurrences the broker has every event of; None when there are none."""
    ids = _closed_alarms(db, _NEVER)
    return _delete_alarms(db, ids) if ids else None


def _checkpoint(db: Database) -> None:
    """Copy the WAL into the file and truncate it, waiting only briefly for readers."""
    busy_ms = db.execute("PRAGMA busy_timeout").fetchone()[0]
    db.execute(f"PRAGMA busy_timeout = {_CHECKPOINT_BUSY_MS}")
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        db.execute(f"PRAGMA busy_timeout = {busy_ms}")


def _page_bytes(db: Database, pragma: str) -> int:
    pages = db.execute(f"PRAGMA {pragma}").fetchone()[0]
    return int(pages) * int(db.execute("PRAGMA page_size").fetchone()[0])


def _live_bytes(db: Database) -> int:
    """Bytes of the file in use: its pages less the free ones (which the next vacuum hands back)."""
    return _page_bytes(db, "page_count") - _page_bytes(db, "freelist_count")


def _wal(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
