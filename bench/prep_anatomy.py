"""Where a decode step's scheduling and input preparation go on the host, in place.

    PYTHONPATH=. python bench/prep_anatomy.py [--presets llama-1b] [--batch 256]

For each preset and mode (without and with overlap scheduling), ``--batch`` requests with a
1,024-token context decode together; over 40 steps the parts of the step's host path are timed
where they run (wrapped with ``time.perf_counter``), and the medians per step printed beside the
executor's own ``scheduling_time`` and ``input_prep_time``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections import defaultdict

import torch

import engine.model_engine as model_engine_module
from bench.decode_steps import build_llm, start_decoding

NUM_STEPS = 40


def timed(times: dict[str, list[float]], name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        times[name].append(time.perf_counter() - start)
        return result

    return wrapper


class TimedEvent:
    """A CUDA event whose ``synchronize`` (the staging buffer's wait) is timed."""

    def __init__(self, event: torch.cuda.Event, times: dict[str, list[float]]):
        self.event, self.times = event, times
        self.record = event.record

    def synchronize(self) -> None:
        start = time.perf_counter()
        self.event.synchronize()
        self.times["staging wait"].append(time.perf_counter() - start)


def anatomy(preset: str, num_decodes: int, overlap: bool) -> None:
    llm = build_llm(preset, "cuda", 1024, overlap=overlap)
    g = torch.Generator().manual_seed(0)
    vocab = llm.model_engine.vocab_size
    prompts = torch.randint(10, vocab - 10, (num_decodes, 1023), generator=g).tolist()
    start_decoding(llm, prompts, NUM_STEPS + 20, preset)
    executor, engine = llm.executor, llm.model_engine
    runner = engine.graph_runner
    for _ in range(5):
        executor.step()
    times: dict[str, list[float]] = defaultdict(list)
    parts = [
        (executor.scheduler, "schedule_request"),
        (engine, "forward"),
        (executor.resource_manager, "prepare_resources"),
        (runner, "advance"),
        (runner, "load"),
        (runner, "_take_pending"),
        (runner._staging, "send"),
        (model_engine_module, "flatten_batch"),
    ]
    # (owner, name, what to put back: the owner's own attribute, or None for a class's method)
    originals = [(owner, name, vars(owner).get(name)) for owner, name in parts]
    for owner, name, _ in originals:
        setattr(owner, name, timed(times, name, getattr(owner, name)))
    event = runner._staging._event
    runner._staging._event = TimedEvent(event, times)
    num_advanced = runner.num_advanced_steps
    try:
        for _ in range(NUM_STEPS):
            executor.step()
    finally:
        for owner, name, fn in originals:
            if fn is None:
                delattr(owner, name)  # the class's method again
            else:
                setattr(owner, name, fn)
        runner._staging._event = event
    stats = executor.iteration_stats[-NUM_STEPS:]
    mode = "overlap" if overlap else "sync"
    print(
        f"\n{preset}, {num_decodes} decodes, {mode}: {runner.num_advanced_steps - num_advanced} of "
        f"{NUM_STEPS} steps advanced; median us per call (calls)"
    )
    print(f"  {'executor scheduling_time':34s} {median_us(s.scheduling_time for s in stats):8.1f}")
    print(f"  {'executor input_prep_time':34s} {median_us(s.input_prep_time for s in stats):8.1f}")
    for name, values in times.items():
        print(f"  {name:34s} {median_us(values):8.1f} ({len(values)})")
    llm.release_gpu_memory()
    del llm, executor, engine, runner
    gc.collect()
    torch.cuda.empty_cache()


def median_us(values) -> float:
    return statistics.median(values) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="llama-1b")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    for preset in args.presets.split(","):
        for overlap in (False, True):
            anatomy(preset, args.batch, overlap)


if __name__ == "__main__":
    main()
