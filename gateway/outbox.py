"""The outbox's bookkeeping: what waits for the broker, what it costs against the quota, what is dropped.

Two priorities: alarm events (unpublished rows of `alarm_events`) and low-priority data (the `outbox`
table: scores that could not go out live, periodic status). Each message counts as its topic +
payload + MESSAGE_OVERHEAD_BYTES against the quota. These functions run on the store's writer
thread inside its transactions, and keep a Tally that the store adopts only when the commit succeeds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

from sqlite_utils import Database

logger = logging.getLogger(__name__)

# What one outbox message costs beyond its topic and payload: the row's other columns, its index
# entries and page slack (bench --delivery measured ~860 bytes per alarm event in all, payload ~480).
MESSAGE_OVERHEAD_BYTES = 384
# After dropping data for the quota, stay this far under it, so the next commits do not drop again.
QUOTA_LOW_WATER = 0.9
EXPIRY_SWEEP_NS = 1_000_000_000


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


@dataclass
class Tally:
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

    def copy(self) -> Tally:
        """The counts, with the per-transaction drops at zero, to change inside one transaction."""
        return replace(self, dropped={"score": 0, "status": 0, "alarm": 0}, expired=0, superseded=0)


def write_message(db: Database, m: DataMessage, now: int, tally: Tally) -> None:
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


def mark(db: Database, ids: Sequence[str], now: int, tally: Tally) -> None:
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


def drop_expired(db: Database, now: int, tally: Tally) -> None:
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


def count_outbox(db: Database) -> Tally:
    """The outbox as stored, counted once at open; each commit then keeps the count."""
    size = "count(*), coalesce(sum(length(topic) + length(payload)), 0)"
    alarms = db.execute(f"SELECT {size} FROM alarm_events WHERE published_at_ns IS NULL").fetchone()
    data = db.execute(f"SELECT {size} FROM outbox").fetchone()
    return Tally(alarm_events=alarms[0], alarm_bytes=alarms[1], messages=data[0], message_bytes=data[1])


def enforce_quota(db: Database, quota: int, now: int, tally: Tally) -> None:
    """Bring the outbox back under its quota: data first (oldest first), alarm events only as the last resort."""
    drop_expired(db, now, tally)
    low_water = int(quota * QUOTA_LOW_WATER)
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
    if tally.total <= quota:
        return
    before = tally.alarm_events
    while tally.total > quota and tally.alarm_events:
        rows = db.execute(
            "SELECT seq, length(topic) + length(payload) FROM alarm_events "
            "WHERE published_at_ns IS NULL ORDER BY seq LIMIT 256"
        ).fetchall()
        last = None
        for seq, size in rows:
            if tally.total <= quota:
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
        quota,
        dropped,
    )
