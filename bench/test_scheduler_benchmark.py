"""Scheduling overhead per iteration, no model: 256 running (decoding) + 1,000 waiting requests.

    python -m pytest bench/test_scheduler_benchmark.py --benchmark-only

One iteration = the capacity pass, the micro-batch pass and the KV bookkeeping of a step
(prepare_resources, counter updates, update_resources): everything the executor does per step
except the forward and the sampling. Results go to docs/performance.md.
"""

from __future__ import annotations

import pytest
import torch

from engine.model_engine import build_forward_batch, flatten_batch
from engine.request import Request, RequestState, SamplingParams
from engine.scheduler import Scheduler
from policies import registry
from policies.kv_cache import PagedKVCacheManager
from policies.microbatch import TokenBudgetMicroBatchScheduler
from tests.scenario import run_step

NUM_RUNNING = 256
NUM_WAITING = 1000
PROMPT_LEN = 512
TOKENS_PER_BLOCK = 32


def build_state(capacity: str, enable_block_reuse: bool):
    max_new = 100_000  # never finishes during the benchmark
    kv = PagedKVCacheManager(
        tokens_per_block=TOKENS_PER_BLOCK, num_blocks=64_000, enable_block_reuse=enable_block_reuse
    )
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    running = []
    for i in range(NUM_RUNNING):
        request = Request(i, [(i * 7 + j) % 30_000 for j in range(PROMPT_LEN)], params)
        running.append(request)
    scheduler = Scheduler(
        registry.build("capacity_scheduler", capacity, max_num_requests=NUM_RUNNING),
        TokenBudgetMicroBatchScheduler(max_batch_size=NUM_RUNNING, max_num_tokens=8192),
    )
    # Prefill the running requests directly (outside the timed region).
    for request in running:
        request.state = RequestState.CONTEXT
        request.context_chunk_size = PROMPT_LEN
    from engine.scheduler import SchedulerOutput

    batch = SchedulerOutput(context_requests=running)
    kv.prepare_resources(batch)
    for request in running:
        request.num_computed_tokens = PROMPT_LEN
        request.append_token(5, 0.0)
    kv.update_resources(batch)
    waiting = [
        Request(NUM_RUNNING + i, [(i * 11 + j) % 30_000 for j in range(PROMPT_LEN)], params)
        for i in range(NUM_WAITING)
    ]
    return scheduler, kv, running + waiting


def one_iteration(scheduler, kv, active):
    batch = scheduler.schedule_request(active, kv)
    run_step(kv, batch)  # the executor's bookkeeping around the forward
    return batch


@pytest.mark.parametrize("enable_block_reuse", [False, True], ids=["noreuse", "reuse"])
@pytest.mark.parametrize("capacity", ["guaranteed_no_evict", "max_utilization"])
def test_scheduling_iteration(benchmark, capacity, enable_block_reuse):
    scheduler, kv, active = build_state(capacity, enable_block_reuse)
    batch = benchmark(one_iteration, scheduler, kv, active)
    assert len(batch.generation_requests) == NUM_RUNNING and not batch.context_requests
    kv.check_integrity()


def test_input_preparation(benchmark):
    """Host time of flattening a 256-request decode batch into the model's inputs (cpu)."""
    scheduler, kv, active = build_state("max_utilization", False)
    batch = scheduler.schedule_request(active, kv)
    kv.prepare_resources(batch)
    inputs = benchmark(build_forward_batch, batch, kv, torch.device("cpu"))
    assert inputs.num_seqs == NUM_RUNNING and inputs.num_tokens == NUM_RUNNING
    assert inputs.block_tables.shape == (NUM_RUNNING, PROMPT_LEN // TOKENS_PER_BLOCK + 1)


def test_decode_flatten(benchmark):
    """Host time of ``flatten_batch`` alone at 256 decodes: the host lists that both the CUDA
    graph runner (``DecodeGraphRunner.load``) and the eager path start from."""
    scheduler, kv, active = build_state("max_utilization", False)
    batch = scheduler.schedule_request(active, kv)
    kv.prepare_resources(batch)
    host = benchmark(flatten_batch, batch, kv)
    assert host.num_seqs == NUM_RUNNING and host.is_decode_only
    assert host.positions == [PROMPT_LEN] * NUM_RUNNING
