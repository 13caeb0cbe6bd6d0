"""The model engine on the Triton kernels (interpreted on CPU, compiled on CUDA) gives the same
greedy tokens as on the torch reference attention, through chunked prefill, decode, preemption
and prefix reuse."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.models import load_model
from engine.models.llama import resolve_attention_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_backend_matches_the_torch_reference():
    hf = load_model("llama-tiny", device=DEVICE, dtype=torch.float32, seed=0).hf_model
    g = torch.Generator().manual_seed(5)
    system = torch.randint(3, 259, (12,), generator=g).tolist()
    prompts = [system + torch.randint(3, 259, (n,), generator=g).tolist() for n in (9, 2, 20)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            hf,
            device=DEVICE,
            dtype="float32",
            attention_backend=backend,
            capacity_scheduler="max_utilization",
            microbatch_scheduler=dict(
                max_batch_size=3, max_num_tokens=16, chunking="equal_progress"
            ),
            kv_cache_manager=dict(tokens_per_block=4, num_blocks=16, enable_block_reuse=True),
        )
        assert llm.model_engine.model.attention_backend == backend
        result = llm.generate(prompts, params)
        outputs[backend] = [o.token_ids for o in result]
        if backend == "triton":
            assert sum(o.metrics.num_preemptions for o in result) > 0
            assert sum(o.metrics.num_cached_tokens for o in result) > 0
    assert outputs["triton"] == outputs["torch"]


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        resolve_attention_backend("flash", torch.device("cpu"))
    assert resolve_attention_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_attention_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_decode_batch_leaves_real_rows_and_the_pool_untouched(backend):
    """The building block of CUDA-graph buckets: padding rows (slot -1) change neither the real
    rows' logits nor any pool slot."""
    from engine.model_engine import build_forward_batch, pad_decode_batch
    from engine.scheduler import SchedulerOutput

    llm = LLM(
        "llama-tiny",
        device=DEVICE,
        dtype="float32",
        attention_backend=backend,
        kv_cache_manager=dict(tokens_per_block=4, num_blocks=32),
    )
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    requests = llm.make_requests(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    executor = llm.executor
    executor.enqueue_requests(requests)
    while not all(r.is_generation for r in requests):
        executor.step()
    batch = SchedulerOutput(generation_requests=requests)
    kv = llm.kv_cache_manager
    kv.prepare_resources(batch)
    inputs = build_forward_batch(batch, kv, torch.device(DEVICE))
    model = llm.model_engine.model
    pool_before = kv.kv_pool.clone()
    expected = model.forward(inputs, kv.kv_pool)
    pool_after_real = kv.kv_pool.clone()
    kv.kv_pool.copy_(pool_before)
    padded = model.forward(pad_decode_batch(inputs, 8), kv.kv_pool)
    assert padded.shape[0] == 8
    torch.testing.assert_close(padded[:2], expected, rtol=1e-5, atol=1e-5)
    # Real rows wrote their slots (to float32 rounding: a batch of 8 may take other BLAS paths);
    # every other slot is bit-identical, i.e. the padding rows wrote nothing.
    layers, _, blocks, tpb = kv.kv_pool.shape[:4]
    after = kv.kv_pool.reshape(layers, 2, blocks * tpb, -1)
    reference = pool_after_real.reshape(layers, 2, blocks * tpb, -1)
    real = torch.zeros(blocks * tpb, dtype=torch.bool, device=after.device)
    real[inputs.slot_mapping] = True
    torch.testing.assert_close(after[:, :, real], reference[:, :, real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[:, :, ~real], reference[:, :, ~real], rtol=0, atol=0)
    with pytest.raises(ValueError, match="down to"):
        pad_decode_batch(inputs, 1)
