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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from sqlite_utils import Database

from gateway.alarms import AlarmEvent
from gateway.errors import StoreError
from gateway.tasks import wait_for

logger = logging.getLogger(__name__)

SCORE_COLUMNS = ("ts_ns", "asset", "model", "model_version", "output", "value")
_SCHEMA_VERSION = 3
# What one outbox message costs beyond its topic and payload: the row's other columns, its index
# entries and page slack (bench --delivery measured ~860 bytes per alarm event in all, payload ~480).
MESSAGE_OVERHEAD_BYTES = 384
# After dropping data for the quota, stay this far under it, so the next commits do not drop again.
_QUOTA_LOW_WATER = 0.9
_EXPIRY_SWEEP_NS = 1_000_000_000
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


class OutboxMessage(NamedTuple):
    """One stored message still to be published: an alarm event (its message id is the event id) or data."""

    message_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    expires_at_ns: int = 0  # wall clock; 0 never expires
    kind: str = "alarm"


DataKind = Literal["score", "status"]


class DataMessage(NamedTuple):
    """A low-priority message for the outbox: a score that could not be published live, or a status.

    A status replaces any status on the same topic still waiting: only the newest state matters.
    """

    message_id: str
    kind: DataKind
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    expires_at_ns: int = 0


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


@dataclass
class _Tally:
    """The writer's running count of the outbox, copied per transaction and kept only if it commits."""

    alarm_events: int = 0
    alarm_bytes: int = 0
    messages: int = 0
    message_bytes: int = 0
    swept_at_ns: int = 0
    # This transaction's drops by kind, expiries and replaced statuses, added to StoreStats on commit.
    dropped: dict[str, int] = field(default_factory=lambda: {"score": 0, "status": 0, "alarm": 0})
    expired: int = 0
    superseded: int = 0

    @property
    def total(self) -> int:
        """Bytes the outbox counts against its quota."""
        return (
            self.alarm_bytes
            + self.message_bytes
            + (self.alarm_events + self.messages) * MESSAGE_OVERHEAD_BYTES
        )

    def copy(self) -> _Tally:
        """The counts, with the per-transaction drops at zero, to change inside one transaction."""
        return replace(self, dropped={"score": 0, "status": 0, "alarm": 0}, expired=0, superseded=0)


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
        outbox_quota_bytes: int = 256 * 2**20,
    ) -> None:  # fmt: skip
        self.path = Path(path)
        self.stats = StoreStats(outbox_quota_bytes=outbox_quota_bytes)
        self._queue_size = queue_size
        self._busy_timeout_s = busy_timeout_s
        self._quota = outbox_quota_bytes
        self._cond = threading.Condition()
        self._scores: deque[tuple[Any, ...]] = deque(maxlen=queue_size)
        self._messages: deque[DataMessage] = deque(maxlen=queue_size)
        self._tally = _Tally()
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
            db.enable_wal()
            _create_schema(db)
            self._tally = _count_outbox(db)
            self._publish_tally(self._tally)
        except BaseException:
            conn.close()
            raise
        return db

    def _serve(self, db: Database) -> None:
        delay = _RETRY_MIN_S
        while True:
            with self._cond:
                while not (self._queued() or self._stopping):
                    self._cond.wait()
                scores = list(self._scores)
                self._scores.clear()
                messages = list(self._messages)
                self._messages.clear()
                events = list(self._events)
                self._events.clear()
                marks, self._marks = self._marks, []
                reads, self._reads = self._reads, []
            ok = self._write(db, scores, messages, events, marks)
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
        return bool(self._scores or self._messages or self._events or self._marks or self._reads)

    def _write(
        self,
        db: Database,
        scores: list[tuple[Any, ...]],
        messages: list[DataMessage],
        events: list[_PendingBatch],
        marks: list[tuple[Sequence[str], Callable[[BaseException | None], None]]],
    ) -> bool:
        if not (scores or messages or events or marks):
            return True
        tally = self._tally.copy()
        try:
            # FULL syncs the WAL at each commit so an acknowledged alarm survives power loss; scores and
            # data alone use NORMAL (consistent, a power cut may lose the last commits).
            self._set_sync(db, full=bool(events or marks))
            now = time.time_ns()
            with _immediate(db):
                if scores:
                    db.table("scores").insert_all(itertools.chain([SCORE_COLUMNS], scores))
                new_events = sum(
                    _write_event(db, item, now, tally) for batch in events for item in batch.items
                )
                for m in messages:
                    _write_message(db, m, now, tally)
                for ids, _ in marks:
                    _mark(db, ids, now, tally)
                if tally.messages and now - tally.swept_at_ns >= _EXPIRY_SWEEP_NS:
                    _drop_expired(db, now, tally)
                if tally.total > self._quota:
                    self._enforce_quota(db, now, tally)
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
        self.stats.events_written += new_events
        for batch in events:
            batch.done(None)
        for _, reply in marks:
            reply(None)
        return True

    def _enforce_quota(self, db: Database, now: int, tally: _Tally) -> None:
        """Bring the outbox back under its quota: data first (oldest first), alarm events only as the last resort."""
        _drop_expired(db, now, tally)
        low_water = int(self._quota * _QUOTA_LOW_WATER)
        while tally.total > low_water and tally.messages:
            rows = db.execute(
                "SELECT seq, kind, length(topic) + length(payload) FROM outbox ORDER BY seq LIMIT 256"
            ).fetchall()
            last = None
            for seq, kind, size in rows:
                if tally.total <= low_water:
                    break
                last = seq
                tally.messages -= 1
                tally.message_bytes -= size
                tally.dropped[kind] = tally.dropped.get(kind, 0) + 1
            db.execute("DELETE FROM outbox WHERE seq <= ?", [last])
        if tally.total <= self._quota:
            return
        before = tally.alarm_events
        while tally.total > self._quota and tally.alarm_events:
            rows = db.execute(
                "SELECT seq, length(topic) + length(payload) FROM alarm_events "
                "WHERE published_at_ns IS NULL ORDER BY seq LIMIT 256"
            ).fetchall()
            last = None
            for seq, size in rows:
                if tally.total <= self._quota:
                    break
                last = seq
                tally.alarm_events -= 1
                tally.alarm_bytes -= size
            # The row stays as the record of the transition; only its undelivered message goes.
            db.execute(
                "UPDATE alarm_events SET payload = X'', published_at_ns = ?, dropped_at_ns = ? "
                "WHERE published_at_ns IS NULL AND seq <= ?",
                [now, now, last],
            )
        dropped = before - tally.alarm_events
        tally.dropped["alarm"] += dropped
        logger.error(
            "outbox: quota of %d bytes full of alarm events alone; dropped the %d oldest undelivered",
            self._quota,
            dropped,
        )

    def _count_dropped(self, kind: str, n: int) -> None:
        """Add to the drop counter of a message kind (caller holds the lock or is the writer)."""
        if kind == "score":
            self.stats.outbox_dropped_scores += n
        elif kind == "status":
            self.stats.outbox_dropped_status += n
        else:
            self.stats.outbox_dropped_alarm_events += n

    def _publish_tally(self, tally: _Tally) -> None:
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


def _write_event(db: Database, item: NewEvent, now: int, tally: _Tally) -> bool:
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


def _write_message(db: Database, m: DataMessage, now: int, tally: _Tally) -> None:
    if m.kind == "status":
        # Only the newest status matters: one still waiting on the same topic is replaced.
        old = db.execute(
            "SELECT count(*), coalesce(sum(length(topic) + length(payload)), 0) FROM outbox "
            "WHERE kind = 'status' AND topic = ?",
            [m.topic],
        ).fetchone()
        if old[0]:
            db.execute("DELETE FROM outbox WHERE kind = 'status' AND topic = ?", [m.topic])
            tally.messages -= old[0]
            tally.message_bytes -= old[1]
            tally.superseded += old[0]
    cur = db.execute(
        "INSERT OR IGNORE INTO outbox (message_id, kind, topic, payload, qos, retain, expires_at_ns, stored_at_ns) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [m.message_id, m.kind, m.topic, m.payload, m.qos, int(m.retain), m.expires_at_ns, now],
    )
    if cur.rowcount:
        tally.messages += 1
        tally.message_bytes += len(m.topic) + len(m.payload)


def _mark(db: Database, ids: Sequence[str], now: int, tally: _Tally) -> None:
    """Alarm events acknowledged by the broker are kept as sent; data messages are deleted."""
    marks = ", ".join("?" * len(ids))
    size = "count(*), coalesce(sum(length(topic) + length(payload)), 0)"
    n, b = db.execute(
        f"SELECT {size} FROM alarm_events WHERE published_at_ns IS NULL AND event_id IN ({marks})", ids
    ).fetchone()
    if n:
        db.execute(
            f"UPDATE alarm_events SET published_at_ns = ? WHERE published_at_ns IS NULL AND event_id IN ({marks})",
            [now, *ids],
        )
        tally.alarm_events -= n
        tally.alarm_bytes -= b
    n, b = db.execute(f"SELECT {size} FROM outbox WHERE message_id IN ({marks})", ids).fetchone()
    if n:
        db.execute(f"DELETE FROM outbox WHERE message_id IN ({marks})", ids)
        tally.messages -= n
        tally.message_bytes -= b


def _drop_expired(db: Database, now: int, tally: _Tally) -> None:
    """Delete data whose expiry passed unsent: a late score misleads more than a missing one."""
    tally.swept_at_ns = now
    where = "expires_at_ns BETWEEN 1 AND ?"
    n, b = db.execute(
        f"SELECT count(*), coalesce(sum(length(topic) + length(payload)), 0) FROM outbox WHERE {where}", [now]
    ).fetchone()
    if n:
        db.execute(f"DELETE FROM outbox WHERE {where}", [now])
        tally.messages -= n
        tally.message_bytes -= b
        tally.expired += n


def _count_outbox(db: Database) -> _Tally:
    """The outbox as stored, counted once at open; each commit then keeps the count."""
    size = "count(*), coalesce(sum(length(topic) + length(payload)), 0)"
    alarms = db.execute(f"SELECT {size} FROM alarm_events WHERE published_at_ns IS NULL").fetchone()
    data = db.execute(f"SELECT {size} FROM outbox").fetchone()
    return _Tally(alarm_events=alarms[0], alarm_bytes=alarms[1], messages=data[0], message_bytes=data[1])


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
                "state": str, "event_seq": int, "cause": str, "command_id": str,
                "topic": str, "payload": bytes, "qos": int, "stored_at_ns": int, "published_at_ns": int,
                "dropped_at_ns": int,
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
        db.table("outbox").create(
            {
                "seq": int, "message_id": str, "kind": str, "topic": str, "payload": bytes, "qos": int,
                "retain": int, "expires_at_ns": int, "stored_at_ns": int,
            },
            pk="seq",
            not_null={"message_id", "kind", "topic", "payload", "qos", "retain", "expires_at_ns"},
            if_not_exists=True,
        )  # fmt: skip
        db.table("outbox").create_index(["message_id"], unique=True, if_not_exists=True)
        db.table("outbox").create_index(["expires_at_ns"], if_not_exists=True)
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
        db.execute(
            "CREATE INDEX IF NOT EXISTS idx_alarm_events_command ON alarm_events(command_id) "
            "WHERE command_id IS NOT NULL"
        )
        db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


# Columns each schema version added to existing tables: schema 2 the alarm lifecycle, schema 3 the
# command that caused an event and alarm events dropped by the outbox quota. (New tables are created.)
_ADDED = {
    2: {
        "alarm_events": {"state": str, "event_seq": int, "cause": str},
        "alarms": {
            "seq": int,
            "acked_at_ns": int,
            "acked_by": str,
            "shelved_until_ns": int,
            "updated_at_ns": int,
        },
    },
    3: {"alarm_events": {"command_id": str, "dropped_at_ns": int}},
}


def _migrate(db: Database) -> None:
    """Bring a file written by an older gateway up to this schema, keeping every row."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version >= _SCHEMA_VERSION:
        return
    for added_in, tables in _ADDED.items():
        if version >= added_in:
            continue
        for table, columns in tables.items():
            have = set(db[table].columns_dict)
            for name, kind in columns.items():
                if name not in have:
                    db[table].add_column(name, kind)
    if version >= 2:
        return
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
