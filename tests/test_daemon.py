"""`edge-gateway run` as a real process: SIGTERM stops it cleanly, fast, with SQLite consistent."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gateway.demo.run import demo_config, simulator_process, write_config
from tests.conftest import free_port
from tests.fixtures_mqtt import Subscriber


def scores_in(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=1)) as conn:
            return int(conn.execute("select count(*) from scores").fetchone()[0])
    except sqlite3.OperationalError:  # table not created yet
        return 0


def _wait(pred: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """Poll a condition on the running daemon (a file it writes); fail at once if it exits."""
    deadline = time.monotonic() + 60
    while not pred():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{what}; log: {log.read_text()}"
        time.sleep(0.1)


def test_sighup_with_a_broken_file_is_refused_and_sigterm_exits_0_within_5_s_leaving_sqlite_consistent(
    tmp_path: Path, mosquitto  # type: ignore[no-untyped-def]
) -> None:
    opc_port = free_port()
    db = tmp_path / "gw.db"
    cfg = write_config(demo_config(opc_port=opc_port, mqtt_port=mosquitto.port, db_path=db), tmp_path / "c.yaml")
    log = tmp_path / "stderr.log"
    with simulator_process(opc_port, pumps=4), Subscriber(mosquitto.port, "edge/demo/demo-gw/status") as sub:
        with log.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", str(cfg)], stderr=err)
        try:
            # The pipeline is running end to end: windows inferred and stored.
            _wait(lambda: scores_in(db) > 0, proc, log, "gateway never stored a score")
            cfg.write_text(cfg.read_text().replace("assets:", "assets: [", 1))
            proc.send_signal(signal.SIGHUP)
            _wait(lambda: "reload refused" in log.read_text(), proc, log, "SIGHUP was not answered")
            before = scores_in(db)
            _wait(lambda: scores_in(db) > before, proc, log, "the gateway stopped working after the refused reload")
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr = log.read_text()
        assert rc == 0, stderr
        assert f"{cfg}:" in stderr.split("reload refused", 1)[1].splitlines()[0]  # the error names the file
        assert "Traceback" not in stderr and "did not stop" not in stderr
        assert "SIGTERM received" in stderr and "stopped" in stderr
        sub.wait_for(lambda msgs: any(json.loads(m.payload)["state"] == "offline" for m in msgs), timeout=10)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert conn.execute("select count(*) from scores").fetchone()[0] > 0
