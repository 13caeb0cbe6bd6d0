"""Open-loop arrival processes: ``n`` arrival times in seconds, starting at 0, sorted.

The first request arrives at t=0 and each later one one gap after the previous (as vLLM's
benchmark sends a request, then sleeps), so ``n`` requests span ``n - 1`` gaps and the mean gap
is ``1 / rate``. Gaps follow vLLM: Gamma(shape=burstiness, scale=1/(rate*burstiness)); burstiness
1 is Poisson, < 1 burstier, infinite is constant; an infinite rate sends everything at t=0.

Closed loop (a fixed number of requests in flight) is not an arrival process: the workload
carries ``concurrency`` and its arrival times are all 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .base import WorkloadError

PROCESSES = ("all_at_once", "constant", "poisson", "gamma")
ARRIVAL_KEYS = ("process", "rate", "burstiness")


def _check(n: int, rate: float) -> None:
    if n < 0:
        raise WorkloadError(f"number of requests must be >= 0, got {n}")
    if not rate > 0:  # also rejects NaN
        raise WorkloadError(f"arrival rate must be > 0 req/s, got {rate}")


def _from_gaps(gaps: np.ndarray) -> np.ndarray:
    times = np.zeros(len(gaps) + 1)
    np.cumsum(gaps, out=times[1:])
    return times


def all_at_once(n: int) -> np.ndarray:
    """Every request at t=0 (rate infinite)."""
    return np.zeros(max(n, 0))


def constant(n: int, rate: float) -> np.ndarray:
    """Evenly spaced, ``1 / rate`` apart."""
    _check(n, rate)
    if math.isinf(rate):
        return all_at_once(n)
    return np.arange(n) / rate


def gamma(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma-distributed gaps with mean ``1 / rate``; the coefficient of variation of the gaps is
    ``1 / sqrt(burstiness)``."""
    _check(n, rate)
    if not burstiness > 0:
        raise WorkloadError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate) or n == 0:
        return all_at_once(n)
    if math.isinf(burstiness):
        return constant(n, rate)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return _from_gaps(gaps)


def poisson(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Exponential gaps with mean ``1 / rate`` (Gamma with burstiness 1)."""
    return gamma(n, rate, 1.0, rng)


def arrival_times(n: int, cfg: Mapping[str, object] | None, rng: np.random.Generator) -> np.ndarray:
    """Arrival times from a config ``{process, rate, burstiness}``. ``None`` or an empty mapping
    means ``all_at_once``; ``process`` defaults to ``gamma`` when ``burstiness`` is given, else
    ``poisson``; ``rate`` defaults to infinity (all at t=0)."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(ARRIVAL_KEYS))
    if unknown:
        raise WorkloadError(
            f"unknown arrival key {unknown[0]!r}; allowed: {', '.join(ARRIVAL_KEYS)}"
        )
    if not cfg:
        return all_at_once(n)
    process = cfg.get("process", "gamma" if "burstiness" in cfg else "poisson")
    try:
        rate = float(cfg.get("rate", math.inf))
        burstiness = float(cfg.get("burstiness", 1.0))
    except (TypeError, ValueError) as exc:
        raise WorkloadError(f"arrival rate and burstiness must be numbers: {exc}") from None
    if process == "all_at_once":
        return all_at_once(n)
    if process == "constant":
        return constant(n, rate)
    if process == "poisson":
        if "burstiness" in cfg and burstiness != 1.0:
            raise WorkloadError("poisson arrivals have burstiness 1; use process 'gamma'")
        return poisson(n, rate, rng)
    if process == "gamma":
        return gamma(n, rate, burstiness, rng)
    raise WorkloadError(f"unknown arrival process {process!r}; allowed: {', '.join(PROCESSES)}")
