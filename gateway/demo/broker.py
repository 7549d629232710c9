"""Launch a local MQTT broker for the demo and the tests: mosquitto, or amqtt when mosquitto is missing."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import yaml

from gateway.errors import GatewayError

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 5.0
_STOP_TIMEOUT_S = 5.0
_INSTALL_HINT = "install it with pip install 'edge-gateway[demo]' or apt-get install mosquitto"

MqttProtocol = Literal["5", "3.1.1"]
_B = TypeVar("_B", bound="BrokerProcess")


class BrokerError(GatewayError):
    """The broker is missing, would not start, or would not stop."""


def find_mosquitto() -> str | None:
    """The mosquitto executable on PATH or in /usr/sbin (Debian installs it there), or None."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def amqtt_installed() -> bool:
    """True if the amqtt package (the embedded broker) can be imported; it is not imported here."""
    # find_spec locates a top-level package without importing it (nor its import-time warnings).
    return importlib.util.find_spec("amqtt") is not None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mosquitto does: TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class BrokerProcess:
    """A broker child process on 127.0.0.1:`port`, with its config and log in `workdir`.

    Lifecycle: `start()` spawns it and returns once its port accepts connections (BrokerError if it
    is missing, exits early or stays deaf); `stop()` SIGTERMs it, SIGKILL after a bound. Without a
    workdir a temporary one is made at start and removed at stop. Subclasses say how to spawn it.
    """

    name = "broker"
    start_timeout_s = _START_TIMEOUT_S

    def __init__(self, port: int, *, workdir: Path | None = None) -> None:
        self.port = port
        self.host = "127.0.0.1"
        self._own_workdir = workdir is None
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker process id while it runs (the benchmark reports its CPU use)."""
        return self._proc.pid if self._proc is not None else None

    def _check_available(self) -> None:
        """Raise BrokerError (one line, with the install hint) if the broker is not installed."""
        raise NotImplementedError

    def _command(self, workdir: Path) -> list[str]:
        """Write the broker's config into `workdir` and return the command line that runs it."""
        raise NotImplementedError

    def start(self: _B) -> _B:
        """Write the config, spawn the broker and return once its port accepts connections."""
        self._check_available()
        if not _port_free(self.host, self.port):
            # Otherwise the readiness check would talk to whoever holds the port.
            raise BrokerError(f"port {self.host}:{self.port} is already in use")
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        cmd = self._command(self._workdir)
        self._log_path = self._workdir / f"{self.name}.log"
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self._wait_accepting()
        logger.info("%s listening on %s:%d (pid %d)", self.name, self.host, self.port, self._proc.pid)
        return self

    def _wait_accepting(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                message = f"{self.name} exited with {self._proc.returncode} at start: {self.log_tail()}"
                self.stop()
                raise BrokerError(message)
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                message = (
                    f"{self.name} did not accept on port {self.port} within {self.start_timeout_s} s: "
                    f"{self.log_tail()}"
                )
                self.stop()
                raise BrokerError(message)
            time.sleep(0.01)  # bounded poll: neither broker has a readiness notification

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the broker's log, joined into one line."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        text = self._log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM the broker and wait; SIGKILL if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, proc.pid)
                proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT_S)
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self: _B) -> _B:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class MosquittoBroker(BrokerProcess):
    """A mosquitto process on 127.0.0.1:`port`, persisting into `workdir`.

    Pass a workdir to keep sessions and queued messages across a stop/start (SIGTERM saves them).
    """

    name = "mosquitto"

    def __init__(
        self,
        port: int,
        *,
        workdir: Path | None = None,
        allow_anonymous: bool = True,
        extra_config: Sequence[str] = (),
    ) -> None:
        super().__init__(port, workdir=workdir)
        self._allow_anonymous = allow_anonymous
        # Appended after the listener line, so per-listener options (cafile, certfile, ...) apply to it.
        self._extra_config = list(extra_config)

    def _check_available(self) -> None:
        if find_mosquitto() is None:
            raise BrokerError(
                "mosquitto not found on PATH or in /usr/sbin; install it (apt-get install mosquitto)"
            )

    def _command(self, workdir: Path) -> list[str]:
        exe = find_mosquitto()
        assert exe is not None  # checked by _check_available
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self._allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {workdir}/",
            "log_dest stderr",
            # Without it the broker's small PUBACKs wait out Nagle + delayed ACK (~40 ms) in bursts.
            "set_tcp_nodelay true",
        ]
        if os.geteuid() == 0:
            # As root mosquitto drops to user 'mosquitto', which cannot write the persistence dir.
            lines.append("user root")
        lines += self._extra_config
        conf = workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return [exe, "-c", str(conf)]


class EmbeddedBroker(BrokerProcess):
    """The pure-Python amqtt broker (MQTT 3.1.1 only) on 127.0.0.1:`port`, anonymous, in memory.

    It runs in its own process (`python -m gateway.demo.broker CONFIG`, see `serve_amqtt`) so it shares
    neither the gateway's event loop nor its GIL. Nothing persists: a restart loses retained messages.
    """

    name = "amqtt"
    # Importing amqtt takes ~0.2 s here; leave room for a small, busy device.
    start_timeout_s = 10.0

    def _check_available(self) -> None:
        if not amqtt_installed():
            raise BrokerError(f"the embedded MQTT broker needs the amqtt package: {_INSTALL_HINT}")

    def _command(self, workdir: Path) -> list[str]:
        # Only anonymous auth: amqtt's default config adds a 0.0.0.0 listener, $SYS topics and packet logging.
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        conf = workdir / "amqtt.yaml"
        conf.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        # Not amqtt's own CLI: it keeps running, deaf, when its listener cannot bind.
        return [sys.executable, "-m", __name__, str(conf)]


def choose_demo_broker(port: int, workdir: Path) -> tuple[BrokerProcess, MqttProtocol]:
    """mosquitto (MQTT 5) when it is installed, else the embedded amqtt broker (MQTT 3.1.1); not started."""
    if find_mosquitto() is not None:
        return MosquittoBroker(port, workdir=workdir / "mosquitto"), "5"
    return EmbeddedBroker(port, workdir=workdir / "amqtt"), "3.1.1"


async def serve_amqtt(config: dict[str, Any]) -> None:
    """Run an amqtt broker with `config` until SIGTERM/SIGINT; amqtt's BrokerError if it cannot listen."""
    from amqtt.broker import Broker  # only in the broker's own process: the gateway never imports amqtt

    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def _amqtt_main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)  # one line per session state change
    config = yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8"))
    from amqtt.errors import BrokerError as AmqttBrokerError

    try:
        asyncio.run(serve_amqtt(config))
    except AmqttBrokerError as exc:
        # The parent shows the log's last lines: keep the reason on the last one.
        print(f"amqtt could not start: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_amqtt_main(sys.argv[1:]))
