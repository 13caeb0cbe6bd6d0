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
    scale   base + slope * clip(rate - threshold, 0, saturation - threshold)
                                             multiplies the step's device time

            scale |          ________  saturation: at the cap, the clock stops falling
                  |         /
                  |________/           base: the clock of light work
                  +--------------------- rate

A step's scale is read from the rate at its start (the steps before it), then the step feeds
the rate. With ``scales_decode`` False, decode-only steps keep their time: they read the
weights and the KV from memory, and do not follow the SM clock (llama-8b on the H200: about
1.01 and 0.98 of the fit at 1,950 and 1,600 MHz, where its steps with prompt tokens ran at
about 0.9 and 1.0).

``PowerCap.fit`` finds the numbers from real runs: each step's device time over the profile's
device fit (``python -m harness.calibrate REAL... --profile P --power FILE``).
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
    saturation: float = math.inf  # rows/s above which it rises no more
    scales_decode: bool = True  # False: decode-only steps keep their time

    def __post_init__(self) -> None:
        for name in ("tau_s", "threshold", "base", "slope", "saturation"):
            value = getattr(self, name)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            is_unbounded = name == "saturation" and value == math.inf
            if not (is_number and (math.isfinite(value) or is_unbounded)):
                raise ValueError(f"power cap: {name} must be a finite number, got {value!r}")
        if not (self.tau_s > 0 and self.base > 0 and self.threshold >= 0 and self.slope >= 0):
            raise ValueError(
                f"power cap: needs tau_s > 0, base > 0, threshold >= 0, slope >= 0: {self}"
            )
        if not self.saturation > self.threshold:
            raise ValueError(f"power cap: needs saturation > threshold: {self}")
        if not isinstance(self.scales_decode, bool):
            raise ValueError(f"power cap: scales_decode must be true or false: {self}")

    def scale(self, rate: float) -> float:
        """The device-time scale at a recent work ``rate`` (rows/s)."""
        if rate <= self.threshold:
            return self.base
        return self.base + self.slope * (min(rate, self.saturation) - self.threshold)

    def scale_of_step(self, rate: float, is_decode: bool) -> float:
        """The scale of a step at ``rate``: 1 for a decode-only step unless ``scales_decode``."""
        return 1.0 if is_decode and not self.scales_decode else self.scale(rate)

    def state(self) -> PowerState:
        return PowerState(self)

    def scales_along(
        self,
        start: Sequence[float],
        seconds: Sequence[float],
        rows: Sequence[float],
        is_decode: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """Each step's scale on a timeline of steps in time order (start, wall seconds, padded
        rows, whether decode-only; None: none is): what a simulation with this cap reads, given
        those steps' times."""
        rates = rates_along(self.tau_s, start, seconds, rows)
        decode = np.zeros(len(rates), bool) if is_decode is None else np.asarray(is_decode, bool)
        return np.array(
            [self.scale_of_step(r, d) for r, d in zip(rates.tolist(), decode.tolist(), strict=True)]
        )

    @classmethod
    def fit(
        cls,
        runs: Sequence[RunSteps],
        taus_s: Sequence[float] = TAUS_S,
        scales_decode: bool = True,
    ) -> PowerCap:
        """Least squares of each device-bound step's measured over predicted device time on
        the clipped hinge of its rate, every step weighted by its predicted time (the seconds a
        queue adds up), over every ``tau_s`` of ``taus_s``, thresholds at the rates' 0, 5, ...,
        95th percentiles and saturations at those above the threshold or none; the best. The
        slope is kept at 0 or more (a flat fit otherwise: ``cost_model._least_squares``'s rule
        for costs). ``scales_decode`` False: fitted to the steps with prompt tokens alone, and
        decode-only steps keep their time."""
        masks = [r.fitted_mask(scales_decode) for r in runs]
        if not any(m.any() for m in masks):
            raise ValueError("power cap: no device-bound step with a device time to fit")
        best: tuple[float, PowerCap] | None = None
        for tau in taus_s:
            rates = np.concatenate([r.rates(tau)[m] for r, m in zip(runs, masks, strict=True)])
            ratio = np.concatenate([r.ratio[m] for r, m in zip(runs, masks, strict=True)])
            weight = np.concatenate([r.predicted[m] for r, m in zip(runs, masks, strict=True)])
            levels = np.unique(np.percentile(rates, np.arange(0, 100, 5)))
            for threshold in levels:
                for saturation in [*levels[levels > threshold], math.inf]:
                    x = np.clip(rates - threshold, 0.0, saturation - threshold)
                    design = np.column_stack([np.ones_like(x), x])
                    base, slope = map(float, _least_squares(design, ratio, weight))
                    error = float(np.sum(weight * (ratio - base - slope * x) ** 2))
                    if best is None or error < best[0]:
                        found = (tau, float(threshold), base, slope, float(saturation))
                        best = (error, cls(*found, scales_decode=scales_decode))
        return best[1]

    def explained(self, runs: Sequence[RunSteps]) -> float:
        """The share of the weighted variance of measured over predicted device time, over the
        steps the cap was fitted to, that it explains (0: none; the fit's figure of merit)."""
        pairs = [(r, r.fitted_mask(self.scales_decode)) for r in runs]
        ratio = np.concatenate([r.ratio[m] for r, m in pairs])
        weight = np.concatenate([r.predicted[m] for r, m in pairs])
        scales = np.concatenate(
            [self.scales_along(r.start, r.seconds, r.rows, r.decode_mask)[m] for r, m in pairs]
        )
        spread = np.sum(weight * (ratio - np.average(ratio, weights=weight)) ** 2)
        return float(1 - np.sum(weight * (ratio - scales) ** 2) / spread) if spread > 0 else 0.0

    def save(self, path: str | Path, measured: dict[str, Any] | None = None) -> None:
        """JSON: the numbers (no saturation: null), and ``measured`` (what they were fitted
        to, and how)."""
        numbers = asdict(self) | {"saturation": _finite_or_none(self.saturation)}
        data = {**numbers, "measured": measured or {}}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PowerCap:
        """Read a cap; files written before ``saturation`` and ``scales_decode`` existed get
        their defaults (none, and true)."""
        data = read_json_object(Path(path), "power cap")
        optional = {"saturation": None, "scales_decode": True}
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n not in optional]
        if missing:
            raise ValueError(f"{path}: power cap: missing {', '.join(missing)}")
        values = {n: data.get(n, optional.get(n)) for n in names}
        if values["saturation"] is None:
            values["saturation"] = math.inf
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class PowerState:
    """One run's recent work rate (rows/s, module doc), fed step by step in time order."""

    __slots__ = ("_last_end", "cap", "rate")

    def __init__(self, cap: PowerCap):
        self.cap = cap
        self.rate = 0.0
        self._last_end = 0.0

    def scale_at(self, start: float, is_decode: bool = False) -> float:
        """The device-time scale of a step starting at ``start`` (decode-only or not): the
        rate decays over any idle time since the last step ended."""
        if start > self._last_end:
            self.rate *= math.exp((self._last_end - start) / self.cap.tau_s)
            self._last_end = start
        return self.cap.scale_of_step(self.rate, is_decode)

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
    is_decode: np.ndarray | None = None  # bool: decode-only steps (None: none is)

    @property
    def decode_mask(self) -> np.ndarray:
        if self.is_decode is None:
            return np.zeros(len(self.start), bool)
        return np.asarray(self.is_decode, bool)

    def fitted_mask(self, scales_decode: bool) -> np.ndarray:
        """The steps a cap is fitted to: ``is_fitted``, less the decode-only steps where the
        cap leaves them alone."""
        return self.is_fitted if scales_decode else self.is_fitted & ~self.decode_mask

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
