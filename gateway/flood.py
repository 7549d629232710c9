"""Flood control: the system rule `flood`, and the count of alarm onsets per asset that raises it.

The alarm engine (gateway.alarms) owns a FloodTracker and decides what a flood does to the alarms:
the flood alarm is raised and the asset's other alarms are suppressed (reason "flood") until it calms.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from gateway.alarms import FLOOD, AlarmRule, system_rule
from gateway.config import FloodConfig, GatewayConfig

FLOOD_MODEL = "gateway:flood"


def flood_rules(cfg: GatewayConfig, rules: Sequence[AlarmRule], *, version: str) -> list[AlarmRule]:
    """The system rule `flood` on every asset with a model rule; none when flood control is off.

    Its value is a count of alarm onsets, its threshold `max_alarms`; it is raised by the onset that
    makes more than `max_alarms` within `window_s`, and ends by time (`calm_s` without an onset).
    """
    assets = frozenset(a for r in rules if r.kind != "system" for a in r.assets)
    if not cfg.flood.enabled or not assets:
        return []
    return [
        system_rule(
            FLOOD, model=FLOOD_MODEL, output="onsets", level=float(cfg.flood.max_alarms),
            severity=cfg.flood.severity, version=version, assets=assets,
        )  # fmt: skip
    ]


class FloodTracker:
    """Per asset: the times of its latest onsets, whether it is flooded, and counters for status.

    `onset()` is called for every onset of a model alarm, `calmed()` periodically. An asset is flooded
    from the onset that makes more than `max_alarms` in `window_s` until `calm_s` pass without one;
    counting then starts afresh, so the onsets of one flood cannot start the next.
    """

    def __init__(self, cfg: FloodConfig) -> None:
        self.cfg = cfg
        self._window_ns = int(cfg.window_s * 1e9)
        self._calm_ns = int(cfg.calm_s * 1e9)
        # Only the newest max_alarms + 1 onsets can decide whether there were more than max_alarms.
        self._onsets: dict[str, deque[int]] = {}
        # Flooded assets: the time of their latest onset, and the onsets their flood summarized so far.
        self._last_onset_ns: dict[str, int] = {}
        self._in_flood: dict[str, int] = {}
        self.floods_started = 0
        self.floods_ended = 0
        self.onsets = 0
        self.onsets_summarized: dict[str, int] = {}

    def flooded(self, asset: str) -> bool:
        """True while `asset` is flooded."""
        return asset in self._last_onset_ns

    def restore(self, asset: str, now_ns: int) -> None:
        """A flood open at the last stop goes on; its calm time counts from `now_ns` (the restart)."""
        self._last_onset_ns[asset] = now_ns
        self._in_flood[asset] = 0

    def onset(self, asset: str, now_ns: int) -> int | None:
        """Count one onset on `asset`; the onsets in the window if they start a flood now, else None."""
        self.onsets += 1
        if self.flooded(asset):
            self._summarize(asset, 1)
            self._last_onset_ns[asset] = now_ns
            return None
        times = self._onsets.setdefault(asset, deque(maxlen=self.cfg.max_alarms + 1))
        times.append(now_ns)
        count = sum(1 for t in times if t > now_ns - self._window_ns)
        if count <= self.cfg.max_alarms:
            return None
        self.floods_started += 1
        self._last_onset_ns[asset] = now_ns
        self._in_flood[asset] = 0
        self._summarize(asset, 1)  # the onset that starts the flood is announced by the flood alarm
        return count

    def _summarize(self, asset: str, n: int) -> None:
        self._in_flood[asset] += n
        self.onsets_summarized[asset] = self.onsets_summarized.get(asset, 0) + n

    def calmed(self, now_ns: int) -> list[tuple[str, int]]:
        """End the flood of each asset without an onset for `calm_s`: (asset, onsets it summarized)."""
        ended = sorted(a for a, t in self._last_onset_ns.items() if now_ns - t >= self._calm_ns)
        out = []
        for asset in ended:
            del self._last_onset_ns[asset]
            self._onsets.pop(asset, None)
            out.append((asset, self._in_flood.pop(asset)))
        self.floods_ended += len(out)
        return out

    def status(self) -> dict[str, Any]:
        """Counters for Gateway.status(): floods started and ended, assets flooded now, onsets counted."""
        return {
            "floods_started": self.floods_started,
            "floods_ended": self.floods_ended,
            "flooded": sorted(self._last_onset_ns),
            "onsets": self.onsets,
            "onsets_summarized": dict(sorted(self.onsets_summarized.items())),
        }
