"""Length distributions for prompts and outputs: each draws ``n`` ints >= 1 from a seeded numpy
Generator.

Config form (``length_dist``): an int is ``fixed``; a mapping names ``dist`` and its keys:
``fixed {value}``, ``uniform {low, high}`` (inclusive), ``lognormal {median, sigma, min=1,
max=None}`` (clipped to [min, max]), ``empirical {path, column}`` (``column`` is ``input`` or
``output``; resampled with replacement from an Azure, BurstGPT or Mooncake file).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .base import WorkloadError


class LengthDist(Protocol):
    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` lengths (int64, each >= 1)."""
        ...


@dataclass(frozen=True)
class Fixed:
    value: int

    def __post_init__(self) -> None:
        if self.value < 1:
            raise WorkloadError(f"fixed length must be >= 1, got {self.value}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


@dataclass(frozen=True)
class Uniform:
    low: int
    high: int  # inclusive

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise WorkloadError(
                f"uniform lengths need 1 <= low <= high, got {self.low}..{self.high}"
            )

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)


@dataclass(frozen=True)
class LogNormal:
    """exp(Normal(log(median), sigma)), rounded, clipped to [min, max]."""

    median: float
    sigma: float
    min: int = 1
    max: int | None = None

    def __post_init__(self) -> None:
        if not (self.median > 0 and self.sigma >= 0 and self.min >= 1):
            raise WorkloadError(
                f"lognormal lengths need median > 0, sigma >= 0, min >= 1; got {self}"
            )
        if self.max is not None and self.max < self.min:
            raise WorkloadError(f"lognormal max {self.max} is below min {self.min}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        x = np.rint(rng.lognormal(math.log(self.median), self.sigma, size=n))
        hi = np.inf if self.max is None else self.max
        return np.clip(x, self.min, hi).astype(np.int64)


@dataclass(frozen=True)
class Empirical:
    """Resampling (with replacement) of observed lengths."""

    values: tuple[int, ...]
    origin: str = ""

    def __post_init__(self) -> None:
        if not self.values:
            raise WorkloadError(f"empirical lengths: no values from {self.origin or 'input'}")

    @classmethod
    def from_trace(cls, path: str | Path, column: str) -> Empirical:
        from .traces import read_trace_rows  # lazy: traces is heavier and imports nothing here

        if column not in ("input", "output"):
            raise WorkloadError(f"empirical column must be 'input' or 'output', got {column!r}")
        rows = read_trace_rows(path).rows
        attr = "input_len" if column == "input" else "output_len"
        return cls(tuple(getattr(r, attr) for r in rows), origin=f"{path} ({column})")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        values = np.asarray(self.values, dtype=np.int64)
        return values[rng.integers(0, len(values), size=n)]


_KEYS: dict[str, tuple[str, ...]] = {
    "fixed": ("value",),
    "uniform": ("low", "high"),
    "lognormal": ("median", "sigma", "min", "max"),
    "empirical": ("path", "column"),
}


def length_dist(cfg: int | Mapping[str, object], what: str = "length") -> LengthDist:
    """A distribution from its config (see the module docstring); ``what`` names it in errors."""
    if isinstance(cfg, int) and not isinstance(cfg, bool):
        return Fixed(cfg)
    if not isinstance(cfg, Mapping):
        raise WorkloadError(f"{what}: expected an int or a mapping with 'dist', got {cfg!r}")
    cfg = dict(cfg)
    kind = cfg.pop("dist", None)
    if kind not in _KEYS:
        raise WorkloadError(f"{what}: unknown dist {kind!r}; allowed: {', '.join(_KEYS)}")
    unknown = sorted(set(cfg) - set(_KEYS[kind]))
    if unknown:
        raise WorkloadError(
            f"{what}: unknown key {unknown[0]!r} for dist {kind}; allowed: {', '.join(_KEYS[kind])}"
        )
    required = {"fixed": ("value",), "uniform": ("low", "high"), "lognormal": ("median", "sigma")}
    for key in required.get(kind, ("path", "column")):
        if key not in cfg:
            raise WorkloadError(f"{what}: dist {kind} needs {key!r}")
    try:
        if kind == "fixed":
            return Fixed(int(cfg["value"]))
        if kind == "uniform":
            return Uniform(int(cfg["low"]), int(cfg["high"]))
        if kind == "lognormal":
            top = cfg.get("max")
            return LogNormal(
                float(cfg["median"]),
                float(cfg["sigma"]),
                int(cfg.get("min", 1)),
                None if top is None else int(top),
            )
    except (TypeError, ValueError) as exc:
        raise WorkloadError(f"{what}: bad {kind} parameters: {exc}") from None
    return Empirical.from_trace(str(cfg["path"]), str(cfg["column"]))
