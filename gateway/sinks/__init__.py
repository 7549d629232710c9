"""Sinks: where alarm events go after they are stored (MQTT today)."""

from __future__ import annotations

from typing import Protocol


class Sink(Protocol):
    """A destination for stored alarm events.

    Lifecycle: `start()` once, before the first `publish()`; it must not wait for the remote side
    (a broker that is down is retried in the background, never a startup failure). `publish()` may
    be called concurrently and returns only once the remote side acknowledged the message; it
    raises `gateway.errors.PublishError` when not connected, refused or not acknowledged in time,
    and the caller keeps the message (the store's outbox) and retries later. `stop()` is called
    once at shutdown, after the last `publish()`; it is bounded by `timeout` and never raises.
    """

    @property
    def connected(self) -> bool:
        """True while the remote side is reachable."""
        ...

    async def start(self) -> None:
        """Begin connecting in the background."""
        ...

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float | None = None,
        expiry_s: int = 0,
    ) -> None:
        """Deliver one message (discarded by the remote side after `expiry_s` > 0); returns after the acknowledgement."""
        ...

    async def stop(self, timeout: float = 2.0) -> None:
        """Flush what can be flushed within `timeout` and disconnect."""
        ...
