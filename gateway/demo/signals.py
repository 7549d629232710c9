"""Physics-flavoured signals of a fleet of centrifugal pumps, shared by the simulator and training.

Affinity laws tie the tags together (flow ~ speed, pressure ~ speed^2, power ~ speed^3), so a model
that learns normal operation learns those relations, and a bearing fault that raises vibration and
temperature at a given speed stands out even while the operator changes the speed.
"""

from __future__ import annotations

import numpy as np

TAGS: tuple[str, ...] = (
    "vibration_x",
    "vibration_y",
    "temperature",
    "pressure",
    "current",
    "speed",
    "flow",
    "power",
)
UNITS: dict[str, str] = {
    "vibration_x": "mm/s",
    "vibration_y": "mm/s",
    "temperature": "degC",
    "pressure": "bar",
    "current": "A",
    "speed": "rpm",
    "flow": "m3/h",
    "power": "kW",
}
RATED_SPEED = 1480.0
_NOISE = np.array([0.08, 0.08, 0.05, 0.02, 0.15, 2.0, 0.4, 0.08])


class PumpFleet:
    """State of `n` pumps advanced in fixed steps; `fault[i]` in [0, 1] is bearing damage of pump i."""

    def __init__(self, n_pumps: int, seed: int = 0) -> None:
        self.n = n_pumps
        self.rng = np.random.default_rng(seed)
        self.speed_sp = self.rng.uniform(0.75, 1.0, n_pumps) * RATED_SPEED
        self.speed = self.speed_sp.copy()
        self.temp = 45.0 + 10.0 * (self.speed / RATED_SPEED) ** 3
        self.fault = np.zeros(n_pumps)
        self._next_change = self.rng.uniform(20.0, 60.0, n_pumps)
        self.t = 0.0

    def step(self, dt: float) -> np.ndarray:
        """Advance by dt seconds; returns a [n, len(TAGS)] float64 array of tag values."""
        self.t += dt
        due = self.t >= self._next_change
        if due.any():
            # Operators move the setpoint every 20-60 s within the normal operating band.
            self.speed_sp[due] = self.rng.uniform(0.75, 1.0, int(due.sum())) * RATED_SPEED
            self._next_change[due] = self.t + self.rng.uniform(20.0, 60.0, int(due.sum()))
        alpha = min(1.0, dt / 3.0)
        self.speed += alpha * (self.speed_sp - self.speed)
        r = self.speed / RATED_SPEED
        flow = 120.0 * r
        pressure = 6.0 * r**2
        power = 30.0 * r**3 * (1.0 + 0.15 * self.fault)
        current = power * 1000.0 / (np.sqrt(3) * 400.0 * 0.88)
        temp_target = 45.0 + 10.0 * r**3 + 25.0 * self.fault
        self.temp += min(1.0, dt / 8.0) * (temp_target - self.temp)
        vib = 1.2 * r + 6.0 * self.fault**1.5
        # A damaged bearing adds an impulsive component that the RMS picks up irregularly.
        impulses = self.fault * self.rng.exponential(1.0, self.n)
        values = np.stack(
            [vib + impulses, 0.9 * vib + 0.8 * impulses, self.temp, pressure, current, self.speed, flow, power],
            axis=1,
        )
        return values + self.rng.normal(0.0, 1.0, values.shape) * _NOISE


def normal_history(n_pumps: int, seconds: float, rate_hz: float, seed: int = 0) -> np.ndarray:
    """[T, n_pumps, len(TAGS)] healthy operation sampled at rate_hz, for training and tests."""
    fleet = PumpFleet(n_pumps, seed)
    steps = int(seconds * rate_hz)
    return np.stack([fleet.step(1.0 / rate_hz) for _ in range(steps)])
