"""MQTT test fixtures (mosquitto on a free loopback port), a collecting subscriber, shared helpers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.alarms import AlarmEvent, EventType
from gateway.config import MqttConfig
from gateway.demo.broker import EmbeddedBroker, MosquittoBroker, MqttProtocol, amqtt_installed, find_mosquitto
from gateway.sinks.mqtt import MqttPublisher, drain_outbox
from gateway.store import Store
from tests.conftest import free_port


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running mosquitto on a free loopback port, stopped at teardown."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with MosquittoBroker(free_port(), workdir=tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A running embedded (amqtt) broker on a free loopback port, stopped at teardown."""
    if not amqtt_installed():
        pytest.skip("amqtt is not installed (pip install 'edge-gateway[demo]')")
    with EmbeddedBroker(free_port(), workdir=tmp_path / "amqtt") as broker:
        yield broker


def make_event(
    n: int, event: EventType = "raised", *, asset: str = "pump01", value: float = 2.5
) -> AlarmEvent:
    """Alarm occurrence `n`'s raise (transition 1) or clear (2, nobody acknowledged), with recognisable values."""
    alarm_id = f"gw01-{asset}-hi-{n}"
    seq = 1 if event == "raised" else 2
    return AlarmEvent(
        alarm_id=alarm_id, event_id=f"{alarm_id}:{seq}", event=event, gateway_id="gw01", asset=asset,
        rule="hi", kind="anomaly_score", output="score", severity="high", value=value, threshold=1.0,
        model="ae", model_version="1.2.0", first_abnormal_source_ts_ns=1_700_000_000_123_456_789 + n,
        decided_at_ns=1_700_000_001_000_000_000 + n, state="unack" if event == "raised" else "rtn_unack", seq=seq,
    )  # fmt: skip


@dataclass(frozen=True)
class Received:
    """One message a Subscriber saw."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    # MQTT 5 properties a test may check (None when absent or on 3.1.1).
    correlation_data: bytes | None = None
    message_expiry_s: int | None = None


class Subscriber:
    """A real paho client that subscribes to `topic` and collects messages (thread-safe); it logs in
    as `username` when given (a broker with a password file and an ACL)."""

    def __init__(
        self,
        port: int,
        topic: str = "#",
        *,
        qos: int = 1,
        client_id: str = "",
        session_expiry_s: int = 0,
        protocol: MqttProtocol = "5",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._port = port
        self._v5 = protocol == "5"
        self._topic = topic
        self._qos = qos
        self._session_expiry_s = session_expiry_s
        self._messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        version = mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def __enter__(self) -> Subscriber:
        if self._v5:
            # A session expiry > 0 makes the broker queue QoS 1 messages for this client id while away.
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._session_expiry_s
            clean = self._session_expiry_s == 0
            self._client.connect("127.0.0.1", self._port, keepalive=30, clean_start=clean, properties=props)
        else:  # MQTT 3.1.1 (amqtt speaks nothing else) takes no CONNECT properties
            self._client.connect("127.0.0.1", self._port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            self.__exit__(None, None, None)
            raise AssertionError(f"subscriber got no SUBACK for {self._topic}")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        client.subscribe(self._topic, qos=self._qos)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, rcs: object, props: object
    ) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        received = Received(
            msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain),
            getattr(props, "CorrelationData", None), getattr(props, "MessageExpiryInterval", None),
        )  # fmt: skip
        with self._cond:
            self._messages.append(received)
            self._cond.notify_all()

    def publish(
        self, topic: str, payload: bytes, *, response_topic: str | None = None, correlation_data: bytes | None = None
    ) -> None:
        """Publish at QoS 1 (a command, say), with MQTT 5 request/response properties when given."""
        props = None
        if self._v5 and (response_topic or correlation_data):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data:
                props.CorrelationData = correlation_data
        self._client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    @property
    def messages(self) -> list[Received]:
        """A snapshot of what has arrived so far."""
        with self._cond:
            return list(self._messages)

    def wait_for(
        self, until: int | Callable[[list[Received]], bool], timeout: float = 10.0
    ) -> list[Received]:
        """Block until `until` messages arrived (int) or until(messages) holds; AssertionError on timeout."""
        pred = until if callable(until) else (lambda msgs: len(msgs) >= until)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self._messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"condition not met within {timeout} s; received {self._messages}")
                self._cond.wait(left)
            return list(self._messages)

    async def await_for(
        self, until: int | Callable[[list[Received]], bool], timeout: float = 10.0
    ) -> list[Received]:
        """wait_for without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for, until, timeout)


def make_publisher(cfg: MqttConfig, gateway_id: str = "gw01") -> MqttPublisher:
    """A publisher with fixed version and start time (not started)."""
    return MqttPublisher(cfg, gateway_id=gateway_id, version="0.1.0", started_at="2024-01-01T00:00:00.000Z")


@contextlib.asynccontextmanager
async def store_and_publisher(db: Path, cfg: MqttConfig) -> AsyncIterator[tuple[Store, MqttPublisher]]:
    """A started Store on `db` and a publisher connected to the broker of `cfg`; both stopped on exit."""
    store = Store(db)
    await store.start()
    pub = make_publisher(cfg)
    await pub.start()
    try:
        assert await pub.wait_connected(10)
        yield store, pub
    finally:
        await pub.stop()
        await store.stop()


@contextlib.asynccontextmanager
async def draining(
    store: Store, publisher: MqttPublisher, wake: asyncio.Event | None = None, **options: Any
) -> AsyncIterator[asyncio.Event]:
    """drain_outbox(store, publisher, wake, **options) in a task; yields `wake` (a new Event unless given).

    On exit the task is cancelled, then `publisher` and `store` (started by the caller) are stopped.
    """
    wake = asyncio.Event() if wake is None else wake
    drain = asyncio.ensure_future(drain_outbox(store, publisher, wake, **options))
    try:
        yield wake
    finally:
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)
        await publisher.stop()
        await store.stop()
