"""Token-exact greedy output against transformers ``generate()`` (float64, CPU), whatever the
scheduling: every capacity policy x chunking policy x block reuse, on both tiny presets.

The workload is built so that each mechanism really runs: the KV pool is far smaller than the
batch's worst case (MAX_UTILIZATION must pause and recompute), prompts are longer than the token
budget (chunked prefill spans several steps), and prompts share prefixes (reuse hits).
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.models import load_model

MAX_NEW_TOKENS = 12
CAPACITY = ["guaranteed_no_evict", "max_utilization", "static_batch"]
CHUNKING = [None, "first_come_first_served", "equal_progress"]


def make_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)

    def rand(n):
        return torch.randint(3, 259, (n,), generator=g).tolist()

    system = rand(16)  # a shared "system prompt" of 4 blocks
    return [
        system + rand(14),  # 30 tokens: longer than the chunked budget
        rand(9),
        system + rand(5),
        rand(23),
        system + rand(14),
        system[:8] + rand(3),
        rand(5),
    ]


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=hf_model.device)
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=["llama-tiny", "qwen2-tiny"])
def reference(request):
    loaded = load_model(request.param, device="cpu", dtype=torch.float64, seed=0)
    prompts = make_prompts()
    expected = [hf_greedy(loaded.hf_model, p, MAX_NEW_TOKENS) for p in prompts]
    assert len({tuple(e) for e in expected}) > 1 and all(len(set(e)) > 1 for e in expected)
    return loaded.hf_model, prompts, expected


def reference_llm(
    hf_model,
    capacity: str,
    chunking: str | None,
    *,
    enable_block_reuse: bool = True,
    overlap: bool = False,
) -> LLM:
    """The float64 CPU engine the transformers comparisons run: 4 sequences, small token
    budget (16 chunked, 32 not), 4-token blocks."""
    return LLM(
        hf_model,
        device="cpu",
        dtype="float64",
        capacity_scheduler=capacity,
        microbatch_scheduler=dict(
            max_batch_size=4, max_num_tokens=16 if chunking else 32, chunking=chunking
        ),
        kv_cache_manager=dict(
            tokens_per_block=4, num_blocks=16, enable_block_reuse=enable_block_reuse
        ),
        overlap_scheduler=overlap,
    )


@pytest.mark.parametrize("enable_block_reuse", [False, True], ids=["noreuse", "reuse"])
@pytest.mark.parametrize("chunking", CHUNKING, ids=["nochunk", "fcfs", "equal"])
@pytest.mark.parametrize("capacity", CAPACITY)
def test_greedy_matches_transformers(reference, capacity, chunking, enable_block_reuse):
    hf_model, prompts, expected = reference
    llm = reference_llm(hf_model, capacity, chunking, enable_block_reuse=enable_block_reuse)
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outputs] == expected
    assert all(o.finish_reason == "length" for o in outputs)
    stats = llm.executor.iteration_stats
    if capacity == "max_utilization":
        assert sum(o.metrics.num_preemptions for o in outputs) > 0, "pool never ran short"
    if chunking:
        # a 30-token prompt under a 16-token budget needs at least two context steps
        assert sum(s.num_context_tokens for s in stats) >= sum(len(p) for p in prompts) - sum(
            o.metrics.num_cached_tokens for o in outputs
        )
    if enable_block_reuse:
        assert sum(o.metrics.num_cached_tokens for o in outputs) > 0, "no prefix hit"
    kv = llm.kv_cache_manager
    kv.check_integrity()
    assert kv.get_kv_cache_stats().used_num_blocks == 0


def test_sampling_is_reproducible_and_schedule_independent(reference):
    """Per-request seeded generators: the same samples whatever the policy and preemptions."""
    hf_model, prompts, _ = reference
    params = [
        SamplingParams(
            max_new_tokens=8, temperature=0.8, top_k=50, top_p=0.9, seed=i, ignore_eos=True
        )
        for i in range(len(prompts))
    ]
    results = []
    for capacity, blocks in [("guaranteed_no_evict", 64), ("max_utilization", 12)]:
        llm = LLM(
            hf_model,
            device="cpu",
            dtype="float64",
            capacity_scheduler=capacity,
            microbatch_scheduler=dict(max_batch_size=4, max_num_tokens=32),
            kv_cache_manager=dict(tokens_per_block=4, num_blocks=blocks),
        )
        results.append([o.token_ids for o in llm.generate(prompts, params)])
    assert results[0] == results[1]
    greedy = [
        o.token_ids
        for o in LLM(hf_model, device="cpu", dtype="float64").generate(
            prompts, SamplingParams(max_new_tokens=8, ignore_eos=True)
        )
    ]
    assert results[0] != greedy
