"""The owned-task supervisor and the Pulse that paces sampling on read arrival."""

from __future__ import annotations

import asyncio

import pytest

from gateway.tasks import Pulse, Supervisor, wait_event


def test_pulse_wakes_all_current_waiters_and_times_out_otherwise() -> None:
    async def scenario() -> tuple[list[bool], bool]:
        pulse = Pulse()
        waiters = [asyncio.ensure_future(pulse.wait(10)) for _ in range(3)]
        await asyncio.sleep(0)
        pulse.notify()
        woken = list(await asyncio.gather(*waiters))
        return woken, await pulse.wait(0.01)  # nobody notifies this one

    woken, late = asyncio.run(scenario())
    assert woken == [True, True, True]
    assert late is False


def test_cancel_arriving_with_a_notify_still_cancels() -> None:
    # asyncio.wait_for on 3.10/3.11 can swallow this cancellation; a sampler then would not stop.
    async def scenario() -> asyncio.Task[bool]:
        pulse = Pulse()
        task = asyncio.ensure_future(pulse.wait(10))
        await asyncio.sleep(0)
        pulse.notify()
        task.cancel()
        await asyncio.wait({task})
        return task

    assert asyncio.run(scenario()).cancelled()


def test_supervisor_records_the_first_failure_and_close_cancels_the_rest() -> None:
    async def scenario() -> tuple[Supervisor, asyncio.Task[None]]:
        sup = Supervisor()

        async def boom() -> None:
            raise RuntimeError("stage broke")

        forever = sup.spawn(asyncio.sleep(3600), "forever")
        sup.spawn(boom(), "boom")
        await asyncio.wait_for(sup.failed.wait(), 5)
        await sup.close(timeout=5)
        return sup, forever

    sup, forever = asyncio.run(scenario())
    assert isinstance(sup.failure, RuntimeError) and str(sup.failure) == "stage broke"
    assert forever.cancelled()
    assert sup.running == 0


def test_supervisor_cancel_waits_for_the_task() -> None:
    async def scenario() -> list[str]:
        sup = Supervisor()
        log: list[str] = []

        async def stage() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                log.append("cleaned up")

        task = sup.spawn(stage(), "stage")
        await asyncio.sleep(0)
        await sup.cancel(task, timeout=5)
        log.append("after cancel")
        return log

    assert asyncio.run(scenario()) == ["cleaned up", "after cancel"]


@pytest.mark.parametrize("timeout", [0.0, 0.02])
def test_pulse_wait_with_no_time_left_returns_false(timeout: float) -> None:
    assert asyncio.run(Pulse().wait(timeout)) is False


def test_wait_event_reports_set_or_timeout_and_never_swallows_a_cancel() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_event(event, 0.01)
        task = asyncio.ensure_future(wait_event(event, 10))
        await asyncio.sleep(0)
        event.set()
        task.cancel()
        await asyncio.wait({task})
        return timed_out, await wait_event(event, 10), task.cancelled()

    assert asyncio.run(scenario()) == (False, True, True)
