"""One real overlap run's steps on one timeline: host timestamps and device events.

    python bench/step_timeline.py TIMELINE.csv <harness overrides...>
    python bench/step_timeline.py --summary TIMELINE.csv     # medians per kind of step

Runs ``python -m harness <overrides>`` (one run of the real engine with overlap scheduling)
with the executor's and the model engine's methods wrapped (``recording``), and writes a row
per launched step, in launch order, every time in seconds from one origin: the host's
``perf_counter`` and, on CUDA, an event recorded at the same instant after a synchronize::

    host   | admitted .. launch: forward ( inputs | first: kernels queued ...) launched
           |   .. read_start (waits for the step before) read_end .. iter_end
    device |        device_began (event before the forward) .. device_first .. device_copied

``device_*`` (CUDA only) are when the device reached each event: ``device_copied -
device_first`` is the step's device work, with any gaps while the host still queues its
kernels; ``device_first - device_began`` the device's wait for the host's input preparation
where it was idle; ``device_copied - launched`` how far the device ran behind the host
(under ~0.3 ms: the step was bound by its launches). The host's time outside the executor's
loop is one row's ``admitted`` minus the row before's ``iter_end`` (with any sleep until the
next arrival). The rows match the run's non-empty ``iterations.parquet`` rows one to one
(``num_context_tokens``, ``num_generation_requests`` to check). docs/performance.md, "One
step's timeline", reads them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

import harness.replay
from engine.executor import InFlightStep, PyExecutor
from engine.model_engine import TorchModelEngine
from engine.models.llama import PagedCausalLM
from engine.piecewise_graphs import PiecewiseGraphRunner


class Timeline:
    """The rows, their origin, and the step being launched (what the wrappers share)."""

    def __init__(self, is_cuda: bool) -> None:
        self.is_cuda = is_cuda
        self.restart()

    def restart(self) -> None:
        """Forget every row and take a new origin (after the warm-up)."""
        self.rows: list[dict[str, float]] = []
        self.events: list[dict[str, torch.cuda.Event]] = []
        self.launching: dict[str, float] | None = None
        self.launching_events: dict[str, torch.cuda.Event] = {}
        self.admitted = float("nan")
        self.origin_event = None
        if self.is_cuda:
            torch.cuda.synchronize()
            self.origin_event = torch.cuda.Event(enable_timing=True)
        self.origin_host = time.perf_counter()
        if self.is_cuda:
            self.origin_event.record()
            torch.cuda.synchronize()

    def now(self) -> float:
        return time.perf_counter() - self.origin_host

    def mark(self, name: str) -> None:
        """The host's time and a device event for the step being launched (none while a CUDA
        graph is captured: an event cannot be recorded into one)."""
        if self.launching is None or (self.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        self.launching[name] = self.now()
        if self.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.launching_events[name] = event

    def frame(self) -> pd.DataFrame:
        if self.is_cuda:
            torch.cuda.synchronize()
        for row, events in zip(self.rows, self.events, strict=True):
            for name, event in events.items():
                row[f"device_{name}"] = self.origin_event.elapsed_time(event) / 1e3
        return pd.DataFrame(self.rows)


def _wrapped(original, before=None, after=None):
    def wrapped(self, *args, **kwargs):
        if before is not None:
            before(self, *args, **kwargs)
        result = original(self, *args, **kwargs)
        if after is not None:
            after(self, result)
        return result

    return wrapped


@contextmanager
def recording(timeline: Timeline) -> Iterator[Timeline]:
    """Wrap the methods a step passes through so that ``timeline`` gets its row; restores them
    on exit. ``harness.replay.reset`` (after the warm-up) restarts the timeline."""
    t = timeline

    def admitted(executor, result) -> None:
        t.admitted = t.now()

    def launch_begins(executor, batch, *args) -> None:
        t.launching = {
            "admitted": t.admitted,
            "launch": t.now(),
            "num_context_tokens": batch.num_context_tokens,
            "num_generation_requests": len(batch.generation_requests),
        }
        t.launching_events = {}

    def launch_ends(executor, step: InFlightStep) -> None:
        row, events = t.launching, t.launching_events
        row["launched"] = t.now()
        for name, event in (("began", step.began), ("copied", step.copied)):
            if event is not None:
                events[name] = event
        step._timeline = row  # its read finds the row
        t.rows.append(row)
        t.events.append(events)
        t.launching = None

    def read_begins(step: InFlightStep, *args) -> None:
        if hasattr(step, "_timeline"):
            step._timeline["read_start"] = t.now()

    def read_ends(step: InFlightStep, result) -> None:
        if hasattr(step, "_timeline"):
            step._timeline["read_end"] = t.now()

    def iteration_ends(executor, result) -> None:
        row = getattr(executor._in_flight, "_timeline", None)  # the step this call launched
        if row is not None and "iter_end" not in row:
            row["iter_end"] = t.now()

    def first(*args, **kwargs) -> None:
        t.mark("first")

    reset = harness.replay.reset

    def reset_then_restart(llm) -> None:
        reset(llm)
        t.restart()

    wrappers = [
        (PyExecutor, "_admit_arrivals", dict(after=admitted)),
        (PyExecutor, "_launch", dict(before=launch_begins, after=launch_ends)),
        (PyExecutor, "_step_overlap", dict(after=iteration_ends)),
        (InFlightStep, "read_tokens", dict(before=read_begins, after=read_ends)),
        (TorchModelEngine, "forward", dict(before=lambda *a, **k: t.mark("forward"))),
        # The three ways a step's kernels start, each once its inputs are on the device.
        (TorchModelEngine, "_replay", dict(before=first)),
        (PiecewiseGraphRunner, "run", dict(before=first)),
        (PagedCausalLM, "forward", dict(before=first)),
    ]
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in wrappers]
    try:
        for owner, name, hooks in wrappers:
            setattr(owner, name, _wrapped(owner.__dict__[name], **hooks))
        harness.replay.reset = reset_then_restart
        yield t
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
        harness.replay.reset = reset


LAUNCH_BOUND_S = 3e-4  # the device done within this of the host's last launch: launch-bound


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per kind of step (decode: no prompt tokens; mixed), its count and medians in ms: the
    host's time before the first kernel (``before_kernels``: scheduling and inputs) and its
    launches; with device events, the device's work from the first kernel, its wait for the
    host before it, and the share of steps bound by their launches."""
    ms = 1e3
    parts = {
        "before_kernels": (frame.first - frame.admitted) * ms,
        "launch": (frame.launched - frame.first) * ms,
    }
    if "device_copied" in frame:
        parts["device_work"] = (frame.device_copied - frame.device_first) * ms
        parts["device_wait"] = (frame.device_first - frame.device_began) * ms
    kind = frame.num_context_tokens.gt(0).map({False: "decode", True: "mixed"}).rename("kind")
    table = pd.DataFrame(parts).groupby(kind)
    out = table.median().round(3)
    out.insert(0, "steps", table.size())
    if "device_copied" in frame:
        bound = (frame.device_copied - frame.launched) < LAUNCH_BOUND_S
        out["launch_bound"] = bound.groupby(kind).mean().round(3)
    return out


def device_busy(frame: pd.DataFrame) -> float:
    """The device's work over the span from the first step's first kernel to the last copy."""
    span = frame.device_copied.iloc[-1] - frame.device_first.iloc[0]
    return float((frame.device_copied - frame.device_first).sum() / span)


def main(argv: list[str]) -> None:
    if len(argv) < 1:
        sys.exit("usage: python bench/step_timeline.py TIMELINE.csv <harness overrides>")
    if argv[0] == "--summary":
        frame = pd.read_csv(argv[1])
        print(summary(frame).to_string())
        if "device_copied" in frame:
            print(f"device busy: {device_busy(frame):.1%}")
        return
    out = Path(argv[0])
    from harness.__main__ import main as harness_main

    timeline = Timeline(is_cuda=torch.cuda.is_available())
    sys.argv = ["harness", *argv[1:]]
    with recording(timeline):
        try:
            harness_main()
        except SystemExit as exit_:
            if exit_.code:
                raise
    frame = timeline.frame()
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    print(f"{len(frame)} steps -> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
