"""`edge-gateway alarms`, `events` and `plot` against a database recorded by the real Store and AlarmEngine."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import struct
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml

from gateway.alarms import AlarmEngine, AlarmRule
from gateway.cli import main
from gateway.history import format_ns, open_db, parse_time, query_alarms, time_arg, to_ns
from gateway.plot import load_plot_data
from gateway.store import NewEvent, Store

# Recent, so that the store's retention pass keeps the recording whenever the tests run.
BASE = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(hours=1)
BASE_NS = to_ns(BASE)
S = 1_000_000_000
MINUTES = 10
CHANNELS = ("temp", "pressure", "vibration", "flow")


def _rule(name: str, assets: set[str], high: float = 0.8, low: float = 0.6) -> AlarmRule:
    return AlarmRule(
        name=name, model="ae", output="score", value_index=0, high=high, low=low, direction="above",
        on_delay=1, severity="high", kind="anomaly_score", model_version="1.0.0", assets=frozenset(assets),
    )  # fmt: skip


def _score(i: int) -> float:
    """pump01: normal, an excursion over minutes 2-3 that clears, and another from minute 8 still open."""
    base = 0.3 + 0.05 * np.sin(i / 7)
    return float(base + (0.7 if 120 <= i < 200 or i >= 480 else 0.0))


def _sample(i: int) -> str:
    """pump01's tags at second `i`, as the daemon records them; pressure is Bad for a while (null)."""
    values = {
        "temp": 60 + 10 * _score(i), "pressure": None if 200 <= i < 260 else 4.0 + 0.1 * np.cos(i / 9),
        "vibration": 2.0 * _score(i), "flow": 120.0 + (i % 30),
    }  # fmt: skip
    return json.dumps(values, separators=(",", ":"))


async def _record(path: Path) -> None:
    """Ten minutes of one-second windows and samples for pump01 and pump02, through the engine into the store."""
    store = Store(path)
    await store.start()
    engine = AlarmEngine([_rule("hi", {"pump01"}), _rule("vib", {"pump02"}, high=0.5, low=0.5)], gateway_id="gw")
    published: list[str] = []
    for i in range(MINUTES * 60):
        now = BASE_NS + i * S
        store.add_samples([(now, "pump01", _sample(i))])
        events = []
        for asset, value in (("pump01", _score(i)), ("pump02", 0.9 if 300 <= i < 330 else 0.1)):
            store.add_scores([(now, asset, "ae", "1.0.0", "score", value)])
            events += engine.decide("ae", asset, np.array([value]), source_ts_ns=now, now_ns=now)
        if i == 150:  # someone acknowledges pump01's first alarm while it is active
            events.append(engine.acknowledge(engine.states[("hi", "pump01")].alarm_id, by="alice", now_ns=now))
        await store.add_alarm_events([NewEvent(e, f"edge/{e.asset}/alarm", b"{}") for e in events])
        published += [e.event_id for e in events if i < 300]
    await store.mark_published(published)
    await store.stop()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gateway database with scores, alarm transitions and samples (shared: the tests only read it)."""
    path = tmp_path_factory.mktemp("history") / "gateway.db"
    asyncio.run(_record(path))
    return path


def _iso(minute: float) -> str:
    return (BASE + timedelta(minutes=minute)).isoformat()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- time arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", BASE),
        ("-2h", BASE - timedelta(hours=2)),
        ("30m", BASE - timedelta(minutes=30)),
        ("7d", BASE - timedelta(days=7)),
        ("1.5h", BASE - timedelta(minutes=90)),
        ("90s", BASE - timedelta(seconds=90)),
        ("-1w", BASE - timedelta(weeks=1)),
        ("2026-11-24T06:30Z", datetime(2026, 11, 24, 6, 30, tzinfo=timezone.utc)),
        ("2026-11-24T06:30:15.250+01:00", datetime(2026, 11, 24, 5, 30, 15, 250_000, tzinfo=timezone.utc)),
        ("2026-11-24", datetime(2026, 11, 24).astimezone()),  # naive: local time
        ("2026-11-24T06:30", datetime(2026, 11, 24, 6, 30).astimezone()),
        ("2026-11-24 06:30:00", datetime(2026, 11, 24, 6, 30).astimezone()),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    got = parse_time(text, now=BASE)
    assert got.tzinfo is not None
    assert got == expected


@pytest.mark.parametrize("text", ["yesterday", "-2x", "", "2h ago", "+2h", "2026-13-01"])
def test_parse_time_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="use ISO 8601"):
        parse_time(text, now=BASE)
    with pytest.raises(argparse.ArgumentTypeError, match="relative to now"):
        time_arg(text)


def test_time_arg_gives_epoch_nanoseconds() -> None:
    assert time_arg("2026-11-25T08:00:00.000001Z") == 1_795_593_600_000_001_000


# ---- alarms and events -------------------------------------------------------------------------


def test_alarms_table_lists_occurrences_and_filters(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "alarms", "--db", str(recorded))
    assert code == 0
    header, rule, *rows = out.splitlines()
    assert header.split()[:5] == ["ALARM", "ASSET", "RULE", "SEVERITY", "STATE"]
    assert set(rule) == {"-", " "}
    # pump01: one acknowledged and cleared (normal), one still unacknowledged; pump02: returned, unacknowledged.
    assert [r.split()[1:5] for r in rows] == [
        ["pump01", "hi", "high", "normal"],
        ["pump02", "vib", "high", "rtn_unack"],
        ["pump01", "hi", "high", "unack"],
    ]
    assert "alice" in rows[0] and format_ns(BASE_NS + 150 * S) in rows[0]
    assert format_ns(BASE_NS + 120 * S) in rows[0] and format_ns(BASE_NS + 200 * S) in rows[0]

    code, out, _ = _run(capsys, "alarms", "--db", str(recorded), "--state", "open", "--asset", "pump01")
    assert code == 0
    assert [r.split()[1:5] for r in out.splitlines()[2:]] == [["pump01", "hi", "high", "unack"]]

    code, out, err = _run(capsys, "alarms", "--db", str(recorded), "--since", _iso(9))
    assert code == 0 and "no alarms match" in err and out == ""


def test_alarms_json_has_every_field(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "alarms", "--db", str(recorded), "--json", "--state", "normal")
    assert code == 0
    (alarm,) = json.loads(out)
    assert alarm["asset"] == "pump01" and alarm["state"] == "normal"
    assert len(alarm["alarm_id"]) == 36  # the full id, not the table's short form
    assert alarm["raised_at_ns"] == BASE_NS + 120 * S
    assert datetime.fromisoformat(alarm["raised_at"]) == BASE + timedelta(seconds=120)
    assert alarm["acked_by"] == "operator:alice" and alarm["raised_threshold"] == 0.8


def test_events_table_filters_and_published_column(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "events", "--db", str(recorded), "--asset", "pump01")
    assert code == 0
    rows = [r.split() for r in out.splitlines()[2:]]
    # Columns after the two-part local time: asset, rule, event, state, seq, cause, value, threshold, published.
    assert [r[4:8] + r[-1:] for r in rows] == [
        ["raised", "unack", "1", "process", "yes"],
        ["acknowledged", "acked", "2", "operator:alice", "yes"],
        ["cleared", "normal", "3", "process", "yes"],
        ["raised", "unack", "1", "process", "no"],  # after the broker went away in this recording
    ]
    assert [r[-2] for r in rows] == ["0.8", "0.8", "0.6", "0.8"]

    code, out, _ = _run(
        capsys, "events", "--db", str(recorded), "--rule", "hi", "--since", _iso(2.6), "--until", _iso(5), "--json"
    )
    assert code == 0
    (event,) = json.loads(out)
    assert event["event"] == "cleared" and event["decided_at_ns"] == BASE_NS + 200 * S
    assert "payload" not in event and event["topic"] == "edge/pump01/alarm"

    code, out, _ = _run(capsys, "events", "--db", str(recorded), "--limit", "2")
    assert [r.split()[4] for r in out.splitlines()[2:]] == ["cleared", "raised"]  # the newest two, oldest first


def test_history_reads_the_database_the_config_names(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Relative to the config's folder, as the daemon resolves storage.path.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "g.db").symlink_to(recorded)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "sources": [{"name": "plc", "endpoint": "opc.tcp://127.0.0.1:4840"}],
        "assets": [{"name": n, "source": "plc", "window": {"length": 4, "hop": 1},
                    "tags": [{"name": "temp", "node_id": f"ns=2;s={n}.t"}]}
                   for n in ("pump01", "pump02", "pump03")],
        "models": [{"name": "ae", "path": "ae.onnx", "assets": ["pump01", "pump02", "pump03"]}],
        "alarms": [{"name": "hi", "model": "ae", "high": 0.9, "assets": ["pump01"]}],
        "storage": {"path": "data/g.db"},
    }))  # fmt: skip
    code, out, err = _run(capsys, "alarms", "--config", str(config), "--asset", "pump02")
    assert code == 0 and "vib" in out, err
    # A configured asset with no rows yet is not an error, only an empty answer.
    code, out, err = _run(capsys, "events", "--config", str(config), "--asset", "pump03")
    assert code == 0 and out == "" and "no alarm events match" in err
    code, _, err = _run(capsys, "events", "--config", str(config), "--asset", "pump04")
    assert code == 2 and err == "error: unknown asset 'pump04'; known assets: pump01, pump02, pump03\n"


def test_reading_a_stopped_gateways_file_leaves_no_trace(recorded: Path) -> None:
    conn = open_db(recorded)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM alarms")
    finally:
        conn.close()
    # A -wal or -shm owned by whoever ran the command could lock the daemon's user out.
    assert sorted(p.name for p in recorded.parent.iterdir()) == ["gateway.db"]


def test_reads_while_the_gateway_writes(tmp_path: Path) -> None:
    """A WAL reader beside the running store sees each commit and does not hold the writer up."""
    path = tmp_path / "live.db"

    def count_open() -> int:
        conn = open_db(path)
        try:
            return len(query_alarms(conn, state="open"))
        finally:
            conn.close()

    async def main() -> list[int]:
        store = Store(path)
        await store.start()
        engine = AlarmEngine([_rule("hi", {"pump01", "pump02"})], gateway_id="gw")
        seen = []
        for n, asset in enumerate(("pump01", "pump02")):
            events = engine.decide("ae", asset, np.array([0.9]), source_ts_ns=BASE_NS + n, now_ns=BASE_NS + n)
            await store.add_alarm_events([NewEvent(e, "t", b"{}") for e in events])
            seen.append(await asyncio.to_thread(count_open))
        await store.stop()
        return seen

    assert asyncio.run(main()) == [1, 2]


def test_bad_inputs_are_one_line_and_an_exit_code(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "alarms", "--db", str(tmp_path / "missing.db"))
    assert code == 3 and err == f"error: no database at {tmp_path / 'missing.db'}\n"
    code, _, err = _run(capsys, "events", "--db", str(recorded), "--asset", "pump9")
    assert code == 2 and err == "error: unknown asset 'pump9'; known assets: pump01, pump02\n"
    with pytest.raises(SystemExit) as exc:
        main(["events", "--db", str(recorded), "--since", "last tuesday"])
    assert exc.value.code == 2 and "invalid time 'last tuesday'" in capsys.readouterr().err


def test_cli_subprocess_no_traceback(recorded: Path, tmp_path: Path) -> None:
    """Through the module entry point, as a person runs it: tables in local time, errors as one line."""
    env = {**os.environ, "TZ": "UTC"}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True, env=env, timeout=60
        )

    ok = run("events", "--db", str(recorded), "--asset", "pump02")
    assert ok.returncode == 0, ok.stderr
    raised = (BASE + timedelta(minutes=5)).strftime("%Y-%m-%d %H:%M:%S+00:00").split()
    assert ok.stdout.splitlines()[2].split()[:5] == [*raised, "pump02", "vib", "raised"]
    not_db = tmp_path / "notes.db"
    not_db.write_text("these are not the tables you are looking for\n" * 100)
    bad = run("alarms", "--db", str(not_db))
    assert bad.returncode == 3
    assert bad.stderr.startswith(f"error: {not_db} is not a gateway database") and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1


# ---- plot ---------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize(("size", "dpi"), [((1600, 900), None), ((1003, 611), 96)])
def test_plot_writes_a_png_of_the_requested_size(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], size: tuple[int, int], dpi: int | None
) -> None:
    from matplotlib.image import imread

    out = tmp_path / "pump01.png"
    argv = ["plot", "--db", str(recorded), "--asset", "pump01", "--since", _iso(0), "--until", _iso(MINUTES), "-o", str(out)]
    if size != (1600, 900):
        argv += ["--width", str(size[0]), "--height", str(size[1]), "--dpi", str(dpi)]
    code, stdout, _ = _run(capsys, *argv)
    assert code == 0
    assert _png_size(out) == size
    pixels = imread(out)
    assert pixels.shape[:2] == (size[1], size[0])
    # Lines, threshold lines, shaded periods and text: far more than a blank canvas's few colours.
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 50
    assert "4 tag(s) from 600 sample(s), 1 score series, 2 alarm period(s)" in stdout


def test_plot_data_periods_and_thresholds(recorded: Path) -> None:
    conn = open_db(recorded)
    try:
        data = load_plot_data(conn, "pump01", BASE_NS + 60 * S, BASE_NS + 540 * S, tags=["vibration", "temp"])
        tuned = load_plot_data(
            conn, "pump01", BASE_NS, BASE_NS + 600 * S, configured={("ae", "score", "hi"): (0.9, 0.9)}
        )
    finally:
        conn.close()
    assert [s.name for s in data.tags] == ["vibration", "temp"]
    assert [s.name for s in data.scores] == ["ae score"]
    assert [(p.rule, p.start_ns, p.end_ns) for p in data.periods] == [
        ("hi", BASE_NS + 120 * S, BASE_NS + 200 * S),  # acknowledged in between: still one period
        ("hi", BASE_NS + 480 * S, BASE_NS + 540 * S),  # still open: up to the end of the range
    ]
    assert [(t.high, t.low) for t in data.thresholds["ae score"]] == [(0.8, 0.6)]
    assert [(t.high, t.low) for t in tuned.thresholds["ae score"]] == [(0.9, 0.9)]


def test_plot_without_data_in_range_says_so(recorded: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty.png"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "plot", "--db", str(recorded), "--asset", "pump01",
         "--since", "2020-01-01", "--until", "2020-01-02", "-o", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 3
    assert proc.stderr.startswith("error: no data for pump01 between ") and "Traceback" not in proc.stderr
    assert not out.exists()
