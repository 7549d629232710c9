"""Operator commands from SCADA over MQTT: acknowledge, shelve and unshelve alarms, each answered.

A command is a JSON object published (QoS 1) to `{prefix}/{site}/cmd/{user}/{command}`; its schema
is docs/schemas/command.schema.json, generated from the models below (`command_schema()`). Every
command gets one response: to the MQTT 5 response topic with the command's correlation data when
the command carried them, else to `{prefix}/{site}/cmd-response/{user}` (a topic outside the
command filter, so the gateway never reads its own answers).

A command changes nothing unless it is well-formed, known, authorized (see config.CommandsConfig)
and applies to the alarm as it stands; otherwise the response says why. A command repeated with the
same `command_id` by the same user (a SCADA retry after a lost response) is answered again, marked
`duplicate`, not executed again: the id is stored with the alarm event the command caused, in the
same transaction, so this holds across restarts too (the last MAX_REMEMBERED answers are also kept
in memory). A refused command is not remembered: it changed nothing, and a retry is judged afresh.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.alarms import AlarmEngine, AlarmEvent, CommandError
from gateway.config import CommandsConfig, MqttConfig
from gateway.errors import PublishError
from gateway.sinks.mqtt import IncomingMessage, MqttPublisher
from gateway.sinks.payloads import iso_utc
from gateway.store import CommandRecord, Store

logger = logging.getLogger(__name__)

RESPONSE_SCHEMA = 1
MAX_PAYLOAD_BYTES = 8192
MAX_REMEMBERED = 1024
# Commands waiting to be executed; beyond this they are answered "busy" and dropped (DROP_NEWEST).
QUEUE_SIZE = 100

Text = Annotated[str, Field(min_length=1, max_length=200)]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    command_id: str | None = Field(default=None, min_length=1, max_length=128, description="for deduplication; echoed in the response")
    comment: str | None = Field(default=None, max_length=500, description="free text for the record")
    secret: str | None = Field(default=None, max_length=1000, description="the shared secret, when commands are authorized by one")


class Acknowledge(_Command):
    """Acknowledge an unacknowledged alarm occurrence."""

    alarm_id: Text


class Shelve(_Command):
    """Shelve the alarm `rule` on `asset` for `duration_s` seconds."""

    asset: Text
    rule: Text
    duration_s: float = Field(gt=0, allow_inf_nan=False)


class Unshelve(_Command):
    """End the shelve of the alarm `rule` on `asset`."""

    asset: Text
    rule: Text


COMMANDS: dict[str, type[_Command]] = {"acknowledge": Acknowledge, "shelve": Shelve, "unshelve": Unshelve}


def command_schema() -> dict[str, Any]:
    """The JSON Schema of every command payload, keyed by command name (docs/schemas/command.schema.json)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "edge-gateway MQTT command payloads, by command (the last topic level)",
        "$defs": {name: model.model_json_schema() for name, model in COMMANDS.items()},
    }


def command_filter(cfg: MqttConfig) -> str:
    """The topic filter the gateway reads commands from."""
    return f"{cfg.topic_prefix}/{cfg.site}/cmd/+/+"


def response_topic(cfg: MqttConfig, user: str) -> str:
    """Where a command's response goes when the command named no MQTT 5 response topic."""
    return f"{cfg.topic_prefix}/{cfg.site}/cmd-response/{user}"


class _Refused(Exception):
    """A command that is answered with an error and changes nothing."""


class CommandHandler:
    """Reads commands from MQTT, applies them to the alarm engine, and answers each one."""

    def __init__(
        self,
        cfg: MqttConfig,
        commands: CommandsConfig,
        engine: AlarmEngine,
        emit: Callable[[AlarmEvent], Awaitable[None]],
        publisher: MqttPublisher,
        store: Store,
    ) -> None:
        self.cfg = cfg
        self.commands = commands
        self.engine = engine
        self._emit = emit
        self._publisher = publisher
        self._store = store
        self._secret = commands.secret()
        self._users = frozenset(commands.users)
        self._queue: asyncio.Queue[IncomingMessage] = asyncio.Queue(QUEUE_SIZE)
        self._answered: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self.executed = 0
        self.refused = 0
        self.dropped = 0

    def on_message(self, msg: IncomingMessage) -> None:
        """Queue a command (called on the event loop by the publisher's subscription)."""
        try:
            self._queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped += 1
            logger.warning("command on %s dropped: %d commands already waiting", msg.topic, QUEUE_SIZE)

    async def run(self) -> None:
        """Execute queued commands one at a time, in arrival order, until cancelled."""
        while True:
            msg = await self._queue.get()
            user = msg.topic.split("/")[-2]
            response = await self.execute(user, msg.topic.rsplit("/", 1)[-1], msg.payload)
            topic = msg.response_topic or response_topic(self.cfg, user)
            try:
                await self._publisher.publish(
                    topic, json.dumps(response).encode(), qos=1, correlation_data=msg.correlation_data
                )
            except PublishError as exc:
                # The command's effect is stored and published through the outbox; only the answer is lost.
                logger.warning("response to %s's %s not delivered: %s", user, response["command"], exc)

    async def execute(self, user: str, name: str, payload: bytes) -> dict[str, Any]:
        """Validate, authorize and apply one command; the response to send, success or not."""
        response: dict[str, Any] = {"schema": RESPONSE_SCHEMA, "command": name, "command_id": None}
        try:
            body = _parse(payload)
            if isinstance(body.get("command_id"), str):
                response["command_id"] = body["command_id"]
            self._authorize(user, body)
            model = COMMANDS.get(name)
            if model is None:
                raise _Refused(f"unknown command {name!r}; known: {', '.join(COMMANDS)}")
            try:
                command = model.model_validate(body)
            except ValidationError as exc:
                raise _Refused("; ".join(_describe(e) for e in exc.errors())) from None
            key = (user, command.command_id) if command.command_id else None
            if key is not None:
                done = await self._answered_before(key, response)
                if done is not None:
                    return done
            event = await self._apply(command, user)
        except _Refused as exc:
            self.refused += 1
            logger.warning("command %s from %s refused: %s", name, user, exc)
            return {**response, "ok": False, "error": str(exc), "at": iso_utc(time.time_ns())}
        self.executed += 1
        logger.info("command %s from %s: alarm %s is now %s", name, user, event.alarm_id, event.state)
        response.update(_success(CommandRecord(event.alarm_id, event.event_id, event.state, event.decided_at_ns)))
        if key is not None:
            self._answered[key] = response
            while len(self._answered) > MAX_REMEMBERED:
                self._answered.popitem(last=False)
        return response

    async def _answered_before(self, key: tuple[str, str], response: dict[str, Any]) -> dict[str, Any] | None:
        """The answer to an earlier execution of this (user, command_id), from memory or the store."""
        if key in self._answered:
            return {**self._answered[key], "duplicate": True}
        record = await self._store.command_record(*key)
        if record is None:
            return None
        return {**response, **_success(record), "duplicate": True}

    def _authorize(self, user: str, body: dict[str, Any]) -> None:
        if user in self._users:
            return
        given = body.get("secret")
        if self._secret is not None and isinstance(given, str) and hmac.compare_digest(given, self._secret):
            return
        raise _Refused(f"{user!r} is not authorized to command this gateway")

    async def _apply(self, command: _Command, user: str) -> AlarmEvent:
        """The engine transition a valid, authorized command asks for, stored and published."""
        now = time.time_ns()
        try:
            if isinstance(command, Acknowledge):
                event = self.engine.acknowledge(command.alarm_id, by=user, now_ns=now)
            elif isinstance(command, Shelve):
                if command.duration_s > self.commands.max_shelve_s:
                    raise _Refused(f"duration_s must be at most {self.commands.max_shelve_s:g}")
                until = now + int(command.duration_s * 1e9)
                event = self.engine.shelve(command.rule, command.asset, until_ns=until, by=user, now_ns=now)
            else:
                assert isinstance(command, Unshelve)
                event = self.engine.unshelve(command.rule, command.asset, by=user, now_ns=now)
        except CommandError as exc:
            raise _Refused(str(exc)) from None
        event = replace(event, command_id=command.command_id)
        await self._emit(event)
        return event


def _success(record: CommandRecord) -> dict[str, Any]:
    """The fields of a successful response: the transition the command caused."""
    return {
        "ok": True, "error": None, "alarm_id": record.alarm_id, "event_id": record.event_id,
        "state": record.state, "at": iso_utc(record.decided_at_ns),
    }  # fmt: skip


def _parse(payload: bytes) -> dict[str, Any]:
    """The command's JSON object; _Refused for anything else."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _Refused(f"payload of {len(payload)} bytes; at most {MAX_PAYLOAD_BYTES}")
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Refused(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _Refused("the payload must be a JSON object")
    return body


def _describe(error: Any) -> str:
    """One pydantic error as `field: message`, never echoing the secret."""
    where = ".".join(str(p) for p in error["loc"]) or "payload"
    msg = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
    return f"{where}: {msg}"


if __name__ == "__main__":  # `make schemas` writes docs/schemas/command.schema.json with this
    print(json.dumps(command_schema(), indent=2, sort_keys=True))
