"""`edge-gateway bench --delivery`: alarm events through the SQLite outbox and MQTT to a subscriber.

The path is the gateway's own (gateway.app._emit and the outbox task): `Store.add_alarm_events`
commits the transitions of one inference call together, the outbox is woken, `drain_outbox`
publishes with `MqttPublisher` (up to OUTBOX_WINDOW awaiting their PUBACK) and marks events once
their PUBACKs are in. The broker is a real mosquitto; a QoS 1 subscriber with a persistent session,
in its own process, counts distinct payloads. Three figures:

- sustained rate: `events` events stored in bursts of `burst` (one inference call in which every
  one of the ASSETS assets changes state), each burst awaited before the next as the gateway's
  inference task does, while the outbox drains; events / (first store -> the subscriber holding
  the last one);
- backlog recovery: the broker stopped (SIGTERM, sessions saved), `backlog` events stored, the broker
  started again on the same port; seconds from it accepting connections until the subscriber holds
  every one, split into the publisher's reconnect and the drain;
- outbox bytes per event: SQLite's dbstat pages of alarm_events and its indexes over its rows, after
  every event is marked published and the WAL is checkpointed; also the file's size per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.alarms import AlarmEvent, EventType
from gateway.config import MqttConfig
from gateway.demo.broker import MosquittoBroker, find_mosquitto
from gateway.demo.run import free_port
from gateway.errors import GatewayError
from gateway.sinks.mqtt import MqttPublisher, drain_outbox
from gateway.sinks.payloads import alarm_payload, alarm_topic
from gateway.store import NewEvent, Store

logger = logging.getLogger(__name__)

GATEWAY_ID = "bench-gw"
SITE = "bench"
ASSETS = 16
# Transitions stored per commit: one inference call over every asset, each changing state.
BURST = ASSETS
CONNECT_TIMEOUT_S = 10.0
# Generous bounds: the figures are reported, not judged; these only stop a broken run.
DELIVERY_TIMEOUT_S = 300.0
# mosquitto queues at most 1000 QoS 1 messages per client by default and drops the rest; the
# subscriber is the measuring instrument and must see every event.
_BROKER_CONFIG = ["max_queued_messages 0"]


def bench_event(n: int, *, now_ns: int) -> AlarmEvent:
    """Transition `n`: even n raise alarm n // 2, odd n clear it; assets take turns."""
    event: EventType = "raised" if n % 2 == 0 else "cleared"
    alarm_id = f"bench-{n // 2:08d}"
    return AlarmEvent(
        alarm_id=alarm_id, event_id=f"{alarm_id}:{event}", event=event, gateway_id=GATEWAY_ID,
        asset=f"pump{(n // 2) % ASSETS + 1:02d}", rule="bearing_anomaly", kind="anomaly_score",
        output="score", severity="high", value=0.42, threshold=0.25, model="pump_ae", model_version="1.0.0",
        first_abnormal_source_ts_ns=now_ns, decided_at_ns=now_ns,
    )  # fmt: skip


class DeliveryCounter:
    """A persistent-session QoS 1 subscriber that notes when each distinct alarm payload first arrived."""

    def __init__(self, port: int, topic: str) -> None:
        self._port = port
        self._topic = topic
        self._cond = threading.Condition()
        self._seen: set[bytes] = set()
        self._arrivals: list[float] = []  # time.monotonic() of the k-th distinct payload
        self._subscribed = threading.Event()
        self._client: mqtt.Client | None = None

    def connect(self) -> None:
        """Connect (resuming the session the broker kept) and return once subscribed."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-scada", protocol=mqtt.MQTTv5)
        client.on_connect = lambda c, *_: c.subscribe(self._topic, qos=1)
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # queued for us while we are away
        self._subscribed.clear()
        client.connect("127.0.0.1", self._port, keepalive=30, clean_start=False, properties=props)
        client.loop_start()
        self._client = client
        if not self._subscribed.wait(CONNECT_TIMEOUT_S):
            self.disconnect()
            raise GatewayError(f"bench subscriber got no SUBACK within {CONNECT_TIMEOUT_S} s")

    def disconnect(self) -> None:
        """Disconnect; the broker keeps the session and queues what arrives meanwhile."""
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def wait(self, total: int, timeout: float) -> float | None:
        """When the `total`-th distinct payload arrived (time.monotonic), waiting up to `timeout`; None if not."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._arrivals) >= total, timeout):
                return None
            return self._arrivals[total - 1]

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        with self._cond:
            if payload not in self._seen:
                self._seen.add(payload)
                self._arrivals.append(time.monotonic())
                self._cond.notify_all()


def serve_counter(port: int, topic: str) -> None:
    """The subscriber process: one command per stdin line (connect, disconnect, wait N), one reply line."""
    counter = DeliveryCounter(port, topic)
    try:
        for line in sys.stdin:
            cmd, *arg = line.split()
            if cmd == "connect":
                counter.connect()
                print("ok", flush=True)
            elif cmd == "disconnect":
                counter.disconnect()
                print("ok", flush=True)
            elif cmd == "wait":
                print(counter.wait(int(arg[0]), DELIVERY_TIMEOUT_S), flush=True)
    finally:
        counter.disconnect()


class CounterProcess:
    """The DeliveryCounter in its own process, as SCADA would be: it must not take the gateway's GIL."""

    def __init__(self, port: int, topic: str) -> None:
        cmd = [sys.executable, "-m", __name__, str(port), topic]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def request(self, command: str) -> str:
        """Send one command and return the reply line (off the loop: the reply may take a while)."""
        return await asyncio.to_thread(self._request, command)

    def _request(self, command: str) -> str:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline().strip()
        if not reply:
            raise GatewayError(f"bench subscriber exited ({self._proc.wait()}) on {command!r}")
        return reply

    async def arrived(self, total: int, what: str) -> float:
        """When the subscriber held `total` distinct events; GatewayError if not within the bound."""
        reply = await self.request(f"wait {total}")
        if reply == "None":
            raise GatewayError(f"{what}: not all of {total} events arrived in {DELIVERY_TIMEOUT_S:.0f} s")
        return float(reply)

    def close(self) -> None:
        """End the subscriber process (closing its stdin ends its command loop)."""
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        try:
            self._proc.wait(timeout=CONNECT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


async def _store_events(
    store: Store, cfg: MqttConfig, wake: asyncio.Event, first: int, n: int, burst: int
) -> None:
    """Store events first..first+n in bursts of `burst`, one commit each, awaited in turn (as the gateway)."""
    for start in range(first, first + n, burst):
        now_ns = time.time_ns()
        burst_events = [bench_event(i, now_ns=now_ns) for i in range(start, min(start + burst, first + n))]
        await store.add_alarm_events(
            [
                NewEvent(e, alarm_topic(cfg, gateway_id=GATEWAY_ID, event=e), alarm_payload(e, site=SITE))
                for e in burst_events
            ]
        )
        wake.set()


async def _wait_all_marked(store: Store) -> None:
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while await store.pending(1):
        if time.monotonic() > deadline:
            raise GatewayError("outbox still holds unmarked events after delivery")
        await asyncio.sleep(0.05)  # bounded poll: the store has no "outbox empty" notification


def outbox_bytes(db_path: Path) -> dict[str, Any]:
    """Bytes per alarm event in the outbox (dbstat pages of alarm_events and its indexes) and the file."""
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        rows = conn.execute("SELECT count(*), avg(length(payload)) FROM alarm_events").fetchone()
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'alarm_events'")]
        marks = ", ".join("?" * len(names))
        pages = conn.execute(f"SELECT sum(pgsize) FROM dbstat WHERE name IN ({marks})", names).fetchone()[0]
    n = max(1, rows[0])
    return {
        "outbox_bytes_per_event": round(pages / n),
        "payload_bytes_per_event": round(rows[1] or 0),
        "file_bytes_per_event": round(db_path.stat().st_size / n),
    }


async def measure_delivery(
    *, events: int, backlog: int, workdir: Path, broker_down_s: float = 0.0, burst: int = BURST
) -> dict[str, Any]:
    """Run the three measurements against a fresh broker and database in `workdir`."""
    port = free_port()
    cfg = MqttConfig(host="127.0.0.1", port=port, site=SITE, topic_prefix="edge")
    db_path = workdir / "delivery.db"
    broker = MosquittoBroker(port, workdir=workdir / "mosquitto", extra_config=_BROKER_CONFIG)
    store = Store(db_path)
    publisher = MqttPublisher(cfg, gateway_id=GATEWAY_ID, version="bench", started_at="bench")
    wake = asyncio.Event()
    me = psutil.Process()
    await asyncio.to_thread(broker.start)
    counter = CounterProcess(port, f"edge/{SITE}/+/alarm")
    outbox: asyncio.Task[None] | None = None
    try:
        await counter.request("connect")
        await store.start()
        await publisher.start()
        try:
            if not await publisher.wait_connected(CONNECT_TIMEOUT_S):
                raise GatewayError(f"publisher did not connect to {broker.host}:{port}")
            outbox = asyncio.ensure_future(drain_outbox(store, publisher, wake))
            cpu0, t0 = sum(me.cpu_times()[:2]), time.monotonic()
            await _store_events(store, cfg, wake, 0, events, burst)
            stored_at = time.monotonic()
            received_at = await counter.arrived(events, "sustained run")
            cpu = sum(me.cpu_times()[:2]) - cpu0

            await counter.request("disconnect")
            await asyncio.to_thread(broker.stop)
            down_at = time.monotonic()
            await _store_events(store, cfg, wake, events, backlog, burst)
            backlog_stored_s = time.monotonic() - down_at
            # A longer outage shows the publisher's reconnect backoff in the figure.
            await asyncio.sleep(max(0.0, down_at + broker_down_s - time.monotonic()))
            await asyncio.to_thread(broker.start)
            back_at = time.monotonic()
            await counter.request("connect")
            await publisher.wait_connected(DELIVERY_TIMEOUT_S)
            reconnected_at = time.monotonic()
            backlog_at = await counter.arrived(events + backlog, "backlog")
            await _wait_all_marked(store)
        finally:
            if outbox is not None:
                outbox.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await outbox
            await publisher.stop()
            await store.stop()  # the last connection's close checkpoints the WAL into the file
    finally:
        await asyncio.to_thread(counter.close)
        await asyncio.to_thread(broker.stop)
    elapsed = received_at - t0
    return {
        "events": events,
        "burst": burst,
        "events_per_s": round(events / elapsed, 1),
        "stored_per_s": round(events / (stored_at - t0), 1),
        "sustained_s": round(elapsed, 3),
        "cpu_percent": round(100 * cpu / elapsed, 1),
        "backlog": backlog,
        "broker_down_s": round(back_at - down_at, 3),
        "backlog_stored_s": round(backlog_stored_s, 3),
        "backlog_reconnect_s": round(reconnected_at - back_at, 3),
        "backlog_delivered_s": round(backlog_at - back_at, 3),
        **outbox_bytes(db_path),
        "machine": f"{platform.machine()} {psutil.cpu_count()} cpu, Python {platform.python_version()}",
    }


def render_delivery(r: dict[str, Any]) -> str:
    """The figures as a short human-readable block."""
    return "\n".join(
        [
            f"edge-gateway bench --delivery on {r['machine']}: SQLite outbox -> mosquitto -> QoS 1 subscriber",
            f"  sustained               {r['events_per_s']:>10,.0f} events/s   ({r['events']:,} events in "
            f"{r['sustained_s']:.2f} s; stored at {r['stored_per_s']:,.0f}/s, {r['burst']} per commit "
            f"as one inference call's; CPU {r['cpu_percent']:.0f}%)",
            f"  backlog after restart   {r['backlog_delivered_s']:>10.2f} s        ({r['backlog']:,} events; "
            f"publisher reconnected after {r['backlog_reconnect_s']:.2f} s; broker down {r['broker_down_s']:.2f} s)",
            f"  outbox bytes per event  {r['outbox_bytes_per_event']:>10,}          (alarm_events + indexes, dbstat; "
            f"payload {r['payload_bytes_per_event']} B; file {r['file_bytes_per_event']} B/event)",
        ]
    )


async def run_delivery_bench(*, events: int, backlog: int, as_json: bool, broker_down_s: float = 0.0) -> int:
    """CLI entry: run the delivery measurements and print them."""
    if find_mosquitto() is None:
        raise GatewayError("the delivery benchmark needs the mosquitto broker: apt-get install mosquitto")
    if events < 1 or backlog < 1:
        raise GatewayError("--events and --backlog must be at least 1")
    # The outbox warns while the broker is down on purpose; that is the scenario, not news.
    logging.getLogger("gateway").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="edge-gateway-bench-delivery-") as wd:
        result = await measure_delivery(
            events=events, backlog=backlog, workdir=Path(wd), broker_down_s=broker_down_s
        )
    print(json.dumps(result) if as_json else render_delivery(result))
    return 0


if __name__ == "__main__":
    serve_counter(int(sys.argv[1]), sys.argv[2])
