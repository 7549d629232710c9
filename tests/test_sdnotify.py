"""sd_notify against a real datagram socket: READY=1 after start, WATCHDOG=1 while progressing, none while
a model hangs, STOPPING=1 at SIGTERM; and the progress judge on its own."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from gateway.config import load_config
from gateway.demo.run import demo_config, simulator_process, write_config
from gateway.sdnotify import Notifier
from gateway.service import Service
from gateway.watchdog import Progress, ProgressJudge, ServiceNotifier
from tests.conftest import free_port
from tests.fixtures_opcua import STILL, running_simulator

Message = dict[str, str]


def parse(datagram: bytes) -> Message:
    """One notify datagram as {KEY: value}."""
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """systemd's side: a datagram socket bound in tmp_path, and its path for NOTIFY_SOCKET."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        yield sock, path


def receive_until(sock: socket.socket, pred: Callable[[Message], bool], timeout: float) -> list[Message]:
    """Every message up to and including the first that satisfies `pred`; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    seen: list[Message] = []
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            seen.append(parse(sock.recv(4096)))
        except TimeoutError:
            raise AssertionError(f"no matching notify message within {timeout} s; got {seen}") from None
        if pred(seen[-1]):
            return seen


async def next_message(
    sock: socket.socket, pred: Callable[[Message], bool], timeout: float = 20.0
) -> list[Message]:
    """receive_until for a non-blocking socket, on the running loop."""
    loop = asyncio.get_running_loop()
    seen: list[Message] = []
    deadline = loop.time() + timeout
    while True:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), max(0.01, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise AssertionError(f"no matching notify message within {timeout} s; got {seen}") from None
        seen.append(parse(data))
        if pred(seen[-1]):
            return seen


# --- the protocol -------------------------------------------------------------------------------


def test_each_call_sends_one_datagram_with_its_assignments(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("running: 1 of 1\nPLC(s)")
    assert notifier.status("a line")
    assert notifier.watchdog()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.stopping()
    received = [parse(sock.recv(4096)) for _ in range(5)]
    # The newline in the status would have ended STATUS= early: it became a space.
    assert received[0] == {"READY": "1", "STATUS": "running: 1 of 1 PLC(s)"}
    assert received[1] == {"STATUS": "a line"}
    assert received[2] == {"WATCHDOG": "1"}
    assert received[3]["RELOADING"] == "1" and before <= int(received[3]["MONOTONIC_USEC"]) <= after
    assert received[4] == {"STOPPING": "1", "STATUS": "stopping"}


def test_a_leading_at_sign_names_an_abstract_socket() -> None:
    name = f"edge-gateway-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert parse(sock.recv(4096)) == {"WATCHDOG": "1"}


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x") and not notifier.watchdog() and not notifier.stopping()
    assert notifier.watchdog_interval() is None


def test_a_send_never_blocks_or_raises_and_the_failure_is_logged_once(
    notify_socket: tuple[socket.socket, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.sdnotify")
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")}).watchdog()
    _, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    # Nobody reads: the receiver's queue fills and a blocking send would hang here for ever.
    results = [notifier.watchdog() for _ in range(10_000)]
    assert results[0] and not results[-1]
    failures = [r for r in caplog.records if r.name == "gateway.sdnotify"]
    assert len(failures) == 2  # one per notifier, not one per failed send
    assert all("cannot notify systemd" in r.getMessage() for r in failures)


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [("30000000", None, 30.0), ("30000000", "own", 30.0), ("30000000", "other", None), ("0", None, None),
     ("x", None, None), (None, None, None)],
)  # fmt: skip
def test_watchdog_interval_is_for_this_process_only(
    usec: str | None, pid: str | None, expected: float | None
) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid() if pid == "own" else os.getpid() + 1)
    assert Notifier(env).watchdog_interval() == expected


# --- the progress judge -------------------------------------------------------------------------


def test_the_judge_wants_ticks_and_no_long_inference_call() -> None:
    judge = ProgressJudge(tick_limit_s=10.0, inference_limit_s=5.0, ticks=0, now=0.0)
    assert judge.check(Progress(ticks=1, inference_busy_s=None), now=1.0) is None
    assert judge.check(Progress(ticks=9, inference_busy_s=4.9), now=2.0) is None
    assert judge.check(Progress(ticks=9, inference_busy_s=None), now=11.0) is None  # 9 s without a tick
    stall = judge.check(Progress(ticks=9, inference_busy_s=None), now=12.5)
    assert stall is not None and stall.stage == "sampler" and str(stall) == "no sampler tick for 10 s"
    assert judge.check(Progress(ticks=10, inference_busy_s=None), now=13.0) is None  # ticking again
    stall = judge.check(Progress(ticks=11, inference_busy_s=6.2), now=14.0)
    assert (
        stall is not None
        and stall.stage == "inference"
        and str(stall) == "one inference call running for 6 s"
    )


def test_a_dead_plc_is_not_a_stall_while_its_first_read_may_still_come(tmp_path: Path) -> None:
    raw = demo_config(opc_port=free_port(), mqtt_port=free_port(), db_path=tmp_path / "gw.db")
    raw["sources"][0]["timeout_s"] = 20.0
    cfg = load_config(write_config(raw, tmp_path / "c.yaml"))
    judge = ProgressJudge.for_config(cfg, stall_s=5.0, ticks=0, now=0.0)
    assert judge.tick_limit_s == pytest.approx(20.0 + 2 / 10) and judge.inference_limit_s == 5.0
    assert judge.check(Progress(ticks=0, inference_busy_s=None), now=19.0) is None
    assert judge.check(Progress(ticks=0, inference_busy_s=None), now=21.0) is not None


# --- a real gateway -----------------------------------------------------------------------------


def test_edge_gateway_run_says_ready_after_connecting_pings_and_says_stopping(
    notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    """`edge-gateway run` as systemd starts it: NOTIFY_SOCKET and WATCHDOG_USEC in its environment."""
    sock, path = notify_socket
    opc_port = free_port()
    raw = demo_config(opc_port=opc_port, mqtt_port=free_port(), db_path=tmp_path / "gw.db", pumps=1)
    cfg = write_config(raw, tmp_path / "c.yaml")
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    with simulator_process(opc_port, pumps=1):
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", str(cfg)], env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            start = receive_until(sock, lambda m: "READY" in m, 60)
            pings = receive_until(sock, lambda m: "WATCHDOG" in m, 10)
            pings += receive_until(sock, lambda m: "WATCHDOG" in m, 10)
            proc.send_signal(signal.SIGTERM)
            stop = receive_until(sock, lambda m: "STOPPING" in m, 10)
            rc = proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stderr = proc.stderr.read() if proc.stderr else ""
            if proc.stderr:
                proc.stderr.close()
    assert rc == 0, stderr
    assert start[0] == {"STATUS": "starting: connecting to 1 PLC(s), loading 1 model(s)"}
    assert all("WATCHDOG" not in m for m in start)  # no pings before start-up is complete
    # READY=1 came once the PLC was connected and the store open (the outbox is counted).
    ready = start[-1]["STATUS"]
    assert ready.startswith("running: 1 of 1 PLC(s) connected,") and "outbox 0 waiting" in ready, ready
    assert any(m.get("STATUS", "").startswith("running: ") and "windows/s" in m["STATUS"] for m in pings)
    assert stop[-1] == {"STOPPING": "1", "STATUS": "stopping"}


class HangingBackend:
    """A real backend whose next run() blocks until released, as a model stuck in a driver would."""

    def __init__(self, backend, release: threading.Event) -> None:  # type: ignore[no-untyped-def]
        self.name = backend.name
        self._backend = backend
        self.entered = threading.Event()
        self.release = release

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Block (bounded, so a failed test cannot hang the run), then score as the real one does."""
        self.entered.set()
        self.release.wait(60)
        return dict(self._backend.run(batch))


def test_a_hung_inference_call_stops_the_pings_until_it_returns(
    notify_socket: tuple[socket.socket, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.watchdog")
    sock, path = notify_socket
    sock.setblocking(False)
    opc_port = free_port()
    raw = demo_config(opc_port=opc_port, mqtt_port=free_port(), db_path=tmp_path / "gw.db", pumps=1)
    # 50 Hz: the first window (32 samples) is due after 0.64 s rather than 3.2 s.
    raw["sources"][0]["poll_interval_ms"] = 20
    raw["assets"][0]["sample_rate_hz"] = 50
    cfg_path = write_config(raw, tmp_path / "c.yaml")
    cfg = load_config(cfg_path)
    release = threading.Event()

    async def scenario() -> int:
        notify = ServiceNotifier(Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}), cfg)
        service = Service(cfg_path, cfg, on_started=notify.started)
        async with running_simulator(opc_port, n_pumps=1, **STILL), notify.running():
            run = asyncio.ensure_future(service.run())
            try:
                await next_message(sock, lambda m: "READY" in m, 60)
                gateway = service.gateway
                assert gateway is not None and gateway.started.is_set()
                await next_message(sock, lambda m: "WATCHDOG" in m)

                model = gateway.models["pump_ae"]
                hanging = HangingBackend(model.backend, release)
                model.backend = hanging
                assert await asyncio.to_thread(hanging.entered.wait, 30)
                stalled = lambda m: m.get("STATUS", "").startswith("stalled: one inference call running")  # noqa: E731
                await next_message(sock, stalled)
                # Three more checks, each still stalled, and not one ping among them.
                after = []
                for _ in range(3):
                    after += await next_message(sock, stalled)
                assert all("WATCHDOG" not in m for m in after), after

                release.set()
                await next_message(sock, lambda m: "WATCHDOG" in m)
            finally:
                release.set()
                service.request_stop()
            return await run

    assert asyncio.run(scenario()) == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.watchdog"]
    assert len([m for m in logged if m.startswith("pipeline stalled: one inference call")]) == 1, logged
    assert any(m.startswith("pipeline progressing again") for m in logged), logged


def test_with_the_plc_down_it_still_pings_and_each_reload_ends_with_ready(
    notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    """A dead PLC is not a stalled gateway; a refused reload and an applied one both tell systemd it is over."""
    sock, path = notify_socket
    sock.setblocking(False)
    raw = demo_config(opc_port=free_port(), mqtt_port=free_port(), db_path=tmp_path / "gw.db", pumps=1)
    raw["sources"][0]["timeout_s"] = 0.5
    cfg_path = write_config(raw, tmp_path / "c.yaml")
    cfg = load_config(cfg_path)

    async def scenario() -> tuple[list[Message], list[Message], int]:
        notify = ServiceNotifier(Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}), cfg)
        service = Service(cfg_path, cfg, on_started=notify.started)
        async with notify.running():
            run = asyncio.ensure_future(service.run())
            try:
                start = await next_message(sock, lambda m: "READY" in m, 60)
                await next_message(sock, lambda m: "WATCHDOG" in m)
                await next_message(sock, lambda m: "WATCHDOG" in m)
                first = service.gateway

                cfg_path.write_text(cfg_path.read_text().replace("sources:", "sources: [", 1))
                notify.reloading()
                service.request_reload()
                refused = await next_message(sock, lambda m: "READY" in m, 60)
                assert service.gateway is first

                write_config(raw, cfg_path)
                notify.reloading()
                service.request_reload()
                await next_message(sock, lambda m: "READY" in m, 60)
                assert service.gateway is not first
            finally:
                service.request_stop()
            return start, refused, await run

    start, refused, code = asyncio.run(scenario())
    assert code == 0
    assert start[-1]["STATUS"].startswith("running: 0 of 1 PLC(s) connected,")
    reloading = [m for m in refused if "RELOADING" in m]
    assert len(reloading) == 1 and reloading[0]["MONOTONIC_USEC"].isdigit()
    assert "last reload refused" in refused[-1]["STATUS"]
