"""The GPU's power cap, simulated: a device that slows down while the work has been heavy.

An H200 holds its board under 700 W by lowering its SM clock. Steps of long prompts back to
back keep it at the cap, at 1,550-1,600 MHz; lighter work runs near the 1,980 MHz maximum, and
the same step then takes 4-5% less device time (docs/performance.md, "Power"). What sets the
clock is the work of the last moments, not the step alone: over llama-8b's real steps, how
heavy the steps before were explains three times as much of the device time's departure from
the profile's fit as the step's own size does.

``PowerCap`` models that with one signal, the GEMM rows the device has run per second,
averaged exponentially over the last ``tau_s`` seconds (idle time counts as none)::

    rate    ___/```````\\____/````          rows/s of the steps, smoothed over tau_s
    scale   base + slope * max(0, rate - threshold)   multiplies the step's device time

A step's scale is read from the rate at its start (the steps before it), then the step feeds
the rate. ``PowerCap.fit`` finds the four numbers from real runs: each step's device time over
the profile's device fit (``python -m harness.calibrate REAL... --profile P --power FILE``).
``PowerState`` is one run's rate, in the simulated engine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from engine.sim.cost_model import _least_squares
from engine.sim.profile import read_json_object

# The averaging times tried by the fit (s): the clock follows the power within tens of ms;
# the fit picks the one that explains the most.
TAUS_S = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class PowerCap:
    """A device's time as a function of its recent work (module doc)."""

    tau_s: float  # the rate's averaging time
    threshold: float  # rows/s below which the work does not slow the device
    base: float  # the scale at or below the threshold
    slope: float  # the scale's rise per row/s above it

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"power cap: {name} must be a finite number, got {value!r}")
        if not (self.tau_s > 0 and self.base > 0 and self.threshold >= 0 and self.slope >= 0):
            raise ValueError(
                f"power cap: needs tau_s > 0, base > 0, threshold >= 0, slope >= 0: {self}"
            )

    def scale(self, rate: float) -> float:
        """The device-time scale at a recent work ``rate`` (rows/s)."""
        return self.base + self.slope * max(0.0, rate - self.threshold)

    def state(self) -> PowerState:
        return PowerState(self)

    def scales_along(
        self, start: Sequence[float], seconds: Sequence[float], rows: Sequence[float]
    ) -> np.ndarray:
        """Each step's scale on a timeline of steps in time order (start, wall seconds, padded
        rows): what a simulation with this cap reads, given those steps' times."""
        return np.array([self.scale(r) for r in rates_along(self.tau_s, start, seconds, rows)])

    @classmethod
    def fit(cls, runs: Sequence[RunSteps], taus_s: Sequence[float] = TAUS_S) -> PowerCap:
        """Least squares of each device-bound step's measured over predicted device time on
        the hinge of its rate, every step weighted by its predicted time (the seconds a queue
        adds up), over every ``tau_s`` of ``taus_s`` and thresholds at the rates' 0, 5, ...,
        95th percentiles; the best. The slope is kept at 0 or more (a flat fit otherwise:
        ``cost_model._least_squares``'s rule for costs)."""
        if not runs or not any(r.is_fitted.any() for r in runs):
            raise ValueError("power cap: no device-bound step with a device time to fit")
        best: tuple[float, PowerCap] | None = None
        for tau in taus_s:
            rates = np.concatenate([r.rates(tau)[r.is_fitted] for r in runs])
            ratio = np.concatenate([r.ratio[r.is_fitted] for r in runs])
            weight = np.concatenate([r.predicted[r.is_fitted] for r in runs])
            for threshold in np.unique(np.percentile(rates, np.arange(0, 100, 5))):
                x = np.maximum(0.0, rates - threshold)
                design = np.column_stack([np.ones_like(x), x])
                base, slope = map(float, _least_squares(design, ratio, weight))
                error = float(np.sum(weight * (ratio - base - slope * x) ** 2))
                if best is None or error < best[0]:
                    best = (error, cls(tau, float(threshold), base, slope))
        return best[1]

    def explained(self, runs: Sequence[RunSteps]) -> float:
        """The share of the steps' weighted variance of measured over predicted device time
        that the cap explains (0: none; the fit's own figure of merit)."""
        ratio = np.concatenate([r.ratio[r.is_fitted] for r in runs])
        weight = np.concatenate([r.predicted[r.is_fitted] for r in runs])
        scales = np.concatenate(
            [np.array([self.scale(v) for v in r.rates(self.tau_s)])[r.is_fitted] for r in runs]
        )
        spread = np.sum(weight * (ratio - np.average(ratio, weights=weight)) ** 2)
        return float(1 - np.sum(weight * (ratio - scales) ** 2) / spread) if spread > 0 else 0.0

    def save(self, path: str | Path, measured: dict[str, Any] | None = None) -> None:
        """JSON: the four numbers, and ``measured`` (what they were fitted to, and how)."""
        data = {**asdict(self), "measured": measured or {}}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PowerCap:
        data = read_json_object(Path(path), "power cap")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{path}: power cap: missing {', '.join(missing)}")
        try:
            return cls(**{n: data[n] for n in names})
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


class PowerState:
    """One run's recent work rate (rows/s, module doc), fed step by step in time order."""

    __slots__ = ("_last_end", "cap", "rate")

    def __init__(self, cap: PowerCap):
        self.cap = cap
        self.rate = 0.0
        self._last_end = 0.0

    def scale_at(self, start: float) -> float:
        """The device-time scale of a step starting at ``start``: the rate decays over any
        idle time since the last step ended."""
        if start > self._last_end:
            self.rate *= math.exp((self._last_end - start) / self.cap.tau_s)
            self._last_end = start
        return self.cap.scale(self.rate)

    def observe(self, start: float, seconds: float, rows: int) -> None:
        """A step of ``rows`` padded rows ran from ``start`` for ``seconds``."""
        kept = math.exp(-seconds / self.cap.tau_s)
        self.rate = self.rate * kept + (1 - kept) * rows / seconds
        self._last_end = max(self._last_end, start + seconds)


@dataclass(frozen=True)
class RunSteps:
    """One real run's steps in time order, as ``PowerCap.fit`` takes them: start (s), wall
    seconds and padded rows of every step, and measured and predicted device seconds, the ones
    to fit marked (device-bound steps with a device time)."""

    start: np.ndarray
    seconds: np.ndarray
    rows: np.ndarray
    measured: np.ndarray
    predicted: np.ndarray
    is_fitted: np.ndarray  # bool

    @property
    def ratio(self) -> np.ndarray:
        return np.divide(
            self.measured, self.predicted, out=np.ones(len(self.start)), where=self.predicted > 0
        )

    def rates(self, tau_s: float) -> np.ndarray:
        """Each step's rate at its start, as ``PowerState`` gives it with ``tau_s``."""
        return rates_along(tau_s, self.start, self.seconds, self.rows)


def rates_along(
    tau_s: float, start: Sequence[float], seconds: Sequence[float], rows: Sequence[float]
) -> np.ndarray:
    """Each step's rate at its start on a timeline of steps in time order, as ``PowerState``
    gives it with ``tau_s`` (a step of no time adds nothing)."""
    state = PowerState(PowerCap(tau_s, 0.0, 1.0, 0.0))
    steps = zip(*(np.asarray(c, float).tolist() for c in (start, seconds, rows)), strict=True)
    out = np.empty(len(start))
    for i, (began, took, num_rows) in enumerate(steps):
        state.scale_at(began)
        out[i] = state.rate
        if took > 0:
            state.observe(began, took, num_rows)
    return out
