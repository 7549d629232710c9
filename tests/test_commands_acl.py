"""The broker ACL that makes `mqtt.commands.users` safe, against a real mosquitto with a password file.

The gateway trusts the `{user}` level of a command topic; only the broker can stop mallory from
publishing under `cmd/alice/`. mosquitto drops a publish its ACL denies (on MQTT 5 the PUBACK says
"Not authorized", on 3.1.1 it is a plain PUBACK), so the gateway never sees it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from gateway.alarms import AlarmEngine, AlarmEvent
from gateway.commands import CommandHandler, response_topic
from gateway.config import CommandsConfig, MqttConfig
from gateway.demo.broker import MosquittoBroker, find_mosquitto
from gateway.sinks.payloads import alarm_payload, alarm_topic
from gateway.store import Store
from tests.conftest import free_port
from tests.fixtures_commands import RULE, ask, running_commands
from tests.fixtures_mqtt import Subscriber, draining, make_publisher

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

README = Path(__file__).resolve().parent.parent / "README.md"
# The ACL README.md's Commands section documents, for a gateway logging in as gw01. `topic` lines
# belong to the `user` above them; `pattern` lines apply to every user, %u being its name.
ACL = """\
user gw01
topic read edge/+/cmd/#
topic write edge/+/cmd-response/#
topic write edge/+/+/alarm
topic write edge/+/+/score
topic write edge/+/gw01/status

user alice
topic read edge/+/+/alarm

user mallory
topic read edge/+/+/alarm

pattern write edge/+/cmd/%u/#
pattern read edge/+/cmd-response/%u
"""
USERS = ("gw01", "alice", "mallory")


def password(user: str) -> str:
    """Each test user's password."""
    return f"{user}-secret"


def subscriber(port: int, user: str, topic: str) -> Subscriber:
    """A Subscriber to `topic` logged in as `user`."""
    return Subscriber(port, topic, username=user, password=password(user))


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """mosquitto with a password file for USERS and the ACL above; no anonymous access."""
    passwords = tmp_path / "passwd"
    for i, user in enumerate(USERS):
        create = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", *create, "-b", str(passwords), user, password(user)], check=True)
    passwords.chmod(0o600)
    acl = tmp_path / "acl"
    acl.write_text(ACL, encoding="utf-8")
    broker = MosquittoBroker(
        free_port(),
        workdir=tmp_path / "broker",
        allow_anonymous=False,
        extra_config=[f"password_file {passwords}", f"acl_file {acl}"],
    )
    with broker:
        yield broker


@asynccontextmanager
async def gateway(port: int, workdir: Path) -> AsyncIterator[tuple[CommandHandler, list[AlarmEvent]]]:
    """gw01's command handler, alarm engine, store and outbox, as the gateway wires them, with one raised
    alarm on each of pump01 and pump02 stored and published; yields the handler and those two events."""
    (workdir / "gw01-password").write_text(password("gw01") + "\n", encoding="utf-8")
    cfg = MqttConfig(
        port=port, site="plant1", username="gw01", password_file=workdir / "gw01-password",
        commands=CommandsConfig(users=["alice", "mallory"]),
    )  # fmt: skip
    assert cfg.commands is not None
    rule = dataclasses.replace(RULE, assets=frozenset({"pump01", "pump02"}))
    engine = AlarmEngine([rule], gateway_id="gw01")
    raised = [
        event
        for asset in ("pump01", "pump02")
        for event in engine.decide("ae", asset, np.array([0.9]), source_ts_ns=1, now_ns=1)
    ]
    store = Store(workdir / "gw01.db")
    await store.start()
    publisher = make_publisher(cfg)
    wake = asyncio.Event()

    async def emit(event: AlarmEvent) -> None:
        # Durable first, then published by the outbox, as Gateway._emit does.
        topic = alarm_topic(cfg, gateway_id="gw01", event=event)
        await store.add_alarm_event(event, topic, alarm_payload(event, site=cfg.site))
        wake.set()

    handler = CommandHandler(cfg, cfg.commands, engine, emit, publisher, store)
    async with draining(store, publisher, wake), running_commands(handler, publisher):
        for event in raised:
            await emit(event)
        yield handler, raised


def test_an_operator_commands_only_under_its_own_name(acl_broker: MosquittoBroker, tmp_path: Path) -> None:
    port = acl_broker.port
    cmd_responses = "edge/plant1/cmd-response/#"

    async def main() -> None:
        # Subscribed before the gateway starts, so the raised alarms are seen too.
        with (
            subscriber(port, "alice", "edge/plant1/+/alarm") as alarms,
            subscriber(port, "alice", cmd_responses) as alice,
            subscriber(port, "mallory", cmd_responses) as mallory,
        ):
            async with gateway(port, tmp_path) as (h, (pump01, pump02)):
                seen = await alarms.await_for(2)  # gw01 may publish alarms, alice may read them
                assert [json.loads(m.payload)["alarm_id"] for m in seen] == [pump01.alarm_id, pump02.alarm_id]

                # Impersonation: denied by the broker, so never delivered to the gateway.
                forged = {"alarm_id": pump01.alarm_id, "command_id": "forged-1"}
                mallory.publish("edge/plant1/cmd/alice/acknowledge", json.dumps(forged).encode())
                # Published after the forged command's PUBACK: had the broker passed that one on, the
                # gateway (one subscription, commands executed in arrival order) would have answered it first.
                ack = {"alarm_id": pump02.alarm_id, "command_id": "a-1"}
                reply = await ask(alice, "alice", "acknowledge", ack)
                assert reply["ok"] and reply["command_id"] == "a-1", reply
                assert (reply["alarm_id"], reply["state"]) == (pump02.alarm_id, "acked")
                assert alice.messages[-1].topic == response_topic(h.cfg, "alice")
                assert h.engine.states[("bearing", "pump01")].state == "unack"
                assert (h.executed, h.refused) == (1, 0)  # not even refused: it never arrived

                # mallory's own commands work: the ACL, not a broken login, stopped the forgery.
                ack = {"alarm_id": pump01.alarm_id, "command_id": "m-1"}
                own = await ask(mallory, "mallory", "acknowledge", ack)
                assert own["ok"] and (own["alarm_id"], own["state"]) == (pump01.alarm_id, "acked"), own
                assert h.engine.states[("bearing", "pump01")].state == "acked"

                published = await alarms.await_for(4)
            answered = [json.loads(m.payload)["command_id"] for m in alice.messages + mallory.messages]
            assert "forged-1" not in answered
            # Each reads only its own responses, though both subscribed to all of them; alice's was
            # published before mallory's, on the same connection, so it would have reached mallory first.
            assert {m.topic for m in alice.messages} == {response_topic(h.cfg, "alice")}
            assert {m.topic for m in mallory.messages} == {response_topic(h.cfg, "mallory")}
        transitions = [json.loads(m.payload) for m in published]
        assert [(t["asset"], t["event"], t["cause"]) for t in transitions] == [
            ("pump01", "raised", "process"),
            ("pump02", "raised", "process"),
            ("pump02", "acknowledged", "operator:alice"),
            ("pump01", "acknowledged", "operator:mallory"),
        ]

    asyncio.run(main())


def test_the_readme_documents_this_acl() -> None:
    assert ACL in README.read_text(encoding="utf-8"), "README.md's Commands section shows the tested ACL"
