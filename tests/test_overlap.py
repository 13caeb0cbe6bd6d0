"""Overlap scheduling (``LLM(overlap_scheduler=True)``): step n+1 is scheduled and queued before
step n's tokens are read. Outputs must not change: greedy equals transformers ``generate()``
(float64, CPU) under every policy, stop tokens end a request at the same token (the one extra
token sampled after it is dropped), and seeded sampling draws the same tokens.
(tests/test_invariants.py checks the invariants after every step with and without overlap.)
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.clock import VirtualClock
from engine.decoder import Decoder
from engine.executor import PyExecutor
from engine.model_engine import fill_pending_tokens
from engine.request import FinishReason, Request, pending_token_id
from engine.resource_manager import ResourceManager
from engine.scheduler import Scheduler
from policies.capacity import GuaranteedNoEvictScheduler
from policies.kv_cache import PagedKVCacheManager
from policies.microbatch import TokenBudgetMicroBatchScheduler
from tests.fakes import EOS, FakeModelEngine
from tests.test_generate_equivalence import (
    CAPACITY,
    CHUNKING,
    MAX_NEW_TOKENS,
    reference,  # noqa: F401  (a fixture)
    reference_llm,
)


def test_fill_pending_tokens_takes_the_previous_steps_rows():
    ids = torch.tensor([5, pending_token_id(0), 9, pending_token_id(2)])
    fill_pending_tokens(ids, torch.tensor([17, 4, 30]))
    assert ids.tolist() == [5, 17, 9, 30]


def _llm(hf_model, capacity, chunking, overlap):
    return reference_llm(hf_model, capacity, chunking, overlap=overlap)


@pytest.mark.parametrize("chunking", CHUNKING, ids=["nochunk", "fcfs", "equal"])
@pytest.mark.parametrize("capacity", CAPACITY)
def test_overlap_greedy_matches_transformers(reference, capacity, chunking):  # noqa: F811
    hf_model, prompts, expected = reference
    llm = _llm(hf_model, capacity, chunking, overlap=True)
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outputs] == expected
    assert all(o.finish_reason == "length" for o in outputs)
    if capacity == "max_utilization":
        assert sum(o.metrics.num_preemptions for o in outputs) > 0, "pool never ran short"
    kv = llm.kv_cache_manager
    kv.check_integrity()
    assert kv.get_kv_cache_stats().used_num_blocks == 0
    # One row per step that ran, each read back once; every token has its time.
    stats = llm.executor.iteration_stats
    assert sum(s.num_completed_requests for s in stats) == len(prompts)
    for output in outputs:
        assert output.metrics.e2e_latency >= output.metrics.ttft >= 0


def test_overlap_stop_tokens_end_requests_at_the_same_token(reference):  # noqa: F811
    """Each request stops at a token of its greedy output: the step after it was already queued
    with that request, and its extra token must not show."""
    hf_model, prompts, expected = reference
    stops = [e[3] for e in expected]  # the 4th greedy token (it may also come earlier)
    params = [
        SamplingParams(max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=[stop], ignore_eos=True)
        for stop in stops
    ]
    want = [e[: e.index(stop) + 1] for e, stop in zip(expected, stops, strict=True)]
    results = {}
    for overlap in (False, True):
        llm = _llm(hf_model, "max_utilization", "first_come_first_served", overlap)
        outputs = llm.generate(prompts, params)
        results[overlap] = [(o.token_ids, o.finish_reason) for o in outputs]
        assert llm.kv_cache_manager.get_kv_cache_stats().used_num_blocks == 0
    assert [tokens for tokens, _ in results[True]] == want
    assert results[True] == results[False]
    assert all(reason == "stop" for _, reason in results[True])


def test_overlap_sampling_draws_the_same_tokens(reference):  # noqa: F811
    hf_model, prompts, _ = reference
    params = [
        SamplingParams(max_new_tokens=8, temperature=0.8, top_k=50, top_p=0.9, seed=i)
        for i in range(len(prompts))
    ]
    results = [
        [o.token_ids for o in _llm(hf_model, "max_utilization", None, overlap).generate(
            prompts, params
        )]
        for overlap in (False, True)
    ]  # fmt: skip
    assert results[0] == results[1]


def _fake_executor(overlap: bool) -> PyExecutor:
    return PyExecutor(
        FakeModelEngine(vocab_size=64, max_seq_len=128),
        Decoder(),
        Scheduler(GuaranteedNoEvictScheduler(8), TokenBudgetMicroBatchScheduler(max_batch_size=8)),
        ResourceManager(PagedKVCacheManager(tokens_per_block=4, num_blocks=64)),
        clock=VirtualClock(step_time=1.0),
        eos_token_id=EOS,
        overlap=overlap,
    )


def test_overlap_returns_each_steps_row_one_call_late_and_drops_the_token_after_a_stop():
    prompts = [[7, 8, 9], [11, 12], [20, 21, 22, 23]]
    runs = {}
    for overlap in (False, True):
        executor = _fake_executor(overlap)
        requests = [
            Request(i, list(p), SamplingParams(max_new_tokens=6, stop_token_ids=[]))
            for i, p in enumerate(prompts)
        ]
        executor.enqueue_requests(requests)
        first = executor.step()
        assert (first is None) == overlap  # with overlap, nothing has been read back yet
        while executor.has_unfinished_requests:
            executor.step()
        runs[overlap] = (executor, requests)
    sync_requests, overlap_requests = runs[False][1], runs[True][1]
    for a, b in zip(sync_requests, overlap_requests, strict=True):
        assert a.output_token_ids == b.output_token_ids
        assert a.finish_reason == b.finish_reason is FinishReason.LENGTH
        assert len(b.token_times) == len(b.output_token_ids)
    # The same steps, each recorded with its own batch (not the next one's chunk sizes).
    sync_rows = runs[False][0].iteration_stats.columns()
    overlap_rows = runs[True][0].iteration_stats.columns()
    for column in (
        "num_context_requests",
        "num_context_tokens",
        "num_generation_requests",
        "context_attention",
        "decode_kv_tokens",
        "num_completed_requests",
    ):
        assert list(overlap_rows[column]) == list(sync_rows[column]), column
    assert sum(sync_rows["num_context_tokens"]) == sum(map(len, prompts))

    # A stop token: the request's next step is queued before the stop is read, then dropped.
    # max_new_tokens 3: the stop is read after the next launch already finished it by length;
    # 2: the stop token is also the last by length.
    full = sync_requests[0].output_token_ids
    stop = full[1]
    for max_new_tokens in (6, 3, 2):
        executors = {}
        for overlap in (False, True):
            executor = _fake_executor(overlap)
            params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(stop,))
            request = Request(0, list(prompts[0]), params)
            executor.enqueue_requests([request])
            executor.run()
            assert request.output_token_ids == full[: full.index(stop) + 1]
            assert request.finish_reason is FinishReason.STOP
            assert len(request.token_times) == len(request.output_token_ids)
            assert sum(executor.iteration_stats.columns()["num_completed_requests"]) == 1
            assert executor.kv_cache_manager.num_free_blocks == executor.kv_cache_manager.num_blocks
            executors[overlap] = executor
        wasted = executors[True].model_engine.num_forward_tokens
        extra = 1 if max_new_tokens > full.index(stop) + 1 else 0  # a row past the stop ran
        assert wasted == executors[False].model_engine.num_forward_tokens + extra


def test_overlap_step_latencies_restart_with_a_new_clock():
    """A replay gives the executor a fresh clock after its warm-up: the first step's latency runs
    from its own start, not from the last read on the old clock."""
    executor = _fake_executor(overlap=True)
    for run in range(2):
        executor.clock = VirtualClock(step_time=1.0, start=0.0)
        executor.enqueue_requests(
            [
                Request(10 * run + i, [7, 8, 9 + i], SamplingParams(max_new_tokens=5))
                for i in range(3)
            ]
        )
        executor.run()
    latencies = executor.iteration_stats.columns()["step_latency"]
    assert len(latencies) == 10 and min(latencies) > 0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_overlap_on_cuda_graphs_gives_the_same_tokens():
    """Decode graphs and piecewise graphs read the pending tokens on the device: the same greedy
    tokens as without overlap (float32), with both kinds of graph steps taken."""
    prompts = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate((5, 17, 30, 9))]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    outputs = {}
    for overlap in (False, True):
        llm = LLM(
            "llama-tiny",
            device="cuda",
            dtype="float32",
            attention_backend="triton",
            capacity_scheduler="max_utilization",
            microbatch_scheduler=dict(
                max_batch_size=4, max_num_tokens=16, chunking="equal_progress"
            ),
            kv_cache_manager=dict(tokens_per_block=4, num_blocks=20, enable_block_reuse=True),
            overlap_scheduler=overlap,
        )
        outputs[overlap] = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.model_engine.num_graph_steps > 0
        assert llm.model_engine.piecewise_runner.num_steps > 0
        # Every step timed on the device (CUDA events) and on the host.
        rows = llm.executor.iteration_stats.columns()
        assert all(0 < t < 10 for t in rows["device_time"])
        assert all(0 < t < 10 for t in rows["host_time"])
    assert outputs[True] == outputs[False]


@cuda
def test_an_overlapped_step_never_waits_for_the_step_it_queues():
    """In steady decoding a step() call queues a step and reads the previous one's tokens
    through an event: no implicit device synchronisation anywhere in it."""
    llm = LLM(
        "llama-tiny",
        device="cuda",
        dtype="bfloat16",
        microbatch_scheduler=dict(max_batch_size=8, max_num_tokens=64),
        kv_cache_manager=dict(tokens_per_block=16, max_tokens=4096),
        overlap_scheduler=True,
    )
    requests = llm.make_requests([[5, 6, 7], [8, 9, 10, 11]], SamplingParams(max_new_tokens=32))
    llm.executor.enqueue_requests(requests)
    for _ in range(4):
        llm.executor.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            assert llm.executor.step().num_generation_requests == 2
    finally:
        torch.cuda.set_sync_debug_mode("default")
    llm.executor.run()
    assert all(r.num_output_tokens == 32 for r in requests)


def test_overlap_closed_loop_sends_the_next_request_when_the_last_token_is_read():
    """A request finished by length leaves the schedule at its last launch but joins
    ``finished_requests`` only when its token is read: a closed loop sends the next one then."""
    from harness.replay import replay
    from harness.workload.base import RequestSpec, Workload

    specs = tuple(RequestSpec(0.0, tuple(range(5 + i, 12 + i)), 3 + i % 3) for i in range(6))
    llm = LLM(
        "llama-tiny", device="cpu", dtype="float32", clock=VirtualClock(step_time=1.0),
        overlap_scheduler=True,
    )  # fmt: skip
    requests = replay(llm, Workload("closed", specs, concurrency=2))
    assert all(r.finish_reason is FinishReason.LENGTH for r in requests)
    for request in requests:
        assert request.finish_time == request.token_times[-1]
    finish_times = {r.finish_time for r in requests}
    assert all(r.arrival_time in finish_times for r in requests[2:])
