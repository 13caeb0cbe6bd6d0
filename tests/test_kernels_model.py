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


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny", "qwen3-tiny", "mistral-tiny"])
def test_triton_backend_matches_the_torch_reference(preset):
    """Attention, norms (fused with the residual adds), RoPE and SiLU-and-mul on Triton: the
    same greedy tokens as the torch path, for each architecture (qkv bias, q/k norms, window)."""
    hf = load_model(preset, device=DEVICE, dtype=torch.float32, seed=0).hf_model
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
            enforce_eager=True,  # the torch reference cannot run in CUDA graphs
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
