"""The executor loop: in-loop arrivals, timestamps, iteration stats, pluggable parts, sampling."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from engine import LLM, CapacityOutput, CapacityScheduler, Request, SamplingParams, VirtualClock
from engine.decoder import Decoder
from engine.kv_cache import KVCacheManager
from tests.test_invariants import build_executor, expected_output

CONFIG = dict(
    capacity="max_utilization",
    chunking="first_come_first_served",
    max_batch_size=4,
    max_num_tokens=16,
    chunk_unit_size=4,
    tokens_per_block=4,
    num_blocks=12,
    enable_block_reuse=True,
)


def test_arrivals_are_replayed_inside_the_loop_on_the_executor_clock():
    executor = build_executor(CONFIG, clock=VirtualClock(step_time=1.0))
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    early = Request(0, [5, 6, 7], params, arrival_time=0.0)
    late = Request(1, [8, 9], params, arrival_time=10.0)
    executor.enqueue_requests([late, early])
    executor.run()
    # early: scheduled at t=0, one token per step (steps take 1 s) -> tokens at 1, 2, 3.
    assert early.first_scheduled_time == 0.0
    assert early.token_times == [0.0, 1.0, 2.0]  # stamped at the end of each step's forward
    assert early.ttft == 0.0 and early.e2e_latency == 2.0 and early.tpot == 1.0
    # The executor idles until t=10 (sleep_until), then serves late.
    assert late.first_scheduled_time == 10.0
    assert late.queue_time == 0.0
    assert [r.request_id for r in executor.finished_requests] == [0, 1]


def test_iteration_stats_account_for_every_token():
    executor = build_executor(CONFIG)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    requests = [Request(i, list(range(10 + i, 30 + i)), params) for i in range(5)]
    executor.enqueue_requests(requests)
    executor.run()
    stats = executor.iteration_stats
    assert [s.iteration for s in stats] == list(range(len(stats)))
    num_generation_tokens = sum(s.num_generation_requests for s in stats)
    # Each output token is sampled by a last context chunk or by a generation step.
    num_last_chunks = sum(r.num_preemptions + 1 for r in requests)
    assert num_generation_tokens + num_last_chunks == sum(r.num_output_tokens for r in requests)
    # Context tokens computed = prompt tokens + recomputed tokens - prefix hits.
    assert sum(s.num_context_tokens for s in stats) > 0
    assert sum(s.num_paused_requests for s in stats) == sum(r.num_preemptions for r in requests)
    assert sum(s.num_completed_requests for s in stats) == 5
    assert all(s.kv_used_blocks + s.kv_free_blocks == s.kv_max_blocks for s in stats)
    assert max(s.kv_utilization for s in stats) > 0.5
    assert all(s.num_context_tokens + s.num_generation_requests <= 16 for s in stats)
    assert stats[0].num_new_requests == 5 and stats[0].num_active_requests == 5


def test_iteration_rows_carry_the_work_the_cost_model_sees():
    """A prompt of 6 in chunks of 4 then 2, then decodes: each row holds the chunk's causal
    query-key pairs and the KV length its decode reads (prompt + outputs, new token in)."""
    executor = build_executor(dict(CONFIG, max_num_tokens=4))
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    executor.enqueue_requests([Request(0, [5, 6, 7, 8, 9, 10], params)])
    executor.run()
    rows = [
        (s.num_context_tokens, s.context_attention, s.decode_kv_tokens, s.max_decode_kv)
        for s in executor.iteration_stats
    ]
    # chunk of 4 behind 0 computed: 4 * (0 + 5/2); chunk of 2 behind 4: 2 * (4 + 3/2)
    assert rows == [(4, 10.0, 0, 0), (2, 11.0, 0, 0), (0, 0.0, 7, 7), (0, 0.0, 8, 8)]


def test_stop_tokens_and_eos_finish_early():
    executor = build_executor(CONFIG)
    prompt = [5, 6, 7]
    full = expected_output(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop_at = full[4]
    stopped = Request(0, prompt, SamplingParams(max_new_tokens=12, stop_token_ids=(stop_at,)))
    executor.enqueue_requests([stopped])
    executor.run()
    assert stopped.output_token_ids == full[: full.index(stop_at) + 1]
    assert stopped.finish_reason.value == "stop"


class AdmitAllOneStep(CapacityScheduler):
    """A user's own policy: admit in arrival order while next-step blocks fit; never pause."""

    def __init__(self, max_num_requests: int = 8):
        self.max_num_requests = max_num_requests
        self.calls = 0

    def schedule(self, active: Sequence[Request], kv: KVCacheManager) -> CapacityOutput:
        self.calls += 1
        kv.start_scheduling()
        fitting = []
        for request in active[: self.max_num_requests]:
            need = kv.get_remaining_blocks_to_completion(request)
            if not kv.scheduling_has_free_blocks(need):
                break
            kv.scheduling_add_sequence(request, need)
            fitting.append(request)
        return CapacityOutput(fitting, [])


def test_a_users_policy_plugs_in_as_an_instance_or_by_target():
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    mine = AdmitAllOneStep()
    reference = LLM("llama-tiny", device="cpu", dtype="float64").generate(prompts, params)
    by_instance = LLM("llama-tiny", device="cpu", dtype="float64", capacity_scheduler=mine)
    assert [o.token_ids for o in by_instance.generate(prompts, params)] == [
        o.token_ids for o in reference
    ]
    assert mine.calls > 0
    by_target = LLM(
        "llama-tiny",
        device="cpu",
        dtype="float64",
        capacity_scheduler=dict(_target_="tests.test_executor.AdmitAllOneStep", max_num_requests=1),
    )
    # (pytest may import this file under another module name: compare by class name)
    assert type(by_target.capacity_scheduler).__name__ == "AdmitAllOneStep"
    assert by_target.capacity_scheduler.max_num_requests == 1
    assert [o.token_ids for o in by_target.generate(prompts, params)] == [
        o.token_ids for o in reference
    ]


def test_trtllm_upper_case_names_resolve():
    llm = LLM("llama-tiny", device="cpu", capacity_scheduler="MAX_UTILIZATION")
    assert type(llm.capacity_scheduler).__name__ == "MaxUtilizationScheduler"
    assert llm.capacity_scheduler.max_num_requests == llm.microbatch_scheduler.max_batch_size


def test_string_prompts_use_the_byte_tokenizer():
    llm = LLM("llama-tiny", device="cpu", dtype="float64")
    [out] = llm.generate(["héllo"], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert out.prompt_token_ids == [b + 3 for b in "héllo".encode()]
    assert len(out.token_ids) == 4 and isinstance(out.text, str)


def test_sampling_top_k_1_is_greedy_and_seeds_reproduce():
    decoder = Decoder(seed=0)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1).tolist()
    requests = [Request(i, [1], SamplingParams(temperature=1.5, top_k=1, seed=i)) for i in range(3)]
    assert decoder.decode(requests, logits) == greedy

    def draws(seed):
        request = Request(0, [1], SamplingParams(temperature=1.0, top_p=0.9, seed=seed))
        d = Decoder()
        return [d.decode([request], logits[:1])[0] for _ in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]])  # p = .72, .26, .01, ...
    request = Request(0, [1], SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    decoder = Decoder()
    assert {decoder.decode([request], logits)[0] for _ in range(50)} == {0}
    wider = Request(1, [1], SamplingParams(temperature=1.0, top_p=0.95, seed=0))
    assert {decoder.decode([wider], logits)[0] for _ in range(200)} == {0, 1}


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
