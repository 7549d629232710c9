"""The demo's embedded amqtt broker (the fallback when mosquitto is missing), with real paho clients."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import MqttConfig
from gateway.demo import broker as demo_broker
from gateway.demo.broker import BrokerError, EmbeddedBroker, MosquittoBroker, choose_demo_broker
from gateway.demo.run import run_demo
from gateway.sinks.mqtt import MqttPublisher
from gateway.sinks.payloads import alarm_payload, alarm_topic, status_topic
from tests.conftest import free_port
from tests.fixtures_mqtt import Received, Subscriber, make_event, make_publisher

needs_amqtt = pytest.mark.skipif(
    not demo_broker.amqtt_installed(), reason="amqtt is not installed (pip install 'edge-gateway[demo]')"
)


def _cfg(port: int) -> MqttConfig:
    return MqttConfig(port=port, site="plant1", publish_timeout_s=5.0, protocol="3.1.1")


def _states(msgs: list[Received]) -> list[str]:
    return [json.loads(m.payload)["state"] for m in msgs]


def _retained_states(msgs: list[Received]) -> set[str]:
    # amqtt 0.12.1 also pushes matching retained messages at CONNECT (for any filter some client ever
    # subscribed), so a new subscriber may get the same retained message twice: compare sets.
    assert all(m.retain for m in msgs), msgs
    return set(_states(msgs))


def test_paho_311_clients_exchange_qos1_through_the_embedded_broker(amqtt_broker: EmbeddedBroker) -> None:
    assert amqtt_broker.running and amqtt_broker.pid is not None and amqtt_broker.host == "127.0.0.1"
    acked = threading.Event()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub311", protocol=mqtt.MQTTv311)
    pub.on_publish = lambda _c, _u, _mid, rc, _p: None if rc.is_failure else acked.set()
    with Subscriber(amqtt_broker.port, "plant/#", protocol="3.1.1") as sub:
        pub.connect("127.0.0.1", amqtt_broker.port)
        pub.loop_start()
        try:
            pub.publish("plant/pump01/x", b"42", qos=1)
            (msg,) = sub.wait_for(1)
            assert acked.wait(10), "no PUBACK from amqtt"
        finally:
            pub.disconnect()
            pub.loop_stop()
    assert msg == Received("plant/pump01/x", b"42", 1, False)
    amqtt_broker.stop()
    assert not amqtt_broker.running


def test_publisher_alarm_arrives_through_the_embedded_broker(amqtt_broker: EmbeddedBroker) -> None:
    cfg = _cfg(amqtt_broker.port)
    event = make_event(7)

    async def main() -> MqttPublisher:
        pub = make_publisher(cfg)
        await pub.start()
        assert await pub.wait_connected(10)
        await pub.publish(
            alarm_topic(cfg, gateway_id="gw01", event=event), alarm_payload(event, site="plant1")
        )
        await pub.stop()
        return pub

    with Subscriber(amqtt_broker.port, "edge/plant1/+/alarm", protocol="3.1.1") as sub:
        pub = asyncio.run(main())
        (msg,) = sub.wait_for(1)
    # The alarm, then the retained offline status at stop, each acknowledged.
    assert pub.stats.published == 2 and pub.stats.failed == 0 and pub.stats.last_error is None
    assert msg.topic == "edge/plant1/pump01/alarm" and msg.qos == 1
    assert json.loads(msg.payload)["event_id"] == event.event_id


def test_status_is_retained_and_a_clean_stop_leaves_offline(amqtt_broker: EmbeddedBroker) -> None:
    cfg = _cfg(amqtt_broker.port)
    topic = status_topic(cfg, "gw01")

    async def main() -> list[Received]:
        pub = make_publisher(cfg)
        with Subscriber(amqtt_broker.port, topic, protocol="3.1.1") as early:
            await pub.start()
            await early.await_for(lambda msgs: _states(msgs) == ["online"])
        with Subscriber(amqtt_broker.port, topic, protocol="3.1.1") as late:
            online = await late.await_for(1)
        await pub.stop()
        return online

    online = asyncio.run(main())
    with Subscriber(amqtt_broker.port, topic, protocol="3.1.1") as late:
        offline = late.wait_for(1)
    assert _retained_states(online) == {"online"}
    assert _retained_states(offline) == {"offline"}


def test_demo_picks_the_embedded_broker_only_without_mosquitto(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(demo_broker, "find_mosquitto", lambda: "/usr/sbin/mosquitto")
    chosen, protocol = choose_demo_broker(1883, tmp_path)
    assert isinstance(chosen, MosquittoBroker) and protocol == "5"
    monkeypatch.setattr(demo_broker, "find_mosquitto", lambda: None)
    chosen, protocol = choose_demo_broker(1883, tmp_path)
    assert isinstance(chosen, EmbeddedBroker) and protocol == "3.1.1" and chosen.port == 1883
    assert not chosen.running and chosen.pid is None


def test_missing_amqtt_is_one_line_naming_both_installs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # With nothing on the import path amqtt cannot be found, as on a device without the extra.
    monkeypatch.delitem(sys.modules, "amqtt", raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(BrokerError, match=r"pip install 'edge-gateway\[demo\]' or apt-get install mosquitto"):
        EmbeddedBroker(free_port()).start()


def test_a_second_embedded_broker_on_a_taken_port_fails_clearly(amqtt_broker: EmbeddedBroker) -> None:
    with pytest.raises(BrokerError, match="already in use"):
        EmbeddedBroker(amqtt_broker.port).start()


@needs_amqtt
def test_the_demo_runs_on_the_embedded_broker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo_broker, "find_mosquitto", lambda: None)
    gateway_log = logging.getLogger("gateway")
    level = gateway_log.level
    try:
        code = asyncio.run(run_demo(seconds=8, workdir=tmp_path))
    finally:
        gateway_log.setLevel(level)  # run_demo quiets the gateway's log for its live view
    out = capsys.readouterr().out
    assert code == 0, out
    assert "MQTT broker amqtt (mosquitto not found: embedded Python broker)" in out
    # The view is a separate MQTT client: this line means the gateway's status crossed amqtt.
    assert "gateway status: online" in out
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["mqtt"]["protocol"] == "3.1.1"
    assert (tmp_path / "amqtt" / "amqtt.log").exists()
    assert "amqtt" not in sys.modules  # the broker ran in its own process; the gateway never imports it
