"""Steps with prompt tokens through ``PiecewiseGraphRunner``: token buckets, static buffers,
graphs between eager attentions.

On CPU the runner runs its pieces on the padded static buffers without capturing
(``capture=False``, Triton through the interpreter), which checks everything but the capture; the
tests marked ``cuda`` capture real graphs.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_engine import build_forward_batch, flatten_batch
from engine.piecewise_graphs import PiecewiseGraphRunner, default_piecewise_token_sizes
from engine.scheduler import SchedulerOutput
from tests.test_cuda_graphs import (
    assert_only_slots_written,
    eager_reference,
    forward_without_sync,
)

IS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if IS_CUDA else "cpu"
cuda = pytest.mark.skipif(not IS_CUDA, reason="needs a CUDA GPU")

CONFIG = dict(
    capacity_scheduler="max_utilization",
    microbatch_scheduler=dict(max_batch_size=4, max_num_tokens=16, chunking="equal_progress"),
    kv_cache_manager=dict(tokens_per_block=4, num_blocks=20, enable_block_reuse=True),
)


def make_llm(preset: str = "llama-tiny", **kwargs) -> LLM:
    return LLM(
        preset,
        device=DEVICE,
        attention_backend="triton",
        **{**CONFIG, "dtype": "float32", "enforce_eager": True, **kwargs},
    )


def attach(llm: LLM, token_sizes, max_num_seqs: int = 4) -> PiecewiseGraphRunner:
    """The runner LLM builds on CUDA, attached by hand so CPU tests can run it uncaptured."""
    runner = PiecewiseGraphRunner(
        llm.model_engine.model,
        llm.kv_cache_manager.kv_pool,
        token_sizes,
        max_num_seqs,
        capture=IS_CUDA,
    )
    llm.model_engine.piecewise_runner = runner
    return runner


def test_default_token_sizes_pad_at_most_twofold():
    assert default_piecewise_token_sizes(8192) == [
        16,
        32,
        64,
        128,
        256,
        512,
        1024,
        2048,
        4096,
        8192,
    ]
    assert default_piecewise_token_sizes(100) == [16, 32, 64, 100]
    assert default_piecewise_token_sizes(16) == [16]
    assert default_piecewise_token_sizes(8) == [8]


def test_buckets_rows_and_bad_setups():
    llm = make_llm()
    runner = attach(llm, [16, 4, 8], max_num_seqs=6)
    assert runner.token_sizes == [4, 8, 16] and runner.num_pieces == 3  # two layers + the head
    assert [runner.bucket_for(n) for n in (1, 4, 5, 16)] == [4, 4, 8, 16]
    assert [runner.rows_for(b) for b in (4, 8, 16)] == [4, 6, 6]
    with pytest.raises(ValueError, match="exceed the largest bucket 16"):
        runner.bucket_for(17)
    model, pool = llm.model_engine.model, llm.kv_cache_manager.kv_pool
    with pytest.raises(ValueError, match="positive"):
        PiecewiseGraphRunner(model, pool, [], 4, capture=False)
    if not IS_CUDA:
        with pytest.raises(ValueError, match="need a CUDA device"):
            PiecewiseGraphRunner(model, pool, [8], 4, capture=True)
        with pytest.raises(ValueError, match="needs a CUDA device"):
            make_llm(enforce_eager=False, piecewise_cuda_graphs=True)
    torch_llm = LLM(
        "llama-tiny", device=DEVICE, dtype="float32", attention_backend="torch", enforce_eager=True
    )
    with pytest.raises(ValueError, match="triton attention backend"):
        PiecewiseGraphRunner(
            torch_llm.model_engine.model, torch_llm.kv_cache_manager.kv_pool, [8], 4, capture=False
        )


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny", "qwen3-tiny"])
def test_a_padded_mixed_step_equals_the_eager_one_and_writes_only_its_slots(preset):
    """A mixed step of 7 tokens (a 5-token prompt and 2 decodes) in a bucket of 16: its logits
    equal the eager forward's, and only its own KV slots change (Qwen2: a qkv bias; Qwen3: q/k
    norms and a head_dim of its own, inside the pieces)."""
    llm = make_llm(preset)
    runner = attach(llm, [16])
    decodes = llm.make_requests([[5, 6, 7], [8, 9, 10, 11]], SamplingParams(max_new_tokens=8))
    llm.executor.enqueue_requests(decodes)
    while not all(r.is_generation for r in decodes):
        llm.executor.step()
    (prompt,) = llm.make_requests([[20, 21, 22, 23, 24]], SamplingParams(max_new_tokens=8))
    llm.executor.enqueue_requests([prompt])
    prompt.start(0.0)
    batch = SchedulerOutput(context_requests=[prompt], generation_requests=decodes)
    prompt.context_chunk_size = 5
    kv = llm.kv_cache_manager
    kv.prepare_resources(batch)
    inputs = build_forward_batch(batch, kv, torch.device(DEVICE))
    model = llm.model_engine.model
    expected, eager_pool = eager_reference(model, inputs, kv.kv_pool)

    host = flatten_batch(batch, kv)
    assert host.num_tokens == 7 and runner.can_run(host)
    got = runner.run(host, inputs, kv.kv_pool)
    assert got.shape == expected.shape == (3, model.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_only_slots_written(kv.kv_pool, eager_pool, inputs.slot_mapping)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_a_whole_run_through_piecewise_buckets_equals_eager(overlap):
    """Chunked prefill, prefix reuse and preemption: every step runs through the buckets (8 and
    16 tokens), and the greedy tokens equal an all-eager run, with or without overlap
    scheduling (input ids filled from the previous step's tokens in the static buffer)."""
    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, 259, (12,), generator=g).tolist()
    prompts = [system + torch.randint(3, 259, (n,), generator=g).tolist() for n in (9, 2, 20)]
    prompts.append(torch.randint(3, 259, (6,), generator=g).tolist())
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (10, 3, 7, 5)]
    small_pool = dict(tokens_per_block=4, num_blocks=12, enable_block_reuse=True)  # preempts
    eager = make_llm(kv_cache_manager=small_pool).generate(prompts, params)

    llm = make_llm(kv_cache_manager=small_pool, overlap_scheduler=overlap)
    runner = attach(llm, [8, 16])
    buckets: list[tuple[int, int]] = []
    run = runner.run

    def spy(host, batch, kv_pool, pending_tokens=None):
        buckets.append((host.num_tokens, runner.bucket_for(host.num_tokens)))
        return run(host, batch, kv_pool, pending_tokens)

    runner.run = spy
    piecewise = llm.generate(prompts, params)
    assert [o.token_ids for o in piecewise] == [o.token_ids for o in eager]
    assert sum(o.metrics.num_preemptions for o in piecewise) > 0
    assert sum(o.metrics.num_cached_tokens for o in piecewise) > 0
    # With no decode graphs attached, decode-only steps take the pieces too: every step does.
    num_forwards = sum(1 for s in llm.executor.iteration_stats if s.num_scheduled_tokens)
    assert runner.num_steps == len(buckets) == num_forwards
    assert {b for _, b in buckets} == {8, 16} and all(n <= b for n, b in buckets)
    rows = [s for s in llm.executor.iteration_stats if s.num_scheduled_tokens]
    assert [s.num_padded_tokens for s in rows] == [b for _, b in buckets]  # recorded, in order
    kv = llm.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks


@cuda
@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny"])
def test_captured_pieces_give_the_same_tokens(preset):
    """LLM(piecewise_cuda_graphs=True) on the GPU (float32): the same greedy tokens as without,
    with every step that carries prompt tokens served by the graphs."""
    prompts = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate((5, 17, 30, 9))]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    config = dict(CONFIG, dtype="float32", enforce_eager=False)
    outputs = {}
    for piecewise in (False, True):
        llm = LLM(preset, device="cuda", attention_backend="triton", **config,
                  piecewise_cuda_graphs=piecewise)  # fmt: skip
        outputs[piecewise] = [o.token_ids for o in llm.generate(prompts, params)]
        if piecewise:
            runner = llm.model_engine.piecewise_runner
            assert runner.is_captured and runner.token_sizes == [16]
            steps = sum(1 for s in llm.executor.iteration_stats if s.num_context_tokens)
            assert runner.num_steps == steps > 0
    assert outputs[True] == outputs[False]


@cuda
def test_a_piecewise_step_does_not_synchronise_the_host():
    """A mixed step through the pieces queues its work without waiting for the GPU (the
    decoder's read of the new tokens, outside ``forward``, is the step's only sync)."""
    llm = LLM(
        "llama-tiny",
        device="cuda",
        dtype="bfloat16",
        microbatch_scheduler=dict(max_batch_size=8, max_num_tokens=64),
        kv_cache_manager=dict(tokens_per_block=16, max_tokens=4096),
        piecewise_cuda_graphs=True,
    )
    decodes = llm.make_requests([[5, 6, 7], [8, 9, 10, 11]], SamplingParams(max_new_tokens=8))
    llm.executor.enqueue_requests(decodes)
    while not all(r.is_generation for r in decodes):
        llm.executor.step()
    (prompt,) = llm.make_requests([[12] * 40], SamplingParams(max_new_tokens=8))
    llm.executor.enqueue_requests([prompt])
    prompt.start(0.0)
    prompt.context_chunk_size = 40
    batch = SchedulerOutput(context_requests=[prompt], generation_requests=decodes)
    kv = llm.kv_cache_manager
    kv.prepare_resources(batch)
    runner = llm.model_engine.piecewise_runner
    before = runner.num_steps
    logits = forward_without_sync(llm, batch)
    assert logits.shape[0] == 3 and runner.num_steps == before + 1


def test_piecewise_graphs_default_to_where_they_can_run():
    """``piecewise_cuda_graphs=None`` (the default): on for CUDA with Triton attention and a token
    budget, off on CPU and under enforce_eager; False is always off."""
    llm = make_llm(enforce_eager=False)
    assert (llm.model_engine.piecewise_runner is not None) is IS_CUDA
    for kwargs in (
        dict(enforce_eager=True),
        dict(enforce_eager=False, piecewise_cuda_graphs=False),
    ):
        assert make_llm(**kwargs).model_engine.piecewise_runner is None, kwargs


def test_release_gpu_memory_drops_the_pool_and_every_graph():
    llm = make_llm(enforce_eager=not IS_CUDA)
    attach(llm, [16])
    llm.release_gpu_memory()
    engine = llm.model_engine
    assert llm.kv_cache_manager.kv_pool is None
    assert engine.graph_runner is None and engine.piecewise_runner is None
    with pytest.raises(RuntimeError, match="no pool"):
        llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))
