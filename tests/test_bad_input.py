"""Bad input gets a clear error or a per-request rejection; the other requests still complete."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.models import load_model
from tests.test_generate_equivalence import hf_greedy


@pytest.fixture(scope="module")
def tiny():
    return load_model("llama-tiny", device="cpu", dtype=torch.float64, seed=0).hf_model


def small_llm(tiny, **overrides):
    args = dict(
        device="cpu",
        dtype="float64",
        capacity_scheduler="max_utilization",
        microbatch_scheduler=dict(max_batch_size=4, max_num_tokens=32),
        kv_cache_manager=dict(tokens_per_block=4, num_blocks=8),
    )
    args.update(overrides)
    return LLM(tiny, **args)


def test_requests_that_can_never_run_are_rejected_and_the_rest_complete(tiny):
    llm = small_llm(tiny)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompts = [
        [5, 6, 7, 8],
        list(range(3, 32)),  # 29 + 4 tokens: 9 blocks > 8 in the pool
        [],  # empty
        [5, 9999],  # outside the vocabulary
        [9, 10, 11],
    ]
    outputs = llm.generate(prompts, params)
    assert [o.finish_reason for o in outputs] == [
        "length",
        "rejected",
        "rejected",
        "rejected",
        "length",
    ]
    assert (
        "9 KV-cache blocks" in outputs[1].rejection_reason
        and "only 8" in outputs[1].rejection_reason
    )
    assert outputs[2].rejection_reason == "empty prompt"
    assert "9999" in outputs[3].rejection_reason
    assert outputs[0].token_ids == hf_greedy(tiny, prompts[0], 4)
    assert outputs[4].token_ids == hf_greedy(tiny, prompts[4], 4)


def test_prompt_beyond_the_model_max_length_is_rejected(tiny):
    llm = small_llm(tiny, kv_cache_manager=dict(tokens_per_block=16, num_blocks=64))
    max_len = llm.model_engine.max_seq_len
    outputs = llm.generate([[5] * (max_len - 2), [5, 6]], SamplingParams(max_new_tokens=4))
    assert outputs[0].finish_reason == "rejected"
    assert f"max length {max_len}" in outputs[0].rejection_reason
    assert outputs[1].finish_reason in ("length", "stop")


def test_prompt_longer_than_the_token_budget_without_chunking_is_rejected(tiny):
    llm = small_llm(tiny, microbatch_scheduler=dict(max_batch_size=4, max_num_tokens=8))
    outputs = llm.generate([list(range(3, 15)), [4, 5]], SamplingParams(max_new_tokens=2))
    assert outputs[0].finish_reason == "rejected"
    assert "max_num_tokens=8" in outputs[0].rejection_reason
    assert outputs[1].finish_reason != "rejected"


def test_paused_request_whose_folded_prompt_outgrew_the_budget_still_finishes(tiny):
    """No chunking, budget 12: prompts of 10 fit, but after a pause a request's folded prompt
    (prompt + generated) is longer than 12; it is recomputed in chunks and finishes exactly."""
    llm = small_llm(
        tiny,
        microbatch_scheduler=dict(max_batch_size=4, max_num_tokens=12),
        kv_cache_manager=dict(tokens_per_block=4, num_blocks=10),
    )
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 259, (10,), generator=g).tolist() for _ in range(3)]
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=14, ignore_eos=True))
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.finish_reason == "length"
        assert output.token_ids == hf_greedy(tiny, prompt, 14)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(kv_cache_manager=dict(num_blocks=0)), "num_blocks"),
        (dict(kv_cache_manager=dict(tokens_per_block=3, num_blocks=8)), "tokens_per_block"),
        (dict(microbatch_scheduler=dict(max_batch_size=0)), "max_batch_size"),
        (dict(capacity_scheduler="shortest_job_first"), "guaranteed_no_evict"),
        (dict(microbatch_scheduler=dict(chunking="lifo")), "equal_progress"),
        (dict(kv_cache_manager=dict(name="radix")), "paged"),
        (
            dict(
                microbatch_scheduler=dict(max_num_tokens=8, chunking="equal_progress"),
                kv_cache_manager=dict(tokens_per_block=16, num_blocks=8),
            ),
            "chunk_unit_size",
        ),
        (dict(capacity_scheduler=dict(_target_="nowhere.Scheduler")), "nowhere.Scheduler"),
        (dict(microbatch_scheduler=dict(max_batch_size=2, budget=3)), "budget"),
        (dict(dtype="float8"), "dtype"),
        (dict(device="tpu"), "device"),
    ],
)
def test_impossible_configs_fail_at_construction(tiny, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_llm(tiny, **overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_an_error_not_a_fallback(tiny):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        small_llm(tiny, device="cuda")


def test_unknown_model_names_the_presets():
    with pytest.raises(ValueError, match="llama-tiny"):
        LLM("no-such-model", device="cpu")
