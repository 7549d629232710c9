"""The system rule `inference_degraded`: a model runs on a lesser inference backend than it should.

Backend selection (gateway.inference.select) records, per model, each backend it tried and skipped
(`LoadedModel.fallbacks`); a fallback is `degraded` when the model now runs on less than it should.
This is decided once at start, and so again after a reload (which restarts the gateway): raised on
each asset a degraded model serves, cleared when an alarm open from before (restored from SQLite)
finds the model no longer degraded. It goes through the alarm engine like `comm_loss`, so it is
stored, published, acknowledged and restored like any alarm.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.alarms import INFERENCE_DEGRADED, AlarmEngine, AlarmEvent, AlarmRule, system_rule

if TYPE_CHECKING:
    from gateway.models import LoadedModel

logger = logging.getLogger(__name__)

# Raised at one degraded fallback, cleared at none.
_THRESHOLD = 1.0


def degraded_model(model: str) -> str:
    """The pseudo model name under which a model's inference_degraded rule is decided and published.

    Not the model's own name: the engine applies every rule of a model name to that model's windows,
    so the model's score would be judged by this rule too (and this value by the model's rules).
    """
    return f"model:{model}"


def degraded_count(model: LoadedModel) -> int:
    """How many of the model's fallbacks are degraded."""
    return sum(1 for f in model.fallbacks if f.degraded)


def degraded_rules(models: Mapping[str, LoadedModel]) -> list[AlarmRule]:
    """One system rule per model on the assets it serves: value = its degraded fallbacks, raised at 1.

    Built whether or not `inference.degraded_alarm` is on, so that an alarm open from before is
    restored and can clear when the alarm is turned off.
    """
    return [
        # Severity low, advisory: alarms still work, only slower or on the CPU.
        system_rule(
            INFERENCE_DEGRADED, model=degraded_model(name), output="fallbacks", level=_THRESHOLD,
            severity="low", version=model.manifest.version, assets=frozenset(model.columns),
        )  # fmt: skip
        for name, model in models.items()
    ]


def decide_degraded(
    engine: AlarmEngine, models: Mapping[str, LoadedModel], *, enabled: bool, now_ns: int
) -> list[AlarmEvent]:
    """Decide inference_degraded once on each asset a model serves; the events to store and publish.

    An asset several models serve has one such alarm (alarms are per rule name and asset): its value
    counts the degraded fallbacks of them all, under the first degraded model's name. With `enabled`
    off every value is 0, which clears an alarm restored from before.
    """
    for name, model in models.items():
        degraded = [f for f in model.fallbacks if f.degraded]
        if degraded:
            logger.warning(
                "inference degraded: model %s runs on %s%s; %s",
                name,
                model.backend.name,
                "" if enabled else " (inference.degraded_alarm is off: no alarm)",
                "; ".join(f"{f.backend}: {f.reason}" for f in degraded),
            )
    events: list[AlarmEvent] = []
    for asset in sorted({a for m in models.values() for a in m.columns}):
        serving = [(name, m) for name, m in models.items() if asset in m.columns]
        count = sum(degraded_count(m) for _, m in serving) if enabled else 0
        name = next((n for n, m in serving if count and degraded_count(m)), serving[0][0])
        events += engine.decide(
            degraded_model(name), asset, np.array([float(count)]), source_ts_ns=0, now_ns=now_ns
        )
    return events


def inference_status(models: Mapping[str, LoadedModel]) -> dict[str, Any]:
    """The status topic's `inference` object: per model, the backend it runs on and the fallbacks."""
    return {
        name: {
            "backend": model.backend.name,
            "fallbacks": [
                {"backend": f.backend, "reason": f.reason, "degraded": f.degraded} for f in model.fallbacks
            ],
        }
        for name, model in models.items()
    }
