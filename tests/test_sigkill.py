"""SIGKILL the real gateway process 20 times while alarms flow: nothing stored is lost or raised twice.

The gateway runs as `python -m gateway run CONFIG` against the simulated PLC (its own process) and
mosquitto. Its alarm rule puts the threshold at the healthy pumps' median anomaly score with no
hysteresis and no on-delay, so the score's noise raises and clears alarms several times a second on
every pump. Each kill lands a seeded random time after the gateway announced itself online: during
start-up, inference, a store commit or the outbox drain. A persistent QoS 1 subscriber collects
every alarm message across all runs; a last run is stopped cleanly, then the SQLite outbox and what
arrived are compared.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.demo.broker import MosquittoBroker
from gateway.demo.run import demo_config, simulator_process, write_config
from gateway.sinks.payloads import status_topic
from tests.conftest import free_port
from tests.fixtures_mqtt import Received, Subscriber

KILLS = 20
SEED = 5
RATE_HZ = 50.0  # windows of 32 samples fill in 0.64 s, so alarms start soon after each restart
# The median anomaly score of the simulator's healthy pumps at 50 Hz (0.064 at p5, 0.138 at p95).
THRESHOLD = 0.096
KILL_AFTER_S = (0.2, 3.0)  # random kill point, measured from the gateway's online status
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


def _config(tmp_path: Path, *, opc_port: int, mqtt_port: int) -> Path:
    cfg = demo_config(opc_port=opc_port, mqtt_port=mqtt_port, db_path=tmp_path / "gw.db")
    cfg["sources"][0]["poll_interval_ms"] = round(1000 / RATE_HZ)
    for asset in cfg["assets"]:
        asset["sample_rate_hz"] = RATE_HZ
    cfg["alarms"][0].update(high=THRESHOLD, low=THRESHOLD, on_delay=1)
    cfg["mqtt"]["publish_scores"] = False
    cfg["storage"]["store_scores"] = False
    return write_config(cfg, tmp_path / "gateway.yaml")


def _online_starts(messages: list[Received], topic: str) -> set[str]:
    """The started_at of every gateway run that announced itself online."""
    return {
        status["started_at"]
        for m in messages
        if m.topic == topic and (status := json.loads(m.payload))["state"] == "online"
    }


@contextlib.contextmanager
def _gateway(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The gateway as a child process; killed on exit if the test left it running."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--log-level", "info", "run", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def _wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `pred` until it holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.05)


def _event_ids(messages: list[Received]) -> set[str]:
    return {json.loads(m.payload)["event_id"] for m in messages if m.topic.endswith("/alarm")}


def _stored_events(db: Path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT seq, event_id, alarm_id, event, event_seq, asset, rule, payload, published_at_ns "
            "FROM alarm_events ORDER BY seq"
        ).fetchall()
        return [dict(r) for r in rows]


@pytest.mark.timeout(600)
def test_sigkill_20_times_loses_no_alarm_and_raises_none_twice(tmp_path: Path) -> None:
    mosquitto = tmp_path / "mosquitto"
    opc_port, mqtt_port = free_port(), free_port()
    config = _config(tmp_path, opc_port=opc_port, mqtt_port=mqtt_port)
    cfg = load_config(config)
    db, log = cfg.storage.path, tmp_path / "gateway.log"
    status = status_topic(cfg.mqtt, cfg.gateway.id)
    rng = random.Random(SEED)

    with (
        MosquittoBroker(mqtt_port, workdir=mosquitto),
        simulator_process(opc_port, pumps=4, rate_hz=RATE_HZ, extra=["--no-fault", "--no-bad-data"]),
        Subscriber(mqtt_port, "edge/demo/#", client_id="sigkill-scada", session_expiry_s=3600) as sub,
    ):
        for run in range(KILLS + 1):
            with _gateway(config, log) as proc:
                _wait_until(
                    lambda n=run + 1: (
                        len(_online_starts(sub.messages, status)) >= n or proc.poll() is not None
                    ),
                    START_TIMEOUT_S,
                    f"online status of run {run}",
                )
                assert proc.poll() is None, f"gateway exited with {proc.returncode}: see {log}"
                if run < KILLS:
                    # The random kill point; waiting here is the point of the test, not synchronisation.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=rng.uniform(*KILL_AFTER_S))
                    assert proc.poll() is None, f"gateway exited with {proc.returncode}: see {log}"
                    proc.send_signal(signal.SIGKILL)
                    assert proc.wait(timeout=STOP_TIMEOUT_S) == -signal.SIGKILL
                    continue
                # The last run delivers what the killed ones left in the outbox, then stops cleanly.
                _wait_until(
                    lambda: _event_ids(sub.messages) >= {e["event_id"] for e in _stored_events(db)},
                    START_TIMEOUT_S,
                    "every stored event received",
                )
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, f"see {log}"
        events = _stored_events(db)
        stored_ids = {e["event_id"] for e in events}
        # Events decided while the last run stopped were published in its final drain.
        _wait_until(lambda: _event_ids(sub.messages) >= stored_ids, STOP_TIMEOUT_S, "the final drain")
        received = [m for m in sub.messages if m.topic.endswith("/alarm")]
        assert len(_online_starts(sub.messages, status)) == KILLS + 1

    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    # Alarms flowed in most runs, and some were active at a kill and restored by the next start.
    assert len(events) >= 4 * KILLS
    assert "restored" in log.read_text(encoding="utf-8")

    # At least once: every stored event arrived, and nothing arrived that the outbox did not hold.
    by_id: dict[str, set[bytes]] = defaultdict(set)
    for m in received:
        by_id[json.loads(m.payload)["event_id"]].add(m.payload)
    assert set(by_id) == stored_ids
    # A duplicate is the same stored message sent again: byte for byte the outbox's payload.
    payloads = {e["event_id"]: bytes(e["payload"]) for e in events}
    assert {eid: sent for eid, sent in by_id.items() if sent != {payloads[eid]}} == {}
    assert all(e["published_at_ns"] is not None for e in events)

    # Never raised twice: per (asset, rule), across all restarts, raises and clears alternate and
    # each clear belongs to the occurrence its raise activated. Nobody acknowledges here, so an
    # occurrence that returned to normal is activated again under its id; its transitions are
    # numbered without gaps or repeats, so a restart never re-decides one.
    open_alarm: dict[tuple[str, str], str | None] = {}
    seqs: dict[str, list[int]] = defaultdict(list)
    raises = 0
    for e in events:
        seqs[e["alarm_id"]].append(e["event_seq"])
        key = (e["asset"], e["rule"])
        if e["event"] == "raised":
            assert open_alarm.get(key) is None, f"{key} raised again while {open_alarm[key]} is active: {e}"
            open_alarm[key] = e["alarm_id"]
            raises += 1
        elif e["event"] == "cleared":
            assert open_alarm.get(key) == e["alarm_id"], f"{key} cleared an alarm that was not active: {e}"
            open_alarm[key] = None
    assert {aid: s for aid, s in seqs.items() if s != list(range(1, len(s) + 1))} == {}
    assert raises >= KILLS
