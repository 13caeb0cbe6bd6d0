"""bench/step_timeline.py: one row per launched step, in order, and nothing left wrapped."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.step_timeline import Timeline, device_busy, recording, summary
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

    # The summary: every step counted once, under its kind; the host's parts only.
    table = summary(frame)
    assert table.steps.to_dict() == {
        "decode": int((frame.num_context_tokens == 0).sum()),
        "mixed": int((frame.num_context_tokens > 0).sum()),
    }
    assert (table[["before_kernels", "launch"]] > 0).all().all()
    assert list(table.columns) == ["steps", "before_kernels", "launch"]


def test_the_summary_reads_the_device_events_by_hand():
    """Three steps by hand (seconds): two decodes behind the host, one mixed step whose device
    ends 0.1 ms after its last launch (bound by its launches)."""
    frame = pd.DataFrame(
        {
            "num_context_tokens": [0, 0, 64],
            "admitted": [0.0, 0.010, 0.020],
            "first": [0.001, 0.011, 0.023],
            "launched": [0.0012, 0.0112, 0.030],
            "device_began": [0.001, 0.012, 0.024],
            "device_first": [0.001, 0.012, 0.025],
            "device_copied": [0.003, 0.014, 0.0301],
        }
    )
    table = summary(frame)
    assert table.loc["decode", "steps"] == 2 and table.loc["mixed", "steps"] == 1
    assert table.loc["decode", "device_work"] == pytest.approx(2.0)
    assert table.loc["mixed", "device_work"] == pytest.approx(5.1)
    assert table.loc["mixed", "device_wait"] == pytest.approx(1.0)
    assert table.loc["mixed", "launch"] == pytest.approx(7.0)
    assert table.launch_bound.to_dict() == {"decode": 0.0, "mixed": 1.0}
    assert device_busy(frame) == pytest.approx((0.002 + 0.002 + 0.0051) / 0.0291)
