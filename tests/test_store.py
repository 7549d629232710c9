"""The SQLite store against real files: outbox order, durability across reopen, batching, failures."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.outbox import OutboxMessage
from gateway.store import NewEvent, OpenAlarm, Store
from tests.conftest import wait_for_condition
from tests.fixtures_mqtt import make_event


def _sql(path: Path, query: str) -> list[tuple]:
    """Read with a separate connection, as another process would."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def test_events_pending_in_order_until_marked_published(tmp_path: Path) -> None:
    async def main() -> tuple[list[OutboxMessage], list[OutboxMessage]]:
        store = Store(tmp_path / "g.db")
        await store.start()
        for n in (3, 1, 2):
            await store.add_alarm_event(make_event(n), f"t/{n}", f"p{n}".encode())
        await store.add_alarm_event(make_event(1, "cleared", value=0.2), "t/1", b"c1")
        before = await store.pending()
        await store.mark_published([before[0].message_id, before[2].message_id])
        after = await store.pending()
        await store.stop()
        return before, after

    before, after = asyncio.run(main())
    assert [m.message_id for m in before] == [
        make_event(3).event_id, make_event(1).event_id, make_event(2).event_id,
        make_event(1, "cleared").event_id,
    ]  # fmt: skip
    assert before[0] == OutboxMessage(make_event(3).event_id, "t/3", b"p3", 1)
    assert [m.message_id for m in after] == [make_event(1).event_id, make_event(1, "cleared").event_id]
    db = tmp_path / "g.db"
    assert _sql(db, "SELECT count(*) FROM alarm_events WHERE published_at_ns IS NOT NULL") == [(2,)]
    alarms = dict(_sql(db, "SELECT alarm_id, state FROM alarms"))
    assert alarms == {make_event(n).alarm_id: s for n, s in ((1, "rtn_unack"), (2, "unack"), (3, "unack"))}
    assert _sql(db, "PRAGMA integrity_check") == [("ok",)]
    assert _sql(db, "PRAGMA journal_mode") == [("wal",)]


def test_unpublished_events_survive_a_restart_and_replays_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "g.db"

    async def first_run() -> None:
        store = Store(path)
        await store.start()
        await store.add_alarm_event(make_event(1), "t", b"r1")
        await store.add_alarm_event(make_event(2), "t", b"r2")
        await store.mark_published([make_event(1).event_id])
        await store.add_alarm_event(make_event(1, "cleared", value=0.1), "t", b"c1")
        await store.stop()

    async def second_run() -> tuple[list[str], int]:
        store = Store(path)
        await store.start()
        ids = [m.message_id for m in await store.pending()]
        # A restart that replays the same decisions must not create second copies or reopen the alarm.
        await store.add_alarm_event(make_event(1), "t", b"r1-again")
        await store.add_alarm_event(make_event(2), "t", b"r2-again")
        written = store.stats.events_written
        after = [m.payload for m in await store.pending()]
        await store.stop()
        assert after == [b"r2", b"c1"]
        return ids, written

    asyncio.run(first_run())
    ids, written = asyncio.run(second_run())
    assert ids == [make_event(2).event_id, make_event(1, "cleared").event_id]
    assert written == 0
    assert _sql(path, "SELECT count(*) FROM alarm_events") == [(3,)]
    row = _sql(
        path, "SELECT state, raised_value, cleared_value FROM alarms WHERE alarm_id = 'gw01-pump01-hi-1'"
    )
    assert row == [("rtn_unack", 2.5, 0.1)]


def test_scores_queued_during_a_busy_commit_are_written_in_one_batch(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    rows_per_call, calls = 500, 10

    async def main() -> Store:
        store = Store(path)
        await store.start()
        # Another connection holds the write lock, so the writer is stuck on (at most) its first batch
        # while the remaining calls queue up behind it.
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        for c in range(calls):
            store.add_scores(
                [(c * rows_per_call + i, "pump01", "ae", "1", "score", i / 7) for i in range(rows_per_call)]
            )
        locker.execute("COMMIT")
        locker.close()
        await store.stop()
        return store

    store = asyncio.run(main())
    assert store.stats.scores_written == rows_per_call * calls
    assert store.stats.scores_dropped == 0
    assert store.stats.commits <= 2
    assert _sql(path, "SELECT count(*), min(ts_ns), max(ts_ns) FROM scores") == [(5000, 0, 4999)]
    assert _sql(path, "SELECT value FROM scores WHERE ts_ns = 3") == [(3 / 7,)]


def test_score_overflow_drops_oldest_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "g.db"

    async def main() -> Store:
        store = Store(path, queue_size=10)
        await store.start()
        store.add_scores([(i, "pump01", "ae", "1", "score", float(i)) for i in range(25)])
        await store.stop()
        return store

    store = asyncio.run(main())
    assert store.stats.scores_dropped == 15
    assert store.stats.scores_written == 10
    assert _sql(path, "SELECT min(ts_ns), max(ts_ns) FROM scores") == [(15, 24)]


def test_failed_commits_keep_alarm_events_and_drop_scores(tmp_path: Path) -> None:
    path = tmp_path / "g.db"

    async def main() -> None:
        store = Store(path, busy_timeout_s=0.05)
        await store.start()
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        store.add_scores([(i, "pump01", "ae", "1", "score", 0.5) for i in range(20)])
        add = asyncio.ensure_future(store.add_alarm_event(make_event(7), "t", b"kept"))
        await wait_for_condition(
            lambda: store.stats.scores_dropped == 20 and store.stats.last_error is not None,
            what="failed commit",
        )
        assert "locked" in (store.stats.last_error or "")
        assert not add.done()
        locker.execute("COMMIT")
        locker.close()
        await asyncio.wait_for(add, 10)
        assert [m.payload for m in await store.pending()] == [b"kept"]
        assert store.stats.events_written == 1
        await store.stop()

    asyncio.run(main())
    assert _sql(path, "SELECT state FROM alarms") == [("unack",)]
    assert _sql(path, "SELECT count(*) FROM scores") == [(0,)]
    assert _sql(path, "PRAGMA integrity_check") == [("ok",)]


def test_a_batch_is_committed_in_order_in_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    batch = [NewEvent(make_event(n), f"t/{n}", f"p{n}".encode()) for n in (5, 3, 4)]

    async def main() -> None:
        store = Store(path, busy_timeout_s=0.05)
        await store.start()
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        add = asyncio.ensure_future(store.add_alarm_events(batch))
        await wait_for_condition(lambda: store.stats.last_error is not None, what="failed commit")
        # Another process sees none of the batch while its commit fails.
        assert _sql(path, "SELECT count(*) FROM alarm_events") == [(0,)]
        assert not add.done()
        commits = store.stats.commits
        locker.execute("COMMIT")
        locker.close()
        await asyncio.wait_for(add, 10)
        assert store.stats.commits == commits + 1
        assert [m.payload for m in await store.pending()] == [b"p5", b"p3", b"p4"]
        await store.stop()

    asyncio.run(main())
    assert _sql(path, "SELECT count(*) FROM alarms WHERE state = 'unack'") == [(3,)]


def test_a_batch_that_cannot_be_written_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    # SQLite cannot bind the second event's payload, after the first one's rows were written.
    bad = NewEvent(make_event(2), "t", object())  # type: ignore[arg-type]
    batch = [NewEvent(make_event(1), "t", b"p1"), bad, NewEvent(make_event(3), "t", b"p3")]

    async def main() -> None:
        store = Store(path)
        await store.start()
        add = asyncio.ensure_future(store.add_alarm_events(batch))
        await wait_for_condition(lambda: store.stats.last_error is not None, what="failed commit")
        assert "binding" in (store.stats.last_error or "")
        await store.stop(timeout=0.2)  # it would retry for ever: give up
        with pytest.raises(StoreError, match="stopped before"):
            await add

    asyncio.run(main())
    assert _sql(path, "SELECT count(*) FROM alarm_events") == [(0,)]
    assert _sql(path, "SELECT count(*) FROM alarms") == [(0,)]


def test_batches_larger_than_the_queue_and_concurrent_ones_keep_their_order(tmp_path: Path) -> None:
    def batch(first: int, n: int) -> list[NewEvent]:
        return [NewEvent(make_event(i), "t", f"p{i}".encode()) for i in range(first, first + n)]

    async def main() -> list[bytes]:
        store = Store(tmp_path / "g.db", queue_size=4)
        await store.start()
        # The big batch takes every slot; the others wait their turn instead of splitting the slots.
        await asyncio.gather(
            store.add_alarm_events(batch(0, 10)),
            store.add_alarm_events(batch(10, 3)),
            store.add_alarm_event(make_event(13), "t", b"p13"),
            store.add_alarm_events(batch(14, 3)),
        )
        payloads = [m.payload for m in await store.pending(100)]
        await store.stop()
        return payloads

    assert asyncio.run(main()) == [f"p{i}".encode() for i in range(17)]


def test_unusable_paths_raise_store_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not an sqlite database" * 200)

    async def open_fails(path: Path) -> str:
        store = Store(path)
        with pytest.raises(StoreError) as info:
            await store.start()
        with pytest.raises(StoreError, match="not running"):
            await store.add_alarm_event(make_event(1), "t", b"x")
        await store.stop()
        return str(info.value)

    unwritable = asyncio.run(open_fails(not_a_dir / "g.db"))
    assert "unable to open database file" in unwritable and "\n" not in unwritable
    assert "not a database" in asyncio.run(open_fails(corrupt))


def test_open_alarms_keep_their_newest_state_and_a_schema_1_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    # A file as the schema-1 gateway left it: one active and one cleared alarm, and their events.
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript(_SCHEMA_1)
    raised, cleared = make_event(3), make_event(3, "cleared", value=0.1)

    async def main() -> list[OpenAlarm]:
        store = Store(path)
        await store.start()
        await store.add_alarm_event(raised, "t", b"r3")
        await store.add_alarm_event(cleared, "t", b"c3")
        await store.add_alarm_event(raised, "t", b"r3-replayed")  # ignored: the row keeps seq 2
        opened = await store.open_alarms()
        await store.stop()
        return opened

    opened = asyncio.run(main())
    by_id = {a.alarm_id: a for a in opened}
    assert set(by_id) == {"old-active", raised.alarm_id}  # old-cleared is normal now
    assert (by_id["old-active"].state, by_id["old-active"].seq, by_id["old-active"].raised_value) == ("unack", 1, 4.0)
    assert (by_id[raised.alarm_id].state, by_id[raised.alarm_id].seq) == ("rtn_unack", 2)
    assert _sql(path, "PRAGMA user_version") == [(4,)]
    assert _sql(path, "SELECT state, seq FROM alarms WHERE alarm_id = 'old-cleared'") == [("normal", 2)]
    assert _sql(path, "SELECT count(*) FROM alarm_events") == [(4,)]


_SCHEMA_1 = """
CREATE TABLE scores (ts_ns INTEGER, asset TEXT, model TEXT, model_version TEXT, output TEXT, value FLOAT);
CREATE TABLE alarm_events (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL, alarm_id TEXT NOT NULL,
    event TEXT NOT NULL, gateway_id TEXT, asset TEXT, rule TEXT, kind TEXT, output TEXT, severity TEXT,
    value FLOAT, threshold FLOAT, model TEXT, model_version TEXT, first_abnormal_source_ts_ns INTEGER,
    decided_at_ns INTEGER, topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    stored_at_ns INTEGER, published_at_ns INTEGER);
CREATE UNIQUE INDEX idx_alarm_events_event_id ON alarm_events (event_id);
CREATE TABLE alarms (alarm_id TEXT PRIMARY KEY, asset TEXT, rule TEXT, kind TEXT, output TEXT,
    severity TEXT, model TEXT, model_version TEXT, state TEXT NOT NULL, raised_value FLOAT,
    raised_threshold FLOAT, first_abnormal_source_ts_ns INTEGER, raised_at_ns INTEGER,
    cleared_at_ns INTEGER, cleared_value FLOAT);
INSERT INTO alarms (alarm_id, asset, rule, state, raised_value, raised_at_ns)
    VALUES ('old-active', 'pump01', 'hi', 'active', 4.0, 10), ('old-cleared', 'pump02', 'hi', 'cleared', 3.0, 5);
INSERT INTO alarm_events (event_id, alarm_id, event, topic, payload, qos)
    VALUES ('old-active:raised', 'old-active', 'raised', 't', x'7b7d', 1),
           ('old-cleared:raised', 'old-cleared', 'raised', 't', x'7b7d', 1);
PRAGMA user_version = 1;
"""
