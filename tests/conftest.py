"""Shared fixtures. Async tests run their coroutine with asyncio.run() so every test owns its loop."""

from __future__ import annotations

import socket

import pytest

pytest_plugins = ["tests.fixtures_opcua", "tests.fixtures_mqtt"]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    """A free loopback port."""
    return free_port()
