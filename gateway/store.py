"""SQLite store: model scores for tuning and the durable alarm outbox, written by one writer thread.

Every write goes through one thread with its own connection, batched: the thread drains all that
is queued and writes it in one transaction (group commit). Scores sit in a bounded deque
(DROP_OLDEST: they are for tuning and may be lost, drops are counted). Alarm events are never
dropped: `add_alarm_events` waits for free slots (backpressure) and resolves only once the
transaction holding its events, all of them or none, is committed with synchronous=FULL; a failed
commit keeps them queued and retries.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sqlite_utils import Database

from gateway.alarms import AlarmEvent
from gateway.errors import StoreError
from gateway.tasks import wait_for

logger = logging.getLogger(__name__)

SCORE_COLUMNS = ("ts_ns", "asset", "model", "model_version", "output", "value")
_SCHEMA_VERSION = 2
_RETRY_MIN_S = 0.2
_RETRY_MAX_S = 5.0

_EVENT_COLUMNS = (
    "event_id", "alarm_id", "event", "gateway_id", "asset", "rule", "kind", "output", "severity",
    "value", "threshold", "model", "model_version", "first_abnormal_source_ts_ns", "decided_at_ns",
    "state", "event_seq", "cause", "topic", "payload", "qos", "stored_at_ns",
)  # fmt: skip
_INSERT_EVENT = (
    f"INSERT OR IGNORE INTO alarm_events ({', '.join(_EVENT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_EVENT_COLUMNS))})"
)
# One row per alarm occurrence, carrying its newest state; a transition stored out of order (a
# replay) never moves it back, since the row keeps the highest sequence number.
_UPSERT_ALARM = """
INSERT INTO alarms (alarm_id, asset, rule, kind, output, severity, model, model_version,
    state, seq, first_abnormal_source_ts_ns, shelved_until_ns, updated_at_ns)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(alarm_id) DO UPDATE SET
    state = excluded.state, seq = excluded.seq, shelved_until_ns = excluded.shelved_until_ns,
    updated_at_ns = excluded.updated_at_ns
WHERE excluded.seq > alarms.seq
"""
_SET_RAISED = """
UPDATE alarms SET raised_value = ?, raised_threshold = ?, raised_at_ns = ?, first_abnormal_source_ts_ns = ?
WHERE alarm_id = ?
"""
_SET_CLEARED = "UPDATE alarms SET cleared_at_ns = ?, cleared_value = ? WHERE alarm_id = ?"
_SET_ACKED = "UPDATE alarms SET acked_at_ns = ?, acked_by = ? WHERE alarm_id = ?"


class OpenAlarm(NamedTuple):
    """An alarm occurrence not yet back to normal (active, unacknowledged, shelved or suppressed)."""

    alarm_id: str
    asset: str
    rule: str
    state: str
    seq: int
    first_abnormal_source_ts_ns: int
    raised_value: float | None
    raised_at_ns: int
    shelved_until_ns: int


class OutboxMessage(NamedTuple):
    """One stored alarm event still to be published."""

    event_id: str
    topic: str
    payload: bytes
    qos: int


@dataclass
class StoreStats:
    """Counters for the status page (read from the loop, updated by the writer thread and add_scores)."""

    scores_written: int = 0
    scores_dropped: int = 0
    events_written: int = 0
    commits: int = 0
    last_error: str | None = None


class NewEvent(NamedTuple):
    """An alarm event to store, with the MQTT message that will publish it."""

    event: AlarmEvent
    topic: str
    payload: bytes
    qos: int = 1


@dataclass
class _PendingBatch:
    items: Sequence[NewEvent]
    done: Callable[[BaseException | None], None]


_Job = tuple[Callable[[Database], Any], Callable[[Any, BaseException | None], None]]


class Store:
    """The gateway's SQLite file; `start()` before use, `stop()` flushes and closes it."""

    def __init__(self, path: Path, *, queue_size: int = 10_000, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.stats = StoreStats()
        self._queue_size = queue_size
        self._busy_timeout_s = busy_timeout_s
        self._cond = threading.Condition()
        self._scores: deque[tuple[Any, ...]] = deque(maxlen=queue_size)
        # Bounded by _event_slots (one per event): a full queue makes add_alarm_events wait, never drop.
        self._events: deque[_PendingBatch] = deque()
        self._marks: list[tuple[Sequence[str], Callable[[BaseException | None], None]]] = []
        self._reads: list[_Job] = []
        self._stopping = False
        self._abort = False
        self._running = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event_slots: asyncio.Semaphore | None = None
        self._admit: asyncio.Lock | None = None
        self._closed: asyncio.Future[None] | None = None
        self._sync_full: bool | None = None
        self._failing = False

    # ---- loop side -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or create) the database on the writer thread; StoreError if it cannot be used."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._event_slots = asyncio.Semaphore(self._queue_size)
        self._admit = asyncio.Lock()
        self._closed = loop.create_future()
        opened: asyncio.Future[Database] = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(opened,), name="store-writer", daemon=True)
        self._thread.start()
        try:
            await opened
        except (sqlite3.Error, OSError) as exc:
            thread, self._thread = self._thread, None
            await asyncio.to_thread(thread.join, 5.0)
            raise StoreError(f"cannot use database {self.path}: {exc}") from exc
        self._running = True
        logger.info("store open at %s", self.path)

    def add_scores(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Queue score rows (ts_ns, asset, model, model_version, output, value); drops oldest when full."""
        self._check_running()
        with self._cond:
            # The deque's maxlen discards the oldest rows; count them before it does.
            self.stats.scores_dropped += max(0, len(self._scores) + len(rows) - self._queue_size)
            self._scores.extend(rows)
            self._cond.notify()

    async def add_alarm_event(self, event: AlarmEvent, topic: str, payload: bytes, *, qos: int = 1) -> None:
        """Store one alarm event in the outbox and update its alarm row; returns once committed."""
        await self.add_alarm_events([NewEvent(event, topic, payload, qos)])

    async def add_alarm_events(self, items: Sequence[NewEvent]) -> None:
        """Store alarm events in the outbox in this order, all in one transaction, and update their alarm
        rows; returns once committed (all of them or, on StoreError, none)."""
        if not items:
            return
        self._check_running()
        assert self._event_slots is not None and self._admit is not None
        slots = self._event_slots
        # A batch larger than the queue takes every slot, so it waits for an empty queue instead of forever.
        need = min(len(items), self._queue_size)
        taken = 0
        try:
            # One batch takes slots at a time: two that each held part of the free slots would wait forever.
            async with self._admit:
                while taken < need:
                    await slots.acquire()  # backpressure instead of dropping
                    taken += 1
        except BaseException:
            for _ in range(taken):
                slots.release()
            raise
        fut = self._new_future()

        def done(exc: BaseException | None) -> None:
            for _ in range(need):
                slots.release()
            _settle(fut, None, exc)

        with self._cond:
            # Appended under the lock the writer takes them with, so one transaction holds them all.
            self._events.append(_PendingBatch(list(items), self._threadsafe(done)))
            self._cond.notify()
        await fut

    async def pending(self, limit: int = 100) -> list[OutboxMessage]:
        """Unpublished alarm events, oldest first."""

        def read(db: Database) -> list[OutboxMessage]:
            cur = db.execute(
                "SELECT event_id, topic, payload, qos FROM alarm_events "
                "WHERE published_at_ns IS NULL ORDER BY seq LIMIT ?",
                [limit],
            )
            return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3]) for r in cur.fetchall()]

        return await self._submit_read(read)

    async def open_alarms(self) -> list[OpenAlarm]:
        """Alarms not back to normal when the gateway last stopped, so a restart neither forgets nor repeats them."""

        def read(db: Database) -> list[OpenAlarm]:
            cur = db.execute(
                "SELECT alarm_id, asset, rule, state, seq, coalesce(first_abnormal_source_ts_ns, 0), "
                "raised_value, coalesce(raised_at_ns, 0), coalesce(shelved_until_ns, 0) "
                "FROM alarms WHERE state != 'normal' ORDER BY updated_at_ns"
            )
            return [OpenAlarm(*r) for r in cur.fetchall()]

        return await self._submit_read(read)

    async def mark_published(self, event_ids: Sequence[str]) -> None:
        """Record that the broker acknowledged these events."""
        if not event_ids:
            return
        self._check_running()
        fut = self._new_future()
        with self._cond:
            self._marks.append((list(event_ids), self._threadsafe(lambda exc: _settle(fut, None, exc))))
            self._cond.notify()
        await fut

    async def stop(self, timeout: float = 10.0) -> None:
        """Flush everything queued, close the connection and join the writer thread (bounded, never raises)."""
        thread, closed = self._thread, self._closed
        if thread is None or closed is None:
            return
        self._thread = None
        self._running = False
        with self._cond:
            self._stopping = True
            self._cond.notify()
        try:
            await wait_for(asyncio.shield(closed), timeout)
        except asyncio.TimeoutError:
            with self._cond:
                lost = sum(len(batch.items) for batch in self._events)
                self._abort = True
                self._cond.notify()
            logger.error("store: could not flush within %.1f s; %d alarm events not saved", timeout, lost)
            try:
                # The writer may be inside one SQLite call, which the busy timeout bounds.
                await wait_for(asyncio.shield(closed), self._busy_timeout_s + 1.0)
            except asyncio.TimeoutError:
                logger.error("store: writer thread did not finish; leaving it behind")
                return
        await asyncio.to_thread(thread.join, timeout)
        logger.info(
            "store closed (%d events, %d scores written)",
            self.stats.events_written,
            self.stats.scores_written,
        )

    def _check_running(self) -> None:
        if not self._running:
            raise StoreError(f"store {self.path} is not running")

    def _new_future(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        return self._loop.create_future()

    def _threadsafe(self, fn: Callable[..., None]) -> Callable[..., None]:
        loop = self._loop
        assert loop is not None

        def call(*args: Any) -> None:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        return call

    async def _submit_read(self, fn: Callable[[Database], Any]) -> Any:
        self._check_running()
        fut = self._new_future()
        with self._cond:
            self._reads.append((fn, self._threadsafe(lambda res, exc: _settle(fut, res, exc))))
            self._cond.notify()
        return await fut

    # ---- writer thread ---------------------------------------------------------------------

    def _run(self, opened: asyncio.Future[Database]) -> None:
        report = self._threadsafe(lambda res, exc: _settle(opened, res, exc))
        try:
            db = self._open()
        except (sqlite3.Error, OSError) as exc:
            report(None, exc)
            return
        report(db, None)
        try:
            self._serve(db)
        finally:
            db.close()
            self._threadsafe(lambda: _settle(self._closed, None, None))()

    def _open(self) -> Database:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, check_same_thread=False)
        try:
            db = Database(conn)
            db.enable_wal()
            _create_schema(db)
        except BaseException:
            conn.close()
            raise
        return db

    def _serve(self, db: Database) -> None:
        delay = _RETRY_MIN_S
        while True:
            with self._cond:
                while not (self._scores or self._events or self._marks or self._reads or self._stopping):
                    self._cond.wait()
                scores = list(self._scores)
                self._scores.clear()
                events = list(self._events)
                self._events.clear()
                marks, self._marks = self._marks, []
                reads, self._reads = self._reads, []
            ok = self._write(db, scores, events, marks)
            for fn, reply in reads:
                try:
                    reply(fn(db), None)
                except sqlite3.Error as exc:
                    reply(None, StoreError(f"read failed on {self.path}: {exc}"))
            if ok:
                delay = _RETRY_MIN_S
            else:
                with self._cond:
                    # Alarm data is never dropped: put it back in front, in order, and retry.
                    self._events.extendleft(reversed(events))
                    self._marks[:0] = marks
                    deadline = time.monotonic() + delay
                    while not self._abort and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(timeout=left)
                    if self._abort:
                        break
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            with self._cond:
                if self._stopping and not (self._scores or self._events or self._marks or self._reads):
                    break
        with self._cond:
            leftover = list(self._events)
            self._events.clear()
            marks, self._marks = self._marks, []
        for batch in leftover:
            batch.done(StoreError("store stopped before the event was saved"))
        for _, mark_done in marks:
            mark_done(StoreError("store stopped before the mark was saved"))

    def _write(
        self,
        db: Database,
        scores: list[tuple[Any, ...]],
        events: list[_PendingBatch],
        marks: list[tuple[Sequence[str], Callable[[BaseException | None], None]]],
    ) -> bool:
        if not (scores or events or marks):
            return True
        try:
            # FULL syncs the WAL at each commit so an acknowledged alarm survives power loss; scores alone
            # use NORMAL (consistent, a power cut may lose the last commits).
            self._set_sync(db, full=bool(events or marks))
            now = time.time_ns()
            with _immediate(db):
                if scores:
                    db.table("scores").insert_all(itertools.chain([SCORE_COLUMNS], scores))
                new_events = sum(_write_event(db, item, now) for batch in events for item in batch.items)
                for ids, _ in marks:
                    db.execute(
                        f"UPDATE alarm_events SET published_at_ns = ? WHERE published_at_ns IS NULL "
                        f"AND event_id IN ({', '.join('?' * len(ids))})",
                        [now, *ids],
                    )
        except sqlite3.Error as exc:
            if not self._failing:
                logger.error(
                    "store: commit failed on %s: %s (alarm events kept and retried, scores dropped)",
                    self.path,
                    exc,
                )
            self._failing = True
            with self._cond:
                self.stats.last_error = f"commit failed: {exc}"
                self.stats.scores_dropped += len(scores)
            return False
        if self._failing:
            logger.info("store: commits succeed again on %s", self.path)
            self._failing = False
        self.stats.commits += 1
        self.stats.scores_written += len(scores)
        self.stats.events_written += new_events
        for batch in events:
            batch.done(None)
        for _, reply in marks:
            reply(None)
        return True

    def _set_sync(self, db: Database, *, full: bool) -> None:
        if self._sync_full != full:
            db.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._sync_full = full


def _write_event(db: Database, item: NewEvent, now: int) -> bool:
    e = item.event
    cur = db.execute(_INSERT_EVENT, [
        e.event_id, e.alarm_id, e.event, e.gateway_id, e.asset, e.rule, e.kind, e.output, e.severity,
        e.value, e.threshold, e.model, e.model_version, e.first_abnormal_source_ts_ns, e.decided_at_ns,
        e.state, e.seq, e.cause, item.topic, item.payload, item.qos, now,
    ])  # fmt: skip
    if cur.rowcount == 0:
        return False  # a duplicate event id (e.g. replayed after a restart) must not touch its alarm again
    db.execute(_UPSERT_ALARM, [
        e.alarm_id, e.asset, e.rule, e.kind, e.output, e.severity, e.model, e.model_version,
        e.state, e.seq, e.first_abnormal_source_ts_ns, e.shelved_until_ns, e.decided_at_ns,
    ])  # fmt: skip
    if e.event == "raised":
        db.execute(_SET_RAISED, [e.value, e.threshold, e.decided_at_ns, e.first_abnormal_source_ts_ns, e.alarm_id])
    elif e.event == "cleared":
        db.execute(_SET_CLEARED, [e.decided_at_ns, e.value, e.alarm_id])
    elif e.event == "acknowledged":
        db.execute(_SET_ACKED, [e.decided_at_ns, e.cause, e.alarm_id])
    return True


def _create_schema(db: Database) -> None:
    with db.atomic():
        db.table("scores").create(
            {"ts_ns": int, "asset": str, "model": str, "model_version": str, "output": str, "value": float},
            if_not_exists=True,
        )
        db.table("scores").create_index(["asset", "ts_ns"], if_not_exists=True)
        db.table("alarm_events").create(
            {
                "seq": int, "event_id": str, "alarm_id": str, "event": str, "gateway_id": str, "asset": str,
                "rule": str, "kind": str, "output": str, "severity": str, "value": float, "threshold": float,
                "model": str, "model_version": str, "first_abnormal_source_ts_ns": int, "decided_at_ns": int,
                "state": str, "event_seq": int, "cause": str,
                "topic": str, "payload": bytes, "qos": int, "stored_at_ns": int, "published_at_ns": int,
            },
            # An explicit INTEGER PRIMARY KEY keeps insertion order stable across VACUUM.
            pk="seq",
            not_null={"event_id", "alarm_id", "event", "topic", "payload", "qos"},
            if_not_exists=True,
        )  # fmt: skip
        db.table("alarm_events").create_index(["event_id"], unique=True, if_not_exists=True)
        db.execute(
            "CREATE INDEX IF NOT EXISTS idx_alarm_events_unpublished ON alarm_events(seq) "
            "WHERE published_at_ns IS NULL"
        )
        db.table("alarms").create(
            {
                "alarm_id": str, "asset": str, "rule": str, "kind": str, "output": str, "severity": str,
                "model": str, "model_version": str, "state": str, "seq": int, "raised_value": float,
                "raised_threshold": float, "first_abnormal_source_ts_ns": int, "raised_at_ns": int,
                "cleared_at_ns": int, "cleared_value": float, "acked_at_ns": int, "acked_by": str,
                "shelved_until_ns": int, "updated_at_ns": int,
            },
            pk="alarm_id",
            not_null={"state"},
            if_not_exists=True,
        )  # fmt: skip
        _migrate(db)
        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


# Columns added by schema 2 (the alarm lifecycle); a schema-1 file gets them, and its states renamed.
_ADDED_IN_2 = {
    "alarm_events": {"state": str, "event_seq": int, "cause": str},
    "alarms": {"seq": int, "acked_at_ns": int, "acked_by": str, "shelved_until_ns": int, "updated_at_ns": int},
}


def _migrate(db: Database) -> None:
    """Bring a file written by an older gateway up to this schema, keeping every row."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version >= _SCHEMA_VERSION:
        return
    for table, columns in _ADDED_IN_2.items():
        have = set(db[table].columns_dict)
        for name, kind in columns.items():
            if name not in have:
                db[table].add_column(name, kind)
    # Schema 1 knew active and cleared; nobody could acknowledge, so an active alarm is unacknowledged.
    db.execute(
        "UPDATE alarms SET state = CASE state WHEN 'active' THEN 'unack' ELSE 'normal' END, "
        "seq = CASE state WHEN 'active' THEN 1 ELSE 2 END, updated_at_ns = coalesce(cleared_at_ns, raised_at_ns) "
        "WHERE state IN ('active', 'cleared')"
    )


@contextmanager
def _immediate(db: Database) -> Iterator[None]:
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


def _settle(fut: asyncio.Future[Any] | None, result: Any, exc: BaseException | None) -> None:
    if fut is None or fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
