"""The host's speed over a run, to replay in a simulation (``executor.sim_host_timeline``).

The hosts of the lent GPUs switch between two speeds within a run: for seconds at a time the
same Python runs about 1.5x (steps with prompt tokens) to 1.9x (decode steps) slower, and a
run spends anywhere from none to half of its time slow (docs/performance.md, "A host of two
speeds"). One ``sim_host_time_scale`` for a whole run blurs that; a ``HostTimeline`` gives each
step the scale of the second it starts in::

    times    0.0    1.0    2.0    3.0 ...       (seconds on the run's clock)
    scales   1.05   1.08   1.61   1.58 ...      the host's time over the profiled host's
    a step starting at t = 2.4 s  ->  scale 1.61

``python -m harness.calibrate REAL --profile P --host-timeline DIR`` writes one for each real
run (``of_samples``: the median over each second's steps of their host time over the profile's
host model); a simulation of the same workload with it runs on that run's host, so what is left
of the error is the cost model's. A timeline is a CSV file with the columns ``time_s`` and
``host_time_scale``.
"""

from __future__ import annotations

import bisect
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLUMNS = ("time_s", "host_time_scale")


@dataclass(frozen=True)
class HostTimeline:
    """From ``times[i]`` (seconds on the run's clock, increasing) until the next time, the
    host's time is ``scales[i]`` times the profiled host's; before ``times[0]``, ``scales[0]``."""

    times: tuple[float, ...]
    scales: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.times or len(self.times) != len(self.scales):
            raise ValueError(
                f"a host timeline needs as many times as scales, at least one: got "
                f"{len(self.times)} times and {len(self.scales)} scales"
            )
        for i, (t, scale) in enumerate(zip(self.times, self.scales, strict=True)):
            if not math.isfinite(t) or (i and t <= self.times[i - 1]):
                raise ValueError(f"host timeline times must increase: {t} at row {i}")
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"host timeline scales must be > 0: {scale} at row {i}")

    def scale_at(self, t: float) -> float:
        """The host's scale at time ``t`` on the run's clock."""
        return self.scales[max(0, bisect.bisect_right(self.times, t) - 1)]

    @classmethod
    def of_samples(
        cls, times: Sequence[float], scales: Sequence[float], bin_seconds: float = 1.0
    ) -> HostTimeline:
        """Per ``bin_seconds`` of the run, the median of the ``scales`` sampled in it (each
        step's host time over the profile's host model, at the step's start ``times``). A bin
        without samples keeps the bin before it (the first ones the first sampled bin)."""
        if not bin_seconds > 0:
            raise ValueError(f"bin_seconds must be > 0, got {bin_seconds}")
        t, s = np.asarray(times, dtype=float), np.asarray(scales, dtype=float)
        keep = np.isfinite(t) & np.isfinite(s) & (s > 0)
        if not keep.any():
            raise ValueError("no samples of the host's scale to make a timeline of")
        bins = np.floor(np.maximum(t[keep], 0.0) / bin_seconds).astype(np.int64)
        s = s[keep]
        medians = {int(b): float(np.median(s[bins == b])) for b in np.unique(bins)}
        first = min(medians)
        scales, current = [], medians[first]
        for b in range(int(bins.max()) + 1):
            current = medians.get(b, current)
            scales.append(current)
        return cls(tuple(b * bin_seconds for b in range(len(scales))), tuple(scales))

    @classmethod
    def load(cls, path: str | Path) -> HostTimeline:
        """Read a CSV of ``time_s,host_time_scale`` rows; a bad row is reported with its file
        and line."""
        path = Path(path)
        times, scales = [], []
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: a host timeline needs the columns {COLUMNS}, "
                                 f"missing {missing}")  # fmt: skip
            for row in reader:
                try:
                    times.append(float(row["time_s"]))
                    scales.append(float(row["host_time_scale"]))
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path} line {reader.line_num}: not a number: {row}"
                    ) from None
        try:
            return cls(tuple(times), tuple(scales))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def save(self, path: str | Path) -> None:
        with Path(path).open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(COLUMNS)
            rows = zip(self.times, self.scales, strict=True)
            writer.writerows((f"{t:.10g}", f"{scale:.6g}") for t, scale in rows)
