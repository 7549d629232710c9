"""Operator command test helpers: an alarm rule, a CommandHandler running on a real broker, and `ask`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from gateway.alarms import AlarmRule
from gateway.commands import CommandHandler, command_filter
from gateway.sinks.mqtt import MqttPublisher
from tests.fixtures_mqtt import Subscriber

RULE = AlarmRule(
    name="bearing", model="ae", output="score", value_index=0, high=0.8, low=0.6, direction="above",
    on_delay=1, severity="high", kind="anomaly_score", model_version="1", assets=frozenset({"pump01"}),
)  # fmt: skip


@contextlib.asynccontextmanager
async def running_commands(
    handler: CommandHandler, publisher: MqttPublisher
) -> AsyncIterator[CommandHandler]:
    """Subscribe `handler` to the command filter, start `publisher` (its own), and run the handler in a
    task once connected; on exit the task is cancelled (the caller stops the publisher)."""
    publisher.subscribe(command_filter(handler.cfg), handler.on_message)
    await publisher.start()
    task = asyncio.create_task(handler.run())
    try:
        assert await publisher.wait_connected(10), publisher.stats.last_error
        yield handler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def ask(client: Subscriber, user: str, command: str, body: Any, **props: Any) -> dict[str, Any]:
    """Publish one command and await its response on the client's subscription (`client.messages[-1]`)."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    before = len(client.messages)
    client.publish(f"edge/plant1/cmd/{user}/{command}", payload, **props)
    msgs = await client.await_for(lambda m: len([x for x in m[before:] if "/cmd/" not in x.topic]) >= 1)
    return json.loads([m for m in msgs[before:] if "/cmd/" not in m.topic][0].payload)
