"""Retention against real SQLite files (bounded by age and size, alarms kept longest) and the tag history."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from gateway.config import load_config
from gateway.demo.broker import MosquittoBroker
from gateway.demo.run import demo_config, write_config
from gateway.retention import RetentionPolicy, file_bytes
from gateway.store import NewEvent, Store
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_gateway import running_gateway
from tests.fixtures_mqtt import make_event
from tests.fixtures_opcua import running_simulator

DAY_NS = 86_400 * 10**9
PAYLOAD = b"x" * 600
SAMPLE_JSON = json.dumps({f"ch{k}": k * 1.5 for k in range(8)}, separators=(",", ":"))


def _query(path: Path, sql: str) -> list[tuple]:
    """Read with a separate connection, as another process would."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def _pages(path: Path) -> tuple[int, int, int]:
    """page_count, freelist_count and page_size of a closed file."""
    return tuple(_query(path, f"PRAGMA {p}")[0][0] for p in ("page_count", "freelist_count", "page_size"))  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def _store(path: Path, policy: RetentionPolicy | None = None) -> AsyncIterator[Store]:
    """A started store whose first retention pass (the one at start) has ended; stopped on exit."""
    store = Store(path, queue_size=100_000, retention=policy)
    await store.start()
    try:
        await wait_for_condition(
            lambda: store.stats.last_retention_at_ns > 0, 30, "the retention pass at start"
        )
        yield store
    finally:
        await store.stop()


@dataclass
class Alarms:
    """The alarm history written: closed occurrences oldest first, and what retention must keep."""

    closed: list[str]
    kept: set[str]  # open occurrences, and closed ones with an event the broker never acknowledged
    undelivered: set[str]  # event ids


async def _write_alarms(store: Store, closed_at_ns: list[int], *, oldest_ns: int) -> Alarms:
    """Delivered occurrences back to normal at these times; at oldest_ns, two open occurrences and one
    closed whose last event was never delivered."""

    async def occurrence(n: int, at_ns: int, *, close: bool, deliver: bool) -> tuple[str, list[str]]:
        events = [replace(make_event(n), decided_at_ns=at_ns - 1)]
        if close:
            events.append(replace(make_event(n, "cleared"), state="normal", decided_at_ns=at_ns))
        await store.add_alarm_events([NewEvent(e, "t", PAYLOAD) for e in events])
        ids = [e.event_id for e in events]
        await store.mark_published(ids if deliver else ids[:1])
        return events[0].alarm_id, [] if deliver else ids[1:]

    closed = [(await occurrence(n, at, close=True, deliver=True))[0] for n, at in enumerate(closed_at_ns)]
    kept, undelivered = set(), set()
    for n, close, deliver in ((1000, False, True), (1001, False, False), (1002, True, False)):
        alarm_id, pending = await occurrence(n, oldest_ns, close=close, deliver=deliver)
        kept.add(alarm_id)
        undelivered.update(pending)
    return Alarms(closed, kept, undelivered)


def _write_history(store: Store, t0_ns: int, *, scores: int, samples: int, step_ns: int) -> None:
    """Scores and tag history over the same time span from t0_ns, in time order, interleaved by time."""
    store.add_scores(
        [(t0_ns + i * step_ns, f"pump{i % 4 + 1:02d}", "ae", "1", "score", i / 7) for i in range(scores)]
    )
    every = scores // samples
    store.add_samples(
        [(t0_ns + i * every * step_ns, f"pump{i % 4 + 1:02d}", SAMPLE_JSON) for i in range(samples)]
    )


def _check_alarms_kept(path: Path, alarms: Alarms) -> list[str]:
    """Every open alarm and undelivered event is still there; returns the closed occurrences left."""
    ids = {r[0] for r in _query(path, "SELECT alarm_id FROM alarms")}
    assert alarms.kept <= ids
    events = {r[0] for r in _query(path, "SELECT event_id FROM alarm_events WHERE published_at_ns IS NULL")}
    assert events == alarms.undelivered
    return [a for a in alarms.closed if a in ids]


def _fill(path: Path, now: int) -> Alarms:
    """~0.6 MiB of alarm history and ~1.9 MiB of scores and samples written a day ago."""

    async def main() -> Alarms:
        async with _store(path) as store:
            closed_at = [now - (300 - n) * 10**9 for n in range(300)]  # one a second, oldest first
            alarms = await _write_alarms(store, closed_at, oldest_ns=now - 3600 * 10**9)
            _write_history(store, now - DAY_NS, scores=20_000, samples=5_000, step_ns=10**6)
        return alarms

    return asyncio.run(main())


def _retain(path: Path, policy: RetentionPolicy) -> Store:
    async def main() -> Store:
        async with _store(path, policy) as store:
            pass
        return store

    return asyncio.run(main())


def test_over_the_size_bound_the_oldest_scores_and_samples_go_and_all_alarm_history_stays(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.db"
    alarms = _fill(path, time.time_ns())
    (scores_ts,) = zip(*_query(path, "SELECT ts_ns FROM scores ORDER BY ts_ns"), strict=True)
    (samples_ts,) = zip(*_query(path, "SELECT ts_ns FROM samples ORDER BY ts_ns"), strict=True)
    bound = int(1.5 * 2**20)
    assert file_bytes(path) > bound

    st = _retain(path, RetentionPolicy(max_db_bytes=bound)).stats
    assert st.db_bytes <= bound and file_bytes(path) <= bound
    # Both tables thinned, each from its oldest row on; no alarm history touched while they had rows.
    assert 0 < st.retention_deleted_scores < len(scores_ts) and 0 < st.retention_deleted_samples < len(
        samples_ts
    )
    assert _query(path, "SELECT min(ts_ns), count(*) FROM scores") == [
        (scores_ts[st.retention_deleted_scores], len(scores_ts) - st.retention_deleted_scores)
    ]
    assert _query(path, "SELECT min(ts_ns), count(*) FROM samples") == [
        (samples_ts[st.retention_deleted_samples], len(samples_ts) - st.retention_deleted_samples)
    ]
    assert st.retention_deleted_alarm_events == 0
    assert _check_alarms_kept(path, alarms) == alarms.closed


def test_closed_alarm_history_goes_oldest_first_only_once_scores_and_samples_are_gone(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    alarms = _fill(path, time.time_ns())
    bound = int(0.4 * 2**20)

    st = _retain(path, RetentionPolicy(max_db_bytes=bound)).stats
    assert st.db_bytes <= bound and file_bytes(path) <= bound
    assert _query(path, "SELECT (SELECT count(*) FROM scores), (SELECT count(*) FROM samples)") == [(0, 0)]
    left = _check_alarms_kept(path, alarms)
    # The newest closed occurrences are left, whole (both events), the oldest went.
    assert 0 < len(left) < len(alarms.closed) and left == alarms.closed[-len(left) :]
    assert _query(
        path, "SELECT count(*) FROM alarm_events WHERE alarm_id IN (SELECT alarm_id FROM alarms)"
    ) == [(2 * len(left) + 1 + 1 + 2,)]
    assert st.retention_deleted_alarm_events == 2 * (len(alarms.closed) - len(left))
    assert _query(
        path, "SELECT count(*) FROM alarm_events WHERE alarm_id NOT IN (SELECT alarm_id FROM alarms)"
    ) == [(0,)]


def test_the_days_rule_deletes_by_age_and_keeps_open_and_undelivered_alarms(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    now = time.time_ns()

    async def fill() -> Alarms:
        async with _store(path) as store:
            # Delivered occurrences closed 100 days and a day ago; open and undelivered ones 100 days old.
            alarms = await _write_alarms(
                store, [now - 100 * DAY_NS, now - DAY_NS], oldest_ns=now - 100 * DAY_NS
            )
            for t0 in (now - 100 * DAY_NS, now - DAY_NS):
                _write_history(store, t0, scores=100, samples=20, step_ns=10**9)
        return alarms

    alarms = asyncio.run(fill())
    st = _retain(path, RetentionPolicy(days=90)).stats
    deleted = (st.retention_deleted_scores, st.retention_deleted_samples, st.retention_deleted_alarm_events)
    assert deleted == (100, 20, 2)
    cutoff = now - 90 * DAY_NS
    assert _query(path, f"SELECT count(*) FROM scores WHERE ts_ns < {cutoff}") == [(0,)]
    assert _query(path, f"SELECT count(*) FROM samples WHERE ts_ns < {cutoff}") == [(0,)]
    assert _query(path, "SELECT (SELECT count(*) FROM scores), (SELECT count(*) FROM samples)") == [(100, 20)]
    # Open (raised 100 days ago) and undelivered occurrences stay, however old.
    assert _check_alarms_kept(path, alarms) == alarms.closed[1:]


def test_incremental_vacuum_gives_the_freed_pages_back_to_the_file_system(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    now = time.time_ns()

    async def fill() -> None:
        async with _store(path) as store:
            _write_history(store, now - 100 * DAY_NS, scores=20_000, samples=5_000, step_ns=10**6)
            _write_history(store, now - DAY_NS, scores=400, samples=100, step_ns=10**6)

    asyncio.run(fill())
    pages, free, size = _pages(path)
    assert path.stat().st_size == pages * size and free == 0

    _retain(path, RetentionPolicy(days=90))
    after, free_after, _ = _pages(path)
    assert _query(path, "PRAGMA auto_vacuum") == [(2,)]  # incremental
    assert free_after == 0 and after < pages // 4
    assert path.stat().st_size == after * size


def test_a_schema_3_file_without_auto_vacuum_gets_the_samples_table_and_incremental_vacuum(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.db"
    event = make_event(1)

    async def before() -> None:
        async with _store(path) as store:
            await store.add_alarm_event(event, "t", b"r1")

    asyncio.run(before())
    # Back to what a schema-3 gateway left: no samples table nor retention indexes, no auto-vacuum.
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executescript(
            "DROP TABLE samples; DROP INDEX idx_alarm_events_alarm; DROP INDEX idx_alarms_closed; "
            "PRAGMA user_version = 3; PRAGMA auto_vacuum = NONE; VACUUM;"
        )
    assert _query(path, "PRAGMA auto_vacuum") == [(0,)]

    async def after() -> None:
        async with _store(path) as store:
            store.add_samples([(1, "pump01", SAMPLE_JSON)])
            assert [m.payload for m in await store.pending()] == [b"r1"]

    asyncio.run(after())
    assert _query(path, "PRAGMA user_version") == [(4,)]
    assert _query(path, "PRAGMA auto_vacuum") == [(2,)]
    assert _query(path, "SELECT ts_ns, asset, values_json FROM samples") == [(1, "pump01", SAMPLE_JSON)]
    assert _query(path, "SELECT alarm_id, state FROM alarms") == [(event.alarm_id, "unack")]


def test_a_running_gateway_records_tag_history_at_history_hz_with_bad_values_as_null(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    opc_port = free_port()
    raw = demo_config(opc_port=opc_port, mqtt_port=mosquitto.port, db_path=tmp_path / "gw.db", pumps=2)
    raw["storage"]["history_hz"] = 2  # every 5th sample at 10 Hz
    cfg = load_config(write_config(raw, tmp_path / "c.yaml"))

    async def main() -> dict[str, int]:
        # pump02's pressure sensor is Bad for the whole run.
        async with (
            running_simulator(
                opc_port,
                n_pumps=2,
                fault_pump=None,
                nan_tag=None,
                bad_tag=(2, "pressure"),
                bad_between_s=(0, 600),
            ),
            running_gateway(cfg) as run,
        ):
            samplers = run.gateway.samplers.values()
            await wait_for_condition(
                lambda: min(s.samples for s in samplers) >= 20 or run.stopped(), 60, "samples"
            )
        assert run.code == 0
        return {name: s.samples for name, s in run.gateway.samplers.items()}

    samples = asyncio.run(main())
    rows = _query(cfg.storage.path, "SELECT asset, values_json FROM samples ORDER BY ts_ns")
    channels = cfg.assets[0].channels
    for asset, n in samples.items():
        values = [json.loads(v) for a, v in rows if a == asset]
        assert n // 5 <= len(values) <= math.ceil(n / 5)
        assert all(list(v) == channels for v in values)
        if asset == "pump02":
            assert all(v["pressure"] is None for v in values)
            assert all(isinstance(x, float) for v in values for c, x in v.items() if c != "pressure")
        else:
            assert all(isinstance(x, float) for v in values for x in v.values())
