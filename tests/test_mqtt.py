"""The MQTT publisher and the outbox drain against a real mosquitto."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from gateway.alarms import AlarmEvent
from gateway.config import MqttConfig
from gateway.demo.broker import BrokerError, MosquittoBroker, MqttProtocol, find_mosquitto
from gateway.errors import PublishError
from gateway.sinks.mqtt import MqttPublisher, drain_once
from gateway.sinks.payloads import alarm_payload, alarm_topic, status_topic
from gateway.store import NewEvent, Store
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_mqtt import (
    Received,
    Subscriber,
    draining,
    make_event,
    make_publisher,
    store_and_publisher,
)

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

ALARM_FIELDS = {
    "alarm_id", "event_id", "event", "gateway_id", "site", "asset", "rule", "kind", "output", "severity",
    "value", "threshold", "model", "model_version", "first_abnormal_source_ts", "decided_at", "state", "seq",
    "cause", "shelved_until", "command_id", "schema",
}  # fmt: skip


def _cfg(port: int, protocol: Literal["5", "3.1.1"] = "5") -> MqttConfig:
    return MqttConfig(port=port, site="plant1", publish_timeout_s=5.0, protocol=protocol)


def _states(msgs: list[Received]) -> list[str]:
    return [json.loads(m.payload)["state"] for m in msgs]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_alarm_arrives_at_qos1_with_documented_fields(
    mosquitto: MosquittoBroker, protocol: Literal["5", "3.1.1"]
) -> None:
    cfg = _cfg(mosquitto.port, protocol=protocol)
    event = make_event(4)
    topic = alarm_topic(cfg, gateway_id="gw01", event=event)

    async def main() -> None:
        pub = make_publisher(cfg)
        await pub.start()
        assert await pub.wait_connected(10)
        await pub.publish(topic, alarm_payload(event, site=cfg.site), qos=1)
        assert pub.stats.published == 1 and pub.stats.connects == 1
        await pub.stop()

    with Subscriber(mosquitto.port, "edge/plant1/+/alarm") as sub:
        asyncio.run(main())
        (msg,) = sub.wait_for(1)
    assert msg.topic == "edge/plant1/pump01/alarm" and msg.qos == 1
    body = json.loads(msg.payload)
    assert set(body) == ALARM_FIELDS
    assert body["event_id"] == event.event_id and body["event"] == "raised" and body["site"] == "plant1"
    assert body["value"] == 2.5 and body["threshold"] == 1.0 and body["schema"] == 3
    assert body["first_abnormal_source_ts"] == "2023-11-14T22:13:20.123Z"
    assert body["decided_at"] == "2023-11-14T22:13:21.000Z"


def test_non_finite_values_become_null() -> None:
    body = json.loads(alarm_payload(make_event(1, value=float("nan")), site="s"))
    assert body["value"] is None and body["threshold"] == 1.0


def test_online_status_is_retained_for_later_subscribers(mosquitto: MosquittoBroker) -> None:
    cfg = _cfg(mosquitto.port)
    topic = status_topic(cfg, "gw01")

    async def main() -> list[Received]:
        pub = make_publisher(cfg)
        with Subscriber(mosquitto.port, topic) as early:
            await pub.start()
            await early.await_for(lambda msgs: _states(msgs) == ["online"])
        with Subscriber(mosquitto.port, topic) as late:
            got = await late.await_for(1)
        await pub.stop()
        return got

    (msg,) = asyncio.run(main())
    assert msg.retain and msg.topic == "edge/plant1/gw01/status"
    body = json.loads(msg.payload)
    assert body == {
        "message_id": body["message_id"], "state": "online", "gateway_id": "gw01", "version": "0.1.0",
        "started_at": "2024-01-01T00:00:00.000Z", "inference": None, "stats": None, "schema": 3,
    }  # fmt: skip
    assert re.fullmatch(r"gw01:[0-9a-f]{12}:online", body["message_id"])


_KILLED_GATEWAY = """
import asyncio, sys
from gateway.config import MqttConfig
from gateway.sinks.mqtt import MqttPublisher

async def main():
    cfg = MqttConfig(port=int(sys.argv[1]), site="plant1", protocol=sys.argv[2])
    pub = MqttPublisher(cfg, gateway_id="gwkill", version="0.1.0", started_at="x")
    await pub.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.parametrize(("broker_fixture", "protocol"), [("mosquitto", "5"), ("amqtt_broker", "3.1.1")])
def test_last_will_marks_a_killed_gateway_offline(
    broker_fixture: str, protocol: MqttProtocol, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    port = request.getfixturevalue(broker_fixture).port
    topic = status_topic(_cfg(port), "gwkill")
    errors = tmp_path / "child.err"
    with Subscriber(port, topic, protocol=protocol) as sub, errors.open("wb") as err:
        child = subprocess.Popen([sys.executable, "-c", _KILLED_GATEWAY, str(port), protocol], stderr=err)
        try:
            sub.wait_for(lambda msgs: _states(msgs) == ["online"], timeout=30)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        assert child.returncode == -signal.SIGKILL, errors.read_text()
        sub.wait_for(lambda msgs: _states(msgs) == ["online", "offline"])
    with Subscriber(port, topic, protocol=protocol) as late:
        retained = late.wait_for(1)
    # amqtt 0.12.1 may hand a new subscriber the same retained message twice: compare as a set.
    assert all(m.retain for m in retained)
    assert set(_states(retained)) == {"offline"}


def test_clean_stop_publishes_retained_offline(mosquitto: MosquittoBroker) -> None:
    cfg = _cfg(mosquitto.port)
    topic = status_topic(cfg, "gw01")

    async def main(sub: Subscriber) -> MqttPublisher:
        pub = make_publisher(cfg)
        await pub.start()
        await sub.await_for(lambda msgs: _states(msgs) == ["online"])
        await pub.stop()
        assert not pub.connected
        return pub

    with Subscriber(mosquitto.port, topic) as sub:
        pub = asyncio.run(main(sub))
        sub.wait_for(lambda msgs: _states(msgs) == ["online", "offline"])
    with Subscriber(mosquitto.port, topic) as late:
        (msg,) = late.wait_for(1)
    assert msg.retain and json.loads(msg.payload)["state"] == "offline"
    assert pub.stats.last_error is None


def test_publish_without_a_broker_raises_instead_of_hanging() -> None:
    cfg = _cfg(free_port())

    async def main() -> MqttPublisher:
        pub = make_publisher(cfg)
        await pub.start()  # must not fail or block with nothing listening
        with pytest.raises(PublishError, match="not connected"):
            await asyncio.wait_for(pub.publish("edge/x", b"{}"), 5)
        await wait_for_condition(
            lambda: "cannot connect" in (pub.stats.last_error or ""), what="connect error"
        )
        await pub.stop()
        return pub

    pub = asyncio.run(main())
    assert "Connection refused" in (pub.stats.last_error or "")
    assert pub.stats.failed == 1 and pub.stats.published == 0


def test_publish_after_the_broker_went_away_raises(tmp_path: Path) -> None:
    broker = MosquittoBroker(free_port(), workdir=tmp_path / "b").start()

    async def main() -> MqttPublisher:
        pub = make_publisher(_cfg(broker.port))
        await pub.start()
        assert await pub.wait_connected(10)
        await asyncio.to_thread(broker.stop)
        await wait_for_condition(lambda: not pub.connected, what="disconnect seen")
        assert "lost" in (pub.stats.last_error or "")
        with pytest.raises(PublishError, match="not connected"):
            await asyncio.wait_for(pub.publish("edge/x", b"{}"), 5)
        await pub.stop()
        return pub

    try:
        pub = asyncio.run(main())
    finally:
        broker.stop()
    assert pub.stats.failed == 1 and pub.stats.connects == 1


def test_refused_connection_is_reported_not_fatal(tmp_path: Path) -> None:
    with MosquittoBroker(free_port(), workdir=tmp_path / "b", allow_anonymous=False) as broker:

        async def main() -> MqttPublisher:
            pub = make_publisher(_cfg(broker.port))
            await pub.start()
            await wait_for_condition(lambda: pub.stats.last_error is not None, what="refusal seen")
            assert not pub.connected
            with pytest.raises(PublishError):
                await pub.publish("edge/x", b"{}")
            await pub.stop()
            return pub

        pub = asyncio.run(main())
    assert "refused the connection: Not authorized" in (pub.stats.last_error or "")
    assert pub.stats.connects == 0


def test_outbox_delivers_events_stored_while_the_broker_was_down(tmp_path: Path) -> None:
    port = free_port()
    broker = MosquittoBroker(port, workdir=tmp_path / "broker")
    cfg = _cfg(port)
    events = [make_event(1), make_event(2), make_event(1, "cleared", value=0.3), make_event(3)]
    # A persistent subscription made beforehand: the broker queues what arrives while it is away,
    # so delivery order can be checked no matter when the gateway reconnects.
    with broker, Subscriber(port, "edge/plant1/+/alarm", client_id="audit", session_expiry_s=3600):
        pass

    async def main() -> tuple[list[str], MqttPublisher]:
        store = Store(tmp_path / "g.db")
        await store.start()
        pub = make_publisher(cfg)
        await pub.start()
        async with draining(store, pub) as wake:
            for e in events:
                await store.add_alarm_event(
                    e, alarm_topic(cfg, gateway_id="gw01", event=e), alarm_payload(e, site="plant1")
                )
                wake.set()
            await wait_for_condition(lambda: pub.stats.failed >= 1, what="a drain round against no broker")
            assert "cannot connect" in (pub.stats.last_error or "")
            assert [m.message_id for m in await store.pending()] == [e.event_id for e in events]
            await asyncio.to_thread(broker.start)
            await wait_for_condition(
                lambda: pub.stats.published == len(events), timeout=40, what="outbox drained"
            )
            assert await store.pending() == []
        with Subscriber(port, "edge/plant1/+/alarm", client_id="audit", session_expiry_s=3600) as sub:
            got = await sub.await_for(len(events))
        return [json.loads(m.payload)["event_id"] for m in got], pub

    try:
        received, pub = asyncio.run(main())
    finally:
        broker.stop()
    assert received == [e.event_id for e in events]


def _outbox_items(cfg: MqttConfig, events: list[AlarmEvent]) -> list[NewEvent]:
    return [
        NewEvent(e, alarm_topic(cfg, gateway_id="gw01", event=e), alarm_payload(e, site=cfg.site)) for e in events
    ]


def _event_ids(msgs: list[Received]) -> list[str]:
    return [json.loads(m.payload)["event_id"] for m in msgs]


def test_pipelined_outbox_delivers_in_storage_order(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    cfg = _cfg(mosquitto.port)
    events = [make_event(n, asset=f"pump{n % 3 + 1:02d}") for n in range(200)]

    async def main(sub: Subscriber) -> list[Received]:
        async with store_and_publisher(tmp_path / "g.db", cfg) as (store, pub):
            await store.add_alarm_events(_outbox_items(cfg, events))
            await drain_once(store, pub, batch=64, window=8)
            assert await store.pending() == []
            return await sub.await_for(len(events))

    with Subscriber(mosquitto.port, "edge/plant1/+/alarm") as sub:
        got = asyncio.run(main(sub))
    assert _event_ids(got) == [e.event_id for e in events]


def test_a_refused_publish_marks_only_the_acknowledged_prefix_and_the_rest_is_resent_in_order(
    tmp_path: Path,
) -> None:
    # The broker refuses pump02's topic until its ACL is reloaded: event 12 fails in the middle of a window.
    acl = tmp_path / "acl"
    acl.write_text("topic read #\ntopic write edge/plant1/pump01/alarm\n")
    broker = MosquittoBroker(free_port(), workdir=tmp_path / "broker", extra_config=[f"acl_file {acl}"])
    cfg = _cfg(broker.port)
    refused, window = 12, 8
    events = [make_event(n, asset="pump02" if n == refused else "pump01") for n in range(30)]
    ids = [e.event_id for e in events]

    async def main(sub: Subscriber) -> list[Received]:
        async with store_and_publisher(tmp_path / "g.db", cfg) as (store, pub):
            await store.add_alarm_events(_outbox_items(cfg, events))
            with pytest.raises(PublishError, match="Not authorized"):
                await drain_once(store, pub, window=window)
            # Publishes behind the refused one may have been acknowledged too; they are not marked.
            assert [m.message_id for m in await store.pending()] == ids[refused:]
            acl.write_text("topic read #\ntopic write edge/#\n")
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGHUP)
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                try:
                    await drain_once(store, pub, window=window)
                    break
                except PublishError:
                    # Bounded poll: mosquitto says nothing when the reloaded ACL takes effect.
                    assert asyncio.get_running_loop().time() < deadline, "ACL reload not seen"
                    await asyncio.sleep(0.05)
            assert await store.pending() == []
            return await sub.await_for(lambda msgs: bool(msgs) and _event_ids(msgs)[-1] == ids[-1])

    with broker, Subscriber(broker.port, "edge/plant1/+/alarm") as sub:
        got = _event_ids(asyncio.run(main(sub)))
    # The prefix once; then early copies of events that were in flight behind the refused one (each
    # refused round sends some); then everything from the refused one on, again in storage order.
    resent = len(got) - len(ids[refused:])
    assert got[:refused] == ids[:refused]
    assert set(got[refused:resent]) <= set(ids[refused + 1 : refused + window])
    assert got[resent:] == ids[refused:]


def test_a_second_broker_on_a_taken_port_fails_clearly(mosquitto: MosquittoBroker) -> None:
    with pytest.raises(BrokerError, match="already in use"):
        MosquittoBroker(mosquitto.port).start()
    assert mosquitto.running
