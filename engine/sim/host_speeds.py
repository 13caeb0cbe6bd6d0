"""A host of two speeds, simulated: a seeded switching process (``executor.sim_host_speeds``).

The lent GPUs' hosts switch between two speeds within a run (``engine.sim.host_timeline``):
for seconds at a time the same Python runs about 1.5x slower, then fast again, and a run spends
anywhere from none to nine tenths of its seconds slow. A replayed ``HostTimeline`` gives a
simulation one real run's host; ``HostSpeeds`` is what a calibration measured of many runs'
hosts, and ``TwoSpeedHost`` one seeded host drawn from it, for simulating runs that were never
made::

    state   fast ......... | slow ..... | fast ... | slow ...........   (dwell times drawn
    scale   fast_scale     | slow_scale | ...                              exponential, with
    time    0              t1           t2         t3                    means mean_fast_s and
                                                                         mean_slow_s)

The host starts slow with probability ``slow_share`` (the share of time a long run spends slow),
so a run's first seconds are like any others. Switch times are drawn as far as they are asked
for: the same seed gives the same host however the simulation queries it. A scale multiplies a
step's host time on top of ``sim_host_time_scale``, as a timeline's does.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from engine.sim.host_timeline import HostTimeline
from engine.sim.profile import read_json_object

# A second whose host took over this many times the profile's host fit was a slow second. The
# two speeds sit near 1.0-1.1 and 1.45-1.9 (docs/performance.md, "A host of two speeds").
SLOW_THRESHOLD = 1.3


@dataclass(frozen=True)
class HostSpeeds:
    """Two host speeds (scales of the profile's host fit) and how long each lasts on average."""

    fast_scale: float
    slow_scale: float
    mean_fast_s: float
    mean_slow_s: float

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"host speeds: {name} must be a number > 0, got {value!r}")

    @property
    def slow_share(self) -> float:
        """The share of a long run's time the host is slow."""
        return self.mean_slow_s / (self.mean_fast_s + self.mean_slow_s)

    @property
    def mean_scale(self) -> float:
        return self.fast_scale + self.slow_share * (self.slow_scale - self.fast_scale)

    def host(self, seed: int) -> TwoSpeedHost:
        return TwoSpeedHost(self, seed)

    @classmethod
    def of_dict(cls, values: dict, source: str = "host speeds") -> HostSpeeds:
        names = {f.name for f in fields(cls)}
        missing, unknown = names - set(values), set(values) - names
        if missing or unknown:
            raise ValueError(
                f"{source}: needs exactly {sorted(names)}; missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
        try:
            return cls(**{name: float(values[name]) for name in names})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None

    def save(self, path: str | Path, measured: dict[str, Any] | None = None) -> None:
        """A JSON file of the four numbers, and under ``measured`` where they came from."""
        data: dict[str, Any] = asdict(self)
        if measured is not None:
            data["measured"] = measured
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HostSpeeds:
        path = Path(path)
        data = read_json_object(path, "a host speeds file")
        data.pop("measured", None)
        return cls.of_dict(data, str(path))

    @classmethod
    def fit(
        cls, timelines: Sequence[HostTimeline], threshold: float = SLOW_THRESHOLD
    ) -> HostSpeeds:
        """Fit to real runs' timelines (``HostTimeline.of_samples``, a bin a second): each
        speed is the median scale of the bins on its side of ``threshold``; each mean dwell is
        the time spent in that speed over the number of times the host left it (the estimate of
        an exponential dwell's mean where runs cut dwells short). Needs both speeds seen."""
        fast: list[float] = []
        slow: list[float] = []
        time = {False: 0.0, True: 0.0}
        exits = {False: 0, True: 0}
        for timeline in timelines:
            bounds = (*timeline.times[1:], timeline.times[-1] + _bin_width(timeline))
            was_slow = None
            for start, end, scale in zip(timeline.times, bounds, timeline.scales, strict=True):
                is_slow = scale > threshold
                (slow if is_slow else fast).append(scale)
                time[is_slow] += end - start
                if was_slow is not None and was_slow != is_slow:
                    exits[was_slow] += 1
                was_slow = is_slow
        if not fast or not slow:
            raise ValueError(
                f"host speeds need fast and slow seconds (threshold {threshold}): got "
                f"{len(fast)} fast, {len(slow)} slow over {len(timelines)} timelines"
            )
        return cls(
            fast_scale=statistics.median(fast),
            slow_scale=statistics.median(slow),
            mean_fast_s=time[False] / max(exits[False], 1),
            mean_slow_s=time[True] / max(exits[True], 1),
        )


class TwoSpeedHost:
    """One host drawn from ``HostSpeeds`` with ``seed``: ``scale_at(t)`` as a ``HostTimeline``
    gives it, switch times drawn as far as asked."""

    def __init__(self, speeds: HostSpeeds, seed: int):
        self.speeds = speeds
        self._random = random.Random(seed)
        is_slow = self._random.random() < speeds.slow_share
        self._times = [0.0]  # switch times: the host is self._is_slow[i] from self._times[i]
        self._is_slow = [is_slow]

    def scale_at(self, t: float) -> float:
        """The host's scale at ``t`` seconds on the run's clock (before 0: the first)."""
        while self._times[-1] <= t:
            is_slow = self._is_slow[-1]
            mean = self.speeds.mean_slow_s if is_slow else self.speeds.mean_fast_s
            self._times.append(self._times[-1] + self._random.expovariate(1.0 / mean))
            self._is_slow.append(not is_slow)
        is_slow = self._is_slow[max(0, bisect.bisect_right(self._times, t) - 1)]
        return self.speeds.slow_scale if is_slow else self.speeds.fast_scale

    def timeline(self, until: float) -> HostTimeline:
        """The host's switches up to ``until`` seconds, as a timeline (to save or plot)."""
        self.scale_at(until)
        count = bisect.bisect_right(self._times, until)
        scales = (self.speeds.slow_scale if s else self.speeds.fast_scale for s in self._is_slow)
        return HostTimeline(tuple(self._times[:count]), tuple(scales)[:count])


def _bin_width(timeline: HostTimeline) -> float:
    if len(timeline.times) > 1:
        return timeline.times[1] - timeline.times[0]
    return 1.0
