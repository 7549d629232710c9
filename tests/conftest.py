"""Shared fixtures. Async tests run their coroutine with asyncio.run() so every test owns its loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.demo.run import free_port

pytest_plugins = ["tests.fixtures_opcua", "tests.fixtures_mqtt", "tests.fixtures_security"]


@pytest.fixture
def port() -> int:
    """A free loopback port."""
    return free_port()


async def wait_for_condition(
    pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll `pred` on the loop until it holds; AssertionError after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(0.01)


__all__ = ["free_port", "wait_for_condition"]
