"""MQTT delivery across broker restarts: persistent session, reconnect backoff, message expiry."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.alarms import AlarmEvent
from gateway.config import MqttConfig
from gateway.demo.broker import MosquittoBroker, MqttProtocol, find_mosquitto
from gateway.sinks.mqtt import MqttPublisher, drain_once
from gateway.sinks.payloads import alarm_payload, alarm_topic, score_topic
from gateway.store import Store
from gateway.tasks import backoff_delay
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_mqtt import Subscriber, draining, make_event, make_publisher, store_and_publisher

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


async def _store_event(store: Store, cfg: MqttConfig, event: AlarmEvent) -> None:
    topic = alarm_topic(cfg, gateway_id="gw01", event=event)
    await store.add_alarm_event(event, topic, alarm_payload(event, site=cfg.site))


@pytest.mark.parametrize("failures", range(12))
def test_backoff_delay_is_capped_exponential_with_jitter(failures: int) -> None:
    lo, hi = 0.5, 30.0
    cap = min(hi, lo * 2**failures)
    delays = [backoff_delay(failures, lo, hi) for _ in range(200)]
    assert all(max(lo, cap / 2) <= d <= cap for d in delays)
    if cap / 2 > lo:
        assert len(set(delays)) > 1  # jittered: reconnecting gateways do not retry in lockstep


def test_backoff_delay_stays_within_bounds_for_huge_failure_counts() -> None:
    assert all(15.0 <= backoff_delay(10_000, 0.5, 30.0) <= 30.0 for _ in range(100))
    assert backoff_delay(7, 2.0, 2.0) == 2.0


def test_reconnect_range_is_validated() -> None:
    with pytest.raises(ValidationError, match="reconnect_min_s .5. must not exceed reconnect_max_s .1."):
        MqttConfig(reconnect_min_s=5, reconnect_max_s=1)
    cfg = MqttConfig()
    assert (cfg.session_expiry_s, cfg.score_expiry_s) == (3600, 60)


@needs_mosquitto
@pytest.mark.parametrize(
    ("protocol", "session_expiry_s"), [("5", 3600), ("3.1.1", 3600), ("5", 0)]
)  # fmt: skip
def test_alarms_raised_while_the_broker_is_down_arrive_in_order_exactly_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, protocol: MqttProtocol, session_expiry_s: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.sinks.mqtt")
    port = free_port()
    broker = MosquittoBroker(port, workdir=tmp_path / "broker")
    cfg = MqttConfig(
        port=port, site="plant1", protocol=protocol, publish_timeout_s=5.0,
        session_expiry_s=session_expiry_s, reconnect_min_s=0.1, reconnect_max_s=0.4,
    )  # fmt: skip
    before = [make_event(1)]
    while_down = [make_event(1, "cleared", value=0.3), make_event(2), make_event(3), make_event(2, "cleared")]
    # Published last, after every resend paho might make: once it arrives, any duplicate would have too.
    sentinel = make_event(4)

    async def main() -> list[str]:
        store = Store(tmp_path / "g.db")
        await store.start()
        pub = make_publisher(cfg)
        await pub.start()
        async with draining(store, pub, retry_s=0.1, max_backoff_s=0.4) as wake:
            assert await pub.wait_connected(10)
            assert not pub.stats.session_present  # nothing to resume yet
            for e in before:
                await _store_event(store, cfg, e)
            wake.set()
            await wait_for_condition(lambda: pub.stats.published == len(before), what="first alarm sent")
            await asyncio.to_thread(broker.stop)  # SIGTERM: mosquitto saves its sessions
            await wait_for_condition(lambda: not pub.connected, what="disconnect seen")
            for e in while_down:
                await _store_event(store, cfg, e)
                wake.set()
            await wait_for_condition(lambda: pub.stats.failed >= 1, what="a drain round against no broker")
            await asyncio.to_thread(broker.start)
            await wait_for_condition(
                lambda: pub.stats.published == len(before) + len(while_down),
                timeout=30,
                what="outbox drained",
            )
            assert pub.stats.connects == 2
            # The restarted broker restored our session, unless it is a clean one on every connect.
            assert pub.stats.session_present == (session_expiry_s > 0)
            await _store_event(store, cfg, sentinel)
            wake.set()
            await wait_for_condition(lambda: pub.stats.published == len(before) + len(while_down) + 1)
            assert await store.pending() == []
        with Subscriber(port, "edge/plant1/+/alarm", client_id="audit", session_expiry_s=3600) as sub:
            got = await sub.await_for(lambda msgs: sentinel.event_id.encode() in msgs[-1].payload)
        return [json.loads(m.payload)["event_id"] for m in got]

    broker.start()
    try:
        # A persistent subscription made beforehand: the broker queues what arrives while it is away.
        with Subscriber(port, "edge/plant1/+/alarm", client_id="audit", session_expiry_s=3600):
            pass
        received = asyncio.run(main())
    finally:
        broker.stop()
    assert received == [e.event_id for e in [*before, *while_down, sentinel]]
    # Every reconnect wait the publisher announced lies within the configured backoff range.
    retries = [
        float(r.args[-1])  # type: ignore[index,arg-type]
        for r in caplog.records
        if "retrying in" in r.msg or "reconnecting in" in r.msg
    ]
    assert retries and all(cfg.reconnect_min_s <= d <= cfg.reconnect_max_s for d in retries)


@needs_mosquitto
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_scores_carry_a_message_expiry_and_alarms_do_not(
    mosquitto: MosquittoBroker, tmp_path: Path, protocol: MqttProtocol
) -> None:
    cfg = MqttConfig(port=mosquitto.port, site="plant1", protocol=protocol, publish_timeout_s=5.0)
    event = make_event(1)
    scores = score_topic(cfg, gateway_id="gw01", asset="pump01", model="ae")
    alarms = alarm_topic(cfg, gateway_id="gw01", event=event)
    status = "edge/plant1/gw01/status"

    async def main() -> None:
        async with store_and_publisher(tmp_path / "g.db", cfg) as (store, pub):
            await pub.publish(scores, b'{"values":{"score":0.1}}', expiry_s=cfg.score_expiry_s)
            await _store_event(store, cfg, event)
            await drain_once(store, pub)

    with Subscriber(mosquitto.port, "edge/plant1/#") as sub:
        asyncio.run(main())
        received = sub.wait_for(lambda msgs: {m.topic for m in msgs} >= {scores, alarms, status})
    expiry = {m.topic: m.message_expiry_s for m in received}
    assert expiry[alarms] is None and expiry[status] is None
    if protocol == "5":
        # The broker forwards the time left: at most what was set, and not yet run out.
        assert 0 < (expiry[scores] or 0) <= cfg.score_expiry_s
    else:
        assert expiry[scores] is None  # MQTT 3.1.1 has no message expiry


@needs_mosquitto
def test_a_publish_in_flight_when_the_connection_drops_completes_after_the_reconnect(
    mosquitto: MosquittoBroker,
) -> None:
    cfg = MqttConfig(port=mosquitto.port, site="plant1", reconnect_min_s=0.1, reconnect_max_s=0.4)
    event = make_event(1)
    topic = alarm_topic(cfg, gateway_id="gw01", event=event)
    pid = mosquitto.pid
    assert pid is not None

    async def main() -> MqttPublisher:
        pub = make_publisher(cfg)
        await pub.start()
        assert await pub.wait_connected(10)
        os.kill(pid, signal.SIGSTOP)  # the broker cannot acknowledge anything now
        try:
            sent = asyncio.ensure_future(pub.publish(topic, alarm_payload(event, site=cfg.site)))
            await wait_for_condition(lambda: pub.awaiting_ack == 1, what="publish in flight")
            # Drop the connection under paho (no public way to): the PUBACK can only come after a reconnect.
            sock = pub._client.socket() if pub._client is not None else None
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)
            await wait_for_condition(lambda: not pub.connected, what="disconnect seen")
        finally:
            os.kill(pid, signal.SIGCONT)
        await sent  # paho re-sends it on the new connection; its PUBACK completes this publish
        await pub.stop()
        return pub

    with Subscriber(mosquitto.port, "edge/plant1/+/alarm") as sub:
        pub = asyncio.run(main())
        got = sub.wait_for(1)
    assert (pub.stats.published, pub.stats.failed, pub.stats.connects) == (2, 0, 2)
    assert json.loads(got[0].payload)["event_id"] == event.event_id
