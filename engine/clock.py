"""Clocks: the executor reads time only through one of these, so a policy never knows which.

``WallClock`` is real time (seconds since the clock was made); ``VirtualClock`` moves only when
told, for tests and for the simulated engine.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...

    def tick(self, step_seconds: float | None = None) -> None:
        """Called once after each executor step."""


class WallClock:
    def __init__(self) -> None:
        self._origin = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._origin

    def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)

    def tick(self, step_seconds: float | None = None) -> None:
        pass


class VirtualClock:
    """Time advances by ``step_seconds`` a step (the engine's prediction, or ``step_time``)."""

    def __init__(self, step_time: float = 0.0, start: float = 0.0) -> None:
        self.step_time = step_time
        self._now = start

    def now(self) -> float:
        return self._now

    def sleep_until(self, t: float) -> None:
        self._now = max(self._now, t)

    def tick(self, step_seconds: float | None = None) -> None:
        self._now += self.step_time if step_seconds is None else step_seconds

    def advance(self, seconds: float) -> None:
        """Move time forward inside a step (the simulated engine's predicted forward time)."""
        if seconds < 0:
            raise ValueError(f"time cannot go backwards ({seconds} s)")
        self._now += seconds
