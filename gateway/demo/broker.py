"""Launch a local mosquitto broker for the demo and the tests."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from gateway.errors import GatewayError

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 5.0
_STOP_TIMEOUT_S = 5.0


class BrokerError(GatewayError):
    """mosquitto is missing, would not start, or would not stop."""


def find_mosquitto() -> str | None:
    """The mosquitto executable on PATH or in /usr/sbin (Debian installs it there), or None."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mosquitto does: TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class MosquittoBroker:
    """A mosquitto process on 127.0.0.1:`port`, persisting into `workdir`.

    Without a workdir a temporary one is made at start and removed at stop; pass one to keep sessions
    and queued messages across a stop/start (SIGTERM saves them).
    """

    def __init__(self, port: int, *, workdir: Path | None = None, allow_anonymous: bool = True) -> None:
        self.port = port
        self.host = "127.0.0.1"
        self._allow_anonymous = allow_anonymous
        self._own_workdir = workdir is None
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MosquittoBroker:
        """Write the config, spawn mosquitto and return once its port accepts connections."""
        exe = find_mosquitto()
        if exe is None:
            raise BrokerError(
                "mosquitto not found on PATH or in /usr/sbin; install it (apt-get install mosquitto)"
            )
        if not _port_free(self.host, self.port):
            # Otherwise the readiness check would talk to whoever holds the port.
            raise BrokerError(f"port {self.host}:{self.port} is already in use")
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="mosquitto-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        conf = self._workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self._allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {self._workdir}/",
            "log_dest stderr",
        ]
        if os.geteuid() == 0:
            # As root mosquitto drops to user 'mosquitto', which cannot write the persistence dir.
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._log_path = self._workdir / "mosquitto.log"
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        self._wait_accepting()
        logger.info("mosquitto listening on %s:%d (pid %d)", self.host, self.port, self._proc.pid)
        return self

    def _wait_accepting(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                message = f"mosquitto exited with {self._proc.returncode} at start: {self.log_tail()}"
                self.stop()
                raise BrokerError(message)
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto did not accept on port {self.port} within {_START_TIMEOUT_S} s")
            time.sleep(0.01)  # bounded poll: mosquitto has no readiness notification

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of mosquitto's log, joined into one line."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        text = self._log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM mosquitto (it saves its sessions) and wait; SIGKILL if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("mosquitto (pid %d) ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT_S)
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
