"""A restart's view of the alarms: the states open at the last stop, and why assets were suppressed."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from typing import NamedTuple

from gateway.alarms import ANNUNCIATED, FLOOD, AlarmRule, AlarmState
from gateway.store import OpenAlarm

logger = logging.getLogger(__name__)


class Restored(NamedTuple):
    """What a restart takes over from the store: the open alarms' states and why assets are suppressed."""

    states: dict[tuple[str, str], AlarmState]
    suppressed: dict[str, set[str]]


def restore_alarms(
    open_alarms: Iterable[OpenAlarm], rules: Sequence[AlarmRule], *, running: Collection[str]
) -> Restored:
    """The engine's start from the alarms open at the last stop (Store.open_alarms, oldest first).

    Each keeps its state, id and seq: cleared or acknowledged later, never raised again. An active
    (or shelved, with suppressed alarms) flood alarm restores its asset's flood, whose calm time
    counts from the restart; a suppressed alarm of an asset with a running tag (`running`) restores
    the reason "stopped" until the tag next reads Good.
    """
    covered = {(r.name, a) for r in rules for a in r.assets}
    flood_assets = {a for r in rules if r.name == FLOOD and r.kind == "system" for a in r.assets}
    states: dict[tuple[str, str], AlarmState] = {}
    for alarm in open_alarms:
        if (alarm.rule, alarm.asset) not in covered:
            logger.warning(
                "alarm %s (%s on %s) is open in the store but no configured rule covers it any more",
                alarm.alarm_id,
                alarm.rule,
                alarm.asset,
            )
            continue
        # One open occurrence per (rule, asset); the newest wins should an older one linger.
        states[(alarm.rule, alarm.asset)] = AlarmState(
            state=alarm.state,  # type: ignore[arg-type]
            # Active means its condition was present; shelved or suppressed ones are judged afresh.
            abnormal=alarm.state in ANNUNCIATED,
            alarm_id=alarm.alarm_id,
            seq=alarm.seq,
            first_abnormal_source_ts_ns=alarm.first_abnormal_source_ts_ns,
            raised_value=alarm.raised_value,
            raised_at_ns=alarm.raised_at_ns,
            shelved_until_ns=alarm.shelved_until_ns,
        )
    held = {asset for (_, asset), st in states.items() if st.state == "suppressed"}
    suppressed: dict[str, set[str]] = {}
    for (rule, asset), st in states.items():
        if (
            rule == FLOOD
            and asset in flood_assets
            and (st.state in ANNUNCIATED or (st.state == "shelved" and asset in held))
        ):
            suppressed.setdefault(asset, set()).add(FLOOD)
    for asset in held & set(running):
        suppressed.setdefault(asset, set()).add("stopped")
    for asset in sorted(held - set(suppressed)):
        logger.warning("asset %s has suppressed alarms and no running tag or flood to lift them", asset)
    return Restored(states, suppressed)
