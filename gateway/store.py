"""SQLite store: model scores for tuning and the durable outbox, written by one writer thread.

Every write goes through one thread with its own connection, batched: the thread drains all that
is queued and writes it in one transaction (group commit). Scores and low-priority messages sit in
bounded deques (DROP_OLDEST: they may be lost, drops are counted). Alarm events are never dropped
on the way in: `add_alarm_events` waits for free slots (backpressure) and resolves only once the
transaction holding its events, all of them or none, is committed with synchronous=FULL; a failed
commit keeps them queued and retries.

The outbox has two priorities: alarm events (the `alarm_events` table, unpublished rows) and
low-priority data (the `outbox` table: scores that could not go out live, periodic status).
`pending()` hands out alarm events first. Its size is bounded by a quota (`outbox_quota_bytes`,
each message counted as topic + payload + MESSAGE_OVERHEAD_BYTES): when a commit leaves it over
the quota, expired data goes first, then the oldest data down to 90% of the quota, and only then,
as the last resort, the oldest unpublished alarm events (their payload is emptied, the row kept);
every drop is counted in StoreStats.

Tag history rows (`samples`) are queued like scores and written in the same commits. Between
commits the writer runs the retention pass (gateway/retention.py) in short steps: once at start and
every `RetentionPolicy.interval_s`, it bounds the file by age and size.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sqlite_utils import Database

from gateway.alarms import AlarmEvent
from gateway.errors import StoreError
from gateway.outbox import (
    EXPIRY_SWEEP_NS,
    DataMessage,
    OutboxMessage,
    Tally,
    count_outbox,
    drop_expired,
    enforce_quota,
    mark,
    write_message,
)
from gateway.retention import (
    Deleted,
    RetentionPolicy,
    file_bytes,
    immediate,
    retention_pass,
    use_incremental_vacuum,
)
from gateway.schema import create_schema
from gateway.tasks import wait_for

logger = logging.getLogger(__name__)

SCORE_COLUMNS = ("ts_ns", "asset", "model", "model_version", "output", "value")
_RETRY_MIN_S = 0.2
_RETRY_MAX_S = 5.0

_EVENT_COLUMNS = (
    "event_id", "alarm_id", "event", "gateway_id", "asset", "rule", "kind", "output", "severity",
    "value", "threshold", "model", "model_version", "first_abnormal_source_ts_ns", "decided_at_ns",
    "state", "event_seq", "cause", "command_id", "topic", "payload", "qos", "stored_at_ns",
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


class CommandRecord(NamedTuple):
    """The alarm event an operator command with an id caused, for answering its retries."""

    alarm_id: str
    event_id: str
    state: str
    decided_at_ns: int


@dataclass
class StoreStats:
    """Counters for the status page (read from the loop, updated by the writer thread and add_scores)."""

    scores_written: int = 0
    scores_dropped: int = 0
    events_written: int = 0
    commits: int = 0
    last_error: str | None = None
    # The outbox as of the last commit: unpublished alarm events and data messages, and their bytes.
    outbox_alarm_events: int = 0
    outbox_messages: int = 0
    outbox_bytes: int = 0
    outbox_quota_bytes: int = 0
    # Since start: low-priority messages dropped (quota or a full queue), by kind; alarm events
    # dropped by the quota (last resort); data expired unsent; statuses replaced by a newer one.
    outbox_dropped_scores: int = 0
    outbox_dropped_status: int = 0
    outbox_dropped_alarm_events: int = 0
    outbox_expired: int = 0
    outbox_superseded: int = 0
    # Tag history rows written, and dropped (queue full or a failed commit).
    samples_written: int = 0
    samples_dropped: int = 0
    # Since start: rows the retention pass deleted; when its last pass ended; the file and WAL then.
    retention_deleted_scores: int = 0
    retention_deleted_samples: int = 0
    retention_deleted_alarm_events: int = 0
    last_retention_at_ns: int = 0
    db_bytes: int = 0


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

    def __init__(
        self, path: Path, *, queue_size: int = 10_000, busy_timeout_s: float = 5.0,
        outbox_quota_bytes: int = 256 * 2**20, retention: RetentionPolicy | None = None,
    ) -> None:  # fmt: skip
        self.path = Path(path)
        self.stats = StoreStats(outbox_quota_bytes=outbox_quota_bytes)
        self._queue_size = queue_size
        self._busy_timeout_s = busy_timeout_s
        self._quota = outbox_quota_bytes
        self._cond = threading.Condition()
        self._scores: deque[tuple[Any, ...]] = deque(maxlen=queue_size)
        self._samples: deque[tuple[int, str, str]] = deque(maxlen=queue_size)
        self._retention = retention or RetentionPolicy()
        # The retention pass in progress (one step per writer round), and when the next one is due.
        self._pass: Iterator[Deleted] | None = None
        self._next_pass = 0.0
        self._messages: deque[DataMessage] = deque(maxlen=queue_size)
        self._tally = Tally()
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

    def add_samples(self, rows: Sequence[tuple[int, str, str]]) -> None:
        """Queue tag history rows (ts_ns, asset, values_json); drops oldest when full."""
        self._check_running()
        with self._cond:
            self.stats.samples_dropped += max(0, len(self._samples) + len(rows) - self._queue_size)
            self._samples.extend(rows)
            self._cond.notify()

    def add_messages(self, items: Sequence[DataMessage]) -> None:
        """Queue low-priority messages for the outbox; drops the oldest queued when full (counted by kind)."""
        self._check_running()
        with self._cond:
            for old in itertools.islice(
                self._messages, max(0, len(self._messages) + len(items) - self._queue_size)
            ):
                self._count_dropped(old.kind, 1)
            self._messages.extend(items)
            self._cond.notify()

    @property
    def data_waiting(self) -> int:
        """Low-priority messages in the outbox or queued for it: while any wait, new ones join the queue."""
        return self.stats.outbox_messages + len(self._messages)

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
        """Unpublished messages, oldest first: alarm events while any wait, else unexpired data."""

        def read(db: Database) -> list[OutboxMessage]:
            cur = db.execute(
                "SELECT event_id, topic, payload, qos FROM alarm_events "
                "WHERE published_at_ns IS NULL ORDER BY seq LIMIT ?",
                [limit],
            )
            alarms = [OutboxMessage(r[0], r[1], bytes(r[2]), r[3]) for r in cur.fetchall()]
            if alarms:
                return alarms
            cur = db.execute(
                "SELECT message_id, topic, payload, qos, retain, expires_at_ns, kind FROM outbox "
                "WHERE expires_at_ns = 0 OR expires_at_ns > ? ORDER BY seq LIMIT ?",
                [time.time_ns(), limit],
            )
            return [
                OutboxMessage(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6]) for r in cur.fetchall()
            ]

        return await self._submit_read(read)

    async def oldest_waiting_ns(self) -> int | None:
        """Wall-clock ns at which the oldest message still in the outbox was stored; None when none waits."""
        if not (self.stats.outbox_alarm_events or self.stats.outbox_messages):
            return None

        def read(db: Database) -> int | None:
            # Each side's oldest row by seq (insertion order), through the indexes pending() uses.
            row = db.execute(
                "SELECT min(t) FROM ("
                "SELECT (SELECT stored_at_ns FROM alarm_events WHERE published_at_ns IS NULL ORDER BY seq LIMIT 1) AS t "
                "UNION ALL SELECT (SELECT stored_at_ns FROM outbox ORDER BY seq LIMIT 1))"
            ).fetchone()
            return None if row[0] is None else int(row[0])

        return await self._submit_read(read)

    async def command_record(self, user: str, command_id: str) -> CommandRecord | None:
        """The stored event that `user`'s command `command_id` caused, if it was executed (before a restart too)."""

        def read(db: Database) -> CommandRecord | None:
            row = db.execute(
                "SELECT alarm_id, event_id, state, decided_at_ns FROM alarm_events "
                "WHERE command_id = ? AND cause = ? ORDER BY seq DESC LIMIT 1",
                [command_id, f"operator:{user}"],
            ).fetchone()
            return None if row is None else CommandRecord(*row)

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

    async def mark_published(self, message_ids: Sequence[str]) -> None:
        """Record that the broker acknowledged these messages: alarm events are kept as sent, data deleted."""
        if not message_ids:
            return
        self._check_running()
        fut = self._new_future()
        with self._cond:
            self._marks.append((list(message_ids), self._threadsafe(lambda exc: _settle(fut, None, exc))))
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
            use_incremental_vacuum(db, self.path)
            db.enable_wal()
            create_schema(db)
            self._tally = count_outbox(db)
            self._publish_tally(self._tally)
        except BaseException:
            conn.close()
            raise
        return db

    def _serve(self, db: Database) -> None:
        delay = _RETRY_MIN_S
        while True:
            with self._cond:
                while not (self._queued() or self._stopping or self._retention_due()):
                    self._cond.wait(timeout=max(0.0, self._next_pass - time.monotonic()))
                scores = list(self._scores)
                self._scores.clear()
                samples = list(self._samples)
                self._samples.clear()
                messages = list(self._messages)
                self._messages.clear()
                events = list(self._events)
                self._events.clear()
                marks, self._marks = self._marks, []
                reads, self._reads = self._reads, []
            ok = self._write(db, scores, samples, messages, events, marks)
            for fn, reply in reads:
                try:
                    reply(fn(db), None)
                except sqlite3.Error as exc:
                    reply(None, StoreError(f"read failed on {self.path}: {exc}"))
            if not self._stopping:
                self._retention_step(db)
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
                if self._stopping and not self._queued():
                    break
        with self._cond:
            leftover = list(self._events)
            self._events.clear()
            marks, self._marks = self._marks, []
        for batch in leftover:
            batch.done(StoreError("store stopped before the event was saved"))
        for _, mark_done in marks:
            mark_done(StoreError("store stopped before the mark was saved"))

    def _queued(self) -> bool:
        return bool(
            self._scores or self._samples or self._messages or self._events or self._marks or self._reads
        )

    def _retention_due(self) -> bool:
        return self._pass is not None or time.monotonic() >= self._next_pass

    def _retention_step(self, db: Database) -> None:
        """Run one step of the retention pass, starting one when due; a pass that fails is retried next interval."""
        if not self._retention_due():
            return
        if self._pass is None:
            self._pass = retention_pass(db, self.path, self._retention, time.time_ns())
        # Deletes may be lost to a power cut: the next pass does them again.
        self._set_sync(db, full=False)
        try:
            deleted = next(self._pass)
        except StopIteration:
            deleted = None
        except (sqlite3.Error, OSError) as exc:
            logger.warning("store: retention pass on %s failed: %s (next one in %.0f s)", self.path, exc,
                           self._retention.interval_s)  # fmt: skip
            deleted = None
        if deleted is not None:
            with self._cond:
                self.stats.retention_deleted_scores += deleted.scores
                self.stats.retention_deleted_samples += deleted.samples
                self.stats.retention_deleted_alarm_events += deleted.alarm_events
            return
        self._pass = None
        self._next_pass = time.monotonic() + self._retention.interval_s
        with self._cond:
            self.stats.last_retention_at_ns = time.time_ns()
            self.stats.db_bytes = file_bytes(self.path)

    def _write(
        self,
        db: Database,
        scores: list[tuple[Any, ...]],
        samples: list[tuple[int, str, str]],
        messages: list[DataMessage],
        events: list[_PendingBatch],
        marks: list[tuple[Sequence[str], Callable[[BaseException | None], None]]],
    ) -> bool:
        if not (scores or samples or messages or events or marks):
            return True
        tally = self._tally.copy()
        try:
            # FULL syncs the WAL at each commit so an acknowledged alarm survives power loss; scores and
            # data alone use NORMAL (consistent, a power cut may lose the last commits).
            self._set_sync(db, full=bool(events or marks))
            now = time.time_ns()
            with immediate(db):
                if scores:
                    db.table("scores").insert_all(itertools.chain([SCORE_COLUMNS], scores))
                if samples:
                    db.conn.executemany(
                        "INSERT INTO samples (ts_ns, asset, values_json) VALUES (?, ?, ?)", samples
                    )
                new_events = sum(
                    _write_event(db, item, now, tally) for batch in events for item in batch.items
                )
                for m in messages:
                    write_message(db, m, now, tally)
                for ids, _ in marks:
                    mark(db, ids, now, tally)
                if tally.messages and now - tally.swept_at_ns >= EXPIRY_SWEEP_NS:
                    drop_expired(db, now, tally)
                if tally.total > self._quota:
                    enforce_quota(db, self._quota, now, tally)
        except sqlite3.Error as exc:
            if not self._failing:
                logger.error(
                    "store: commit failed on %s: %s (alarm events kept and retried, scores and data dropped)",
                    self.path,
                    exc,
                )
            self._failing = True
            with self._cond:
                self.stats.last_error = f"commit failed: {exc}"
                self.stats.scores_dropped += len(scores)
                self.stats.samples_dropped += len(samples)
                for m in messages:
                    self._count_dropped(m.kind, 1)
            return False
        if self._failing:
            logger.info("store: commits succeed again on %s", self.path)
            self._failing = False
        self._tally = tally
        self._publish_tally(tally)
        self.stats.commits += 1
        self.stats.scores_written += len(scores)
        self.stats.samples_written += len(samples)
        self.stats.events_written += new_events
        for batch in events:
            batch.done(None)
        for _, reply in marks:
            reply(None)
        return True

    def _count_dropped(self, kind: str, n: int) -> None:
        """Add to the drop counter of a message kind (caller holds the lock or is the writer)."""
        if kind == "score":
            self.stats.outbox_dropped_scores += n
        elif kind == "status":
            self.stats.outbox_dropped_status += n
        else:
            self.stats.outbox_dropped_alarm_events += n

    def _publish_tally(self, tally: Tally) -> None:
        with self._cond:
            st = self.stats
            st.outbox_alarm_events = tally.alarm_events
            st.outbox_messages = tally.messages
            st.outbox_bytes = tally.total
            for kind, n in tally.dropped.items():
                self._count_dropped(kind, n)
            st.outbox_expired += tally.expired
            st.outbox_superseded += tally.superseded

    def _set_sync(self, db: Database, *, full: bool) -> None:
        if self._sync_full != full:
            db.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._sync_full = full


def _write_event(db: Database, item: NewEvent, now: int, tally: Tally) -> bool:
    e = item.event
    cur = db.execute(_INSERT_EVENT, [
        e.event_id, e.alarm_id, e.event, e.gateway_id, e.asset, e.rule, e.kind, e.output, e.severity,
        e.value, e.threshold, e.model, e.model_version, e.first_abnormal_source_ts_ns, e.decided_at_ns,
        e.state, e.seq, e.cause, e.command_id, item.topic, item.payload, item.qos, now,
    ])  # fmt: skip
    if cur.rowcount == 0:
        return False  # a duplicate event id (e.g. replayed after a restart) must not touch its alarm again
    tally.alarm_events += 1
    tally.alarm_bytes += len(item.topic) + len(item.payload)
    db.execute(_UPSERT_ALARM, [
        e.alarm_id, e.asset, e.rule, e.kind, e.output, e.severity, e.model, e.model_version,
        e.state, e.seq, e.first_abnormal_source_ts_ns, e.shelved_until_ns, e.decided_at_ns,
    ])  # fmt: skip
    if e.event == "raised":
        db.execute(
            _SET_RAISED, [e.value, e.threshold, e.decided_at_ns, e.first_abnormal_source_ts_ns, e.alarm_id]
        )
    elif e.event == "cleared":
        db.execute(_SET_CLEARED, [e.decided_at_ns, e.value, e.alarm_id])
    elif e.event == "acknowledged":
        db.execute(_SET_ACKED, [e.decided_at_ns, e.cause, e.alarm_id])
    return True


def _settle(fut: asyncio.Future[Any] | None, result: Any, exc: BaseException | None) -> None:
    if fut is None or fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
