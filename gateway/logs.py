"""Logging for a daemon read through journald: a level on every line, and repeated errors counted, not repeated.

Under systemd (stderr connected to the journal, which systemd announces in JOURNAL_STREAM) each line
starts with a syslog priority prefix `<N>`: journald stores it as the entry's priority, so
`journalctl -u edge-gateway -p warning` filters by level, and it adds the time itself. Elsewhere lines
carry the time. Both name the component (the logger, e.g. `gateway.sources.opcua`).

A WARNING or worse whose text is identical to one logged less than `window_s` ago is held back and
counted; the next time it passes it says how many were held back. A PLC that is down therefore gives
one line a minute, not one per retry, and the count still tells how often it happened.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TextIO

REPEAT_WINDOW_S = 60.0
# Distinct messages remembered for the repeat count; beyond it the oldest are forgotten (LRU).
MAX_REMEMBERED = 1024
_OURS = "_edge_gateway_handler"
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class RepeatFilter(logging.Filter):
    """Holds back a WARNING+ record identical to one passed within `window_s`, and counts it."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        # (logger, level, text) -> [time it last passed, records held back since]
        self._seen: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat within the window; a passing record after repeats says how many there were."""
        if record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        key = (record.name, record.levelno, text)
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.window_s:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{text} (and {int(seen[1])} more time(s) in the last {now - seen[0]:.0f} s)"
            record.args = None
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > MAX_REMEMBERED:
            self._seen.popitem(last=False)
        return True


class JournalFormatter(logging.Formatter):
    """`<priority>LEVEL component: message`: journald takes the priority, and adds time and unit."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record with its syslog priority prefix on every line (a traceback keeps its level)."""
        prefix = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def logs_to_journal(stream: TextIO) -> bool:
    """True when systemd connected `stream` to the journal (JOURNAL_STREAM names its device and inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """One line per record with level and component, journald-ready under systemd; repeats counted."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if logs_to_journal(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper()))
    # Called again (main() run twice in one process, as tests do): replace ours, never stack them.
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    # asyncua logs each connect at INFO and a lost link as several WARNINGs; the source logs one line.
    logging.getLogger("asyncua").setLevel(logging.ERROR)
