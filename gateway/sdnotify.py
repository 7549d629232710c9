"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram per message to NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)


def _address(value: str) -> str:
    """NOTIFY_SOCKET as a socket address: a leading '@' names the abstract namespace (a NUL byte)."""
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    """Sends state changes to systemd; every method is a no-op returning False outside a notify service.

    A send is one non-blocking datagram: if systemd's queue is full the message is dropped rather than
    stalling the event loop. Failures never raise into the caller; the first one is logged.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env["NOTIFY_SOCKET"]) if env.get("NOTIFY_SOCKET") else None
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._failed = False

    @property
    def enabled(self) -> bool:
        """True when systemd gave a socket (the service runs with Type=notify)."""
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments in one message; True if it was handed to the socket."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, self._address)
        except OSError as exc:
            # systemd gone, or its queue full: the service goes on; the watchdog is what catches a real hang.
            if not self._failed:
                logger.warning(
                    "cannot notify systemd (%s): %s; further failures are not logged", assignments[0], exc
                )
            self._failed = True
            return False
        return True

    def ready(self, status: str) -> bool:
        """Start-up is complete (READY=1), with a status line for `systemctl status`."""
        return self.send("READY=1", _status(status))

    def status(self, text: str) -> bool:
        """A one-line status shown by `systemctl status`."""
        return self.send(_status(text))

    def watchdog(self) -> bool:
        """Keep-alive ping (WATCHDOG=1): the service is making progress."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        """A graceful stop has begun (STOPPING=1)."""
        return self.send("STOPPING=1", _status(status))

    def reloading(self) -> bool:
        """A reload has begun (RELOADING=1); send ready() when it is done.

        MONOTONIC_USEC is what systemd >= 253 requires with Type=notify-reload; older ones ignore it.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def watchdog_interval(self) -> float | None:
        """systemd's WatchdogSec= in seconds, or None when no watchdog watches this process."""
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        # WATCHDOG_PID names the process the watchdog is for: a child that inherited it must not ping.
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        return usec / 1e6


def _status(text: str) -> str:
    """A STATUS= assignment; a newline would end it early, so the text is kept on one line."""
    return "STATUS=" + " ".join(text.split())
