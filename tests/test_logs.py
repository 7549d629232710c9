"""Logs for journald: priority prefixes when systemd says stderr is the journal, repeated errors counted."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from gateway.logs import JournalFormatter, RepeatFilter


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(msg: str, *args: object, level: int = logging.ERROR, name: str = "gateway.sources.opcua") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_an_identical_error_within_the_window_is_held_back_and_counted_on_the_next_one() -> None:
    clock = _Clock()
    f = RepeatFilter(window_s=60, clock=clock)
    passed = [f.filter(_record("plc1: cannot connect: %s", "refused"))]
    for _ in range(5):
        clock.now += 10
        passed.append(f.filter(_record("plc1: cannot connect: %s", "refused")))
    assert passed == [True, False, False, False, False, False]
    # Another text, level or logger is not a repeat.
    assert f.filter(_record("plc1: cannot connect: %s", "timeout"))
    assert f.filter(_record("plc1: cannot connect: %s", "refused", level=logging.WARNING))
    assert f.filter(_record("plc1: cannot connect: %s", "refused", name="gateway.sinks.mqtt"))
    clock.now += 15  # 65 s after the first passed
    again = _record("plc1: cannot connect: %s", "refused")
    assert f.filter(again)
    assert again.getMessage() == "plc1: cannot connect: refused (and 5 more time(s) in the last 65 s)"
    # The count starts afresh after it was reported.
    clock.now += 61
    plain = _record("plc1: cannot connect: %s", "refused")
    assert f.filter(plain) and plain.getMessage() == "plc1: cannot connect: refused"


def test_info_is_never_held_back() -> None:
    f = RepeatFilter(window_s=60, clock=_Clock())
    assert all(f.filter(_record("health %s", "ok", level=logging.INFO)) for _ in range(3))


def test_journal_lines_carry_the_syslog_priority_on_every_line() -> None:
    fmt = JournalFormatter()
    assert fmt.format(_record("disk full")) == "<3>ERROR gateway.sources.opcua: disk full"
    assert fmt.format(_record("up", level=logging.INFO, name="gateway.app")) == "<6>INFO gateway.app: up"
    two = fmt.format(_record("a\nb", level=logging.WARNING))
    assert two.splitlines() == ["<4>WARNING gateway.sources.opcua: a", "<4>b"]


def _child_stderr(env: dict[str, str], journal_stream: bool) -> str:
    """stderr of a child that sets up logging and logs one warning, with JOURNAL_STREAM naming its stderr or not."""
    code = (
        "import logging; from gateway.logs import setup_logging; setup_logging('info'); "
        "logging.getLogger('gateway.app').warning('mqtt down')"
    )
    read, write = os.pipe()
    try:
        st = os.fstat(write)
        if journal_stream:
            env = {**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-c", code], stderr=write, env=env, check=True, timeout=60)
    finally:
        os.close(write)
    with os.fdopen(read) as r:
        return r.read()


def test_under_systemd_the_journal_format_is_chosen_by_the_stream_itself() -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    assert _child_stderr(env, journal_stream=True) == "<4>WARNING gateway.app: mqtt down\n"
    plain = _child_stderr(env, journal_stream=False)
    assert plain.endswith(" WARNING gateway.app: mqtt down\n") and not plain.startswith("<")
    # A JOURNAL_STREAM that names another file (inherited by a child, say) is not believed.
    assert not _child_stderr({**env, "JOURNAL_STREAM": "1:2"}, journal_stream=False).startswith("<")
