"""Sources fill the latest-value table from a PLC; one module per protocol."""

from __future__ import annotations

from typing import Any, Protocol


class Source(Protocol):
    """A PLC connection that keeps its tags' rows of `LatestValues` current.

    Lifecycle: the composition root calls `run()` once in its own task and cancels that task to stop
    it. `run()` connects, reads and reconnects by itself until cancelled; it never raises for I/O
    errors (refused, timeout, lost session, Bad service results). While disconnected it marks every
    one of its tags Bad, so samplers see a gap rather than a frozen value. On cancellation it closes
    the connection within its configured timeout and re-raises CancelledError. Any other exception
    is a bug and ends the task. `stats` is read at any time for health reporting.
    """

    name: str
    stats: Any

    async def run(self) -> None:
        """Acquire until cancelled."""
        ...

    async def wait_connected(self, timeout: float) -> bool:
        """True once connected (now or within `timeout` seconds), False if the timeout passed first."""
        ...
