"""Operator commands over MQTT against a real mosquitto: answered, validated, authorized, deduplicated."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.alarms import AlarmEngine, AlarmEvent
from gateway.commands import CommandHandler, command_schema, response_topic
from gateway.config import CommandsConfig, MqttConfig
from gateway.demo.broker import MosquittoBroker
from gateway.errors import ConfigError
from gateway.sinks.mqtt import MqttPublisher
from gateway.store import Store
from tests.fixtures_commands import RULE, ask, running_commands
from tests.fixtures_mqtt import Subscriber

REPO = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def handler(
    port: int, protocol: str = "5", *, db: Path | None = None, **commands: Any
) -> AsyncIterator[tuple[CommandHandler, list[AlarmEvent], AlarmEvent]]:
    """A CommandHandler on a real broker and a real SQLite store (`db`, else a temporary file), whose
    engine has one raised alarm; emitted events are stored and collected."""
    cfg = MqttConfig(port=port, site="plant1", protocol=protocol, commands=CommandsConfig(**commands))  # type: ignore[arg-type]
    engine = AlarmEngine([RULE], gateway_id="gw")
    (raised,) = engine.decide("ae", "pump01", np.array([0.9]), source_ts_ns=1, now_ns=1)
    emitted: list[AlarmEvent] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(db or Path(tmp) / "gw.db")
        await store.start()

        async def emit(event: AlarmEvent) -> None:
            await store.add_alarm_event(event, "t/alarm", b"{}")
            emitted.append(event)

        publisher = MqttPublisher(cfg, gateway_id="gw", version="t", started_at="t")
        assert cfg.commands is not None
        h = CommandHandler(cfg, cfg.commands, engine, emit, publisher, store)
        try:
            async with running_commands(h, publisher):
                yield h, emitted, raised
        finally:
            await publisher.stop()
            await store.stop()


def test_acknowledge_is_answered_on_the_v5_response_topic_with_correlation_data(
    mosquitto: MosquittoBroker,
) -> None:
    async def main() -> None:
        async with handler(mosquitto.port, users=["op1"]) as (h, emitted, raised):
            with Subscriber(mosquitto.port, "scada/replies/#") as client:
                reply = await ask(
                    client, "op1", "acknowledge", {"alarm_id": raised.alarm_id, "command_id": "c-1"},
                    response_topic="scada/replies/op1", correlation_data=b"\x01corr",
                )  # fmt: skip
                answer = client.messages[-1]
                assert answer.topic == "scada/replies/op1" and answer.correlation_data == b"\x01corr"
            assert reply["ok"] is True and reply["error"] is None and reply["command_id"] == "c-1"
            assert (reply["alarm_id"], reply["state"], reply["event_id"]) == (
                raised.alarm_id,
                "acked",
                f"{raised.alarm_id}:2",
            )
            assert [(e.event, e.state, e.cause) for e in emitted] == [
                ("acknowledged", "acked", "operator:op1")
            ]
            assert h.engine.states[("bearing", "pump01")].state == "acked"

    asyncio.run(main())


def test_shelve_and_unshelve_over_mqtt_3_1_1_answer_on_the_default_response_topic(
    mosquitto: MosquittoBroker,
) -> None:
    async def main() -> None:
        async with handler(mosquitto.port, protocol="3.1.1", users=["op1"]) as (h, emitted, raised):
            cfg = h.cfg
            with Subscriber(mosquitto.port, response_topic(cfg, "op1"), protocol="3.1.1") as client:
                shelved = await ask(
                    client, "op1", "shelve", {"asset": "pump01", "rule": "bearing", "duration_s": 600}
                )
                assert shelved["ok"] and shelved["state"] == "shelved"
                state = h.engine.states[("bearing", "pump01")]
                assert (
                    state.state == "shelved"
                    and state.shelved_until_ns - emitted[0].decided_at_ns == 600 * 10**9
                )
                back = await ask(client, "op1", "unshelve", {"asset": "pump01", "rule": "bearing"})
            # The condition is still present: back to unacknowledged, the same occurrence.
            assert back["ok"] and back["state"] == "unack" and back["alarm_id"] == raised.alarm_id
            assert [e.event for e in emitted] == ["shelved", "unshelved"]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("user", "command", "body", "error"),
    [
        ("op1", "acknowledge", b"{not json", "malformed JSON"),
        ("op1", "acknowledge", b"[1, 2]", "the payload must be a JSON object"),
        (
            "op1",
            "reboot",
            {"alarm_id": "x"},
            "unknown command 'reboot'; known: acknowledge, shelve, unshelve",
        ),
        ("op1", "acknowledge", {"alarm_id": 7}, "alarm_id: Input should be a valid string"),
        ("op1", "acknowledge", {"alarm_id": "a", "force": True}, "force: unknown field"),
        (
            "op1",
            "shelve",
            {"asset": "pump01", "rule": "bearing", "duration_s": -5},
            "duration_s: Input should be greater than 0",
        ),
        (
            "op1",
            "shelve",
            {"asset": "pump01", "rule": "bearing", "duration_s": 10**6},
            "duration_s must be at most 28800",
        ),
        (
            "op1",
            "shelve",
            {"asset": "pump09", "rule": "bearing", "duration_s": 60},
            "no alarm 'bearing' on asset 'pump09'",
        ),
        ("op1", "acknowledge", {"alarm_id": "no-such-alarm"}, "no open alarm with id 'no-such-alarm'"),
        ("op1", "unshelve", {"asset": "pump01", "rule": "bearing"}, "is unack, not shelved"),
        ("intruder", "acknowledge", {"alarm_id": "x"}, "'intruder' is not authorized"),
        ("intruder", "acknowledge", {"alarm_id": "x", "secret": "guess"}, "'intruder' is not authorized"),
    ],
)
def test_bad_commands_are_answered_with_an_error_and_change_nothing(
    mosquitto: MosquittoBroker, user: str, command: str, body: Any, error: str
) -> None:
    async def main() -> None:
        async with handler(mosquitto.port, users=["op1"], secret_env="TEST_CMD_SECRET") as (
            h,
            emitted,
            raised,
        ):
            before = dict(h.engine.states)
            with Subscriber(mosquitto.port, response_topic(h.cfg, user)) as client:
                reply = await ask(client, user, command, body)
            assert reply["ok"] is False and error in reply["error"], reply
            assert "guess" not in json.dumps(reply)  # a secret is never echoed
            assert emitted == [] and h.engine.states == before and h.refused == 1

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEST_CMD_SECRET", "s3cret-value")
        asyncio.run(main())


def test_a_shared_secret_authorizes_and_a_repeated_command_id_is_answered_not_executed(
    mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_CMD_SECRET", "s3cret-value")

    async def main() -> None:
        async with handler(mosquitto.port, secret_env="TEST_CMD_SECRET") as (h, emitted, raised):
            body = {"alarm_id": raised.alarm_id, "command_id": "ack-42", "secret": "s3cret-value"}
            with Subscriber(mosquitto.port, response_topic(h.cfg, "hmi7")) as client:
                first = await ask(client, "hmi7", "acknowledge", body)
                again = await ask(client, "hmi7", "acknowledge", body)
            assert first["ok"] and "duplicate" not in first
            assert again == {**first, "duplicate": True}
            assert len(emitted) == 1 and h.executed == 1
            assert emitted[0].command_id == "ack-42"

    asyncio.run(main())


def test_a_command_id_retried_after_a_restart_is_answered_from_the_store_not_executed(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async def run(body: dict[str, Any], user: str) -> tuple[dict[str, Any], list[AlarmEvent], str]:
        # A new handler and engine on the same SQLite file: what a gateway restart leaves.
        async with handler(mosquitto.port, db=tmp_path / "gw.db", users=["op1", "op2"]) as (h, emitted, raised):
            with Subscriber(mosquitto.port, response_topic(h.cfg, user)) as client:
                reply = await ask(client, user, "acknowledge", {"alarm_id": raised.alarm_id, **body})
            return reply, emitted, h.engine.states[("bearing", "pump01")].state

    first, emitted, _ = asyncio.run(run({"command_id": "ack-7"}, "op1"))
    retried, emitted_again, state = asyncio.run(run({"command_id": "ack-7"}, "op1"))
    assert first["ok"] and [e.command_id for e in emitted] == ["ack-7"]
    assert retried == {**first, "duplicate": True}
    # Not executed again: no event, and this (fresh) engine's alarm is still unacknowledged.
    assert emitted_again == [] and state == "unack"
    # The id is per user: another operator's command with the same id is a new command.
    other, emitted_other, state = asyncio.run(run({"command_id": "ack-7"}, "op2"))
    assert other["ok"] and "duplicate" not in other and len(emitted_other) == 1 and state == "acked"


def test_commands_need_someone_authorized_and_an_unset_secret_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="name the users allowed to command, or a shared secret"):
        CommandsConfig()
    monkeypatch.delenv("NO_SUCH_SECRET", raising=False)
    with pytest.raises(
        ConfigError, match="mqtt.commands.secret_env: environment variable NO_SUCH_SECRET is not set"
    ):
        CommandsConfig(secret_env="NO_SUCH_SECRET").secret()


def test_the_committed_command_schema_is_the_generated_one() -> None:
    committed = json.loads((REPO / "docs" / "schemas" / "command.schema.json").read_text(encoding="utf-8"))
    assert committed == command_schema(), "regenerate with: make schemas"
