"""bench/step_timeline.py: one row per launched step, in order, and nothing left wrapped."""

from __future__ import annotations

import numpy as np

from bench.step_timeline import Timeline, recording
from engine import LLM
from engine.executor import PyExecutor
from engine.model_engine import TorchModelEngine
from harness.replay import replay, warm_up
from harness.workload.base import RequestSpec, Workload


def test_the_timeline_has_a_row_in_order_for_each_step_the_run_records():
    llm = LLM(
        "llama-tiny",
        device="cpu",
        microbatch_scheduler=dict(max_batch_size=4, max_num_tokens=32),
        kv_cache_manager=dict(tokens_per_block=4, num_blocks=64),
        overlap_scheduler=True,
    )
    # Staggered arrivals of prompts of 4-29 tokens: prefills beside decodes.
    specs = tuple(
        RequestSpec(0.002 * i, tuple(range(3, 3 + 4 + 5 * i)), 6 + i % 3) for i in range(6)
    )
    originals = (PyExecutor._launch, TorchModelEngine.forward)
    with recording(Timeline(is_cuda=False)) as timeline:
        warm_up(llm)  # its steps are forgotten: the replay's reset restarts the timeline
        replay(llm, Workload("staggered", specs))
    assert (PyExecutor._launch, TorchModelEngine.forward) == originals  # unwrapped

    frame = timeline.frame()
    stats = [s for s in llm.executor.iteration_stats if s.num_scheduled_tokens > 0]
    assert len(frame) == len(stats) > 10
    assert frame.num_context_tokens.tolist() == [s.num_context_tokens for s in stats]
    assert frame.num_generation_requests.tolist() == [s.num_generation_requests for s in stats]
    assert (frame.num_context_tokens > 0).sum() >= 6  # every prompt
    # Each step's host marks in the order the loop passes them...
    order = ["admitted", "launch", "forward", "first", "launched", "iter_end"]
    assert not frame[order].isna().any().any()
    assert (np.diff(frame[order].to_numpy(), axis=1) >= 0).all()
    # ...its tokens read after its launch, and launches in order.
    assert (frame.read_start >= frame.launched).all()
    assert (frame.read_end >= frame.read_start).all()
    assert (np.diff(frame.launch) > 0).all()
    assert not any(c.startswith("device_") for c in frame.columns)  # no CUDA events on CPU
