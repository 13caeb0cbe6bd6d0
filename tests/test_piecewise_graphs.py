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
from kernels.paged_prefill import prefill_tiles
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


def attach(
    llm: LLM, token_sizes, max_num_seqs: int = 4, full: bool = False
) -> PiecewiseGraphRunner:
    """The runner LLM builds on CUDA, attached by hand so CPU tests can run it uncaptured."""
    runner = PiecewiseGraphRunner(
        llm.model_engine.model,
        llm.kv_cache_manager.kv_pool,
        token_sizes,
        max_num_seqs,
        capture=IS_CUDA,
        full=full,
        max_blocks_per_seq=llm._max_blocks_per_seq(llm.model_engine.model),
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
    with pytest.raises(ValueError, match="max_blocks_per_seq"):
        PiecewiseGraphRunner(model, pool, [8], 4, capture=False, full=True)
    for kwargs in (dict(enforce_eager=True), dict(piecewise_cuda_graphs=False)):
        with pytest.raises(ValueError, match="full_cuda_graphs=True captures"):
            make_llm(**{**kwargs, "full_cuda_graphs": True})
    if not IS_CUDA:
        with pytest.raises(ValueError, match="full_cuda_graphs=True needs a CUDA device"):
            make_llm(enforce_eager=False, full_cuda_graphs=True)
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


# (full, prompt tokens, bucket): a 40-token chunk folds into 80 rows, two of the CPU
# kernel's 64-row tiles; the sequences in a bucket of 64 are padded to its rows.
SHAPES = [(False, 5, 16), (True, 5, 16), (True, 40, 64)]


@pytest.mark.parametrize(("full", "prompt_len", "bucket"), SHAPES, ids=["pieces", "full", "full-2"])
@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny", "qwen3-tiny"])
def test_a_padded_mixed_step_equals_the_eager_one_and_writes_only_its_slots(
    preset, full, prompt_len, bucket
):
    """A mixed step (a prompt and 2 decodes) in a bigger bucket: its logits equal the eager
    forward's, and only its own KV slots change (Qwen2: a qkv bias; Qwen3: q/k norms and a
    head_dim of its own, inside the pieces). Full: attention from the static buffers too,
    decodes through the varlen kernel."""
    llm = make_llm(preset)
    runner = attach(llm, [bucket], max_num_seqs=6, full=full)
    decodes = llm.make_requests([[5, 6, 7], [8, 9, 10, 11]], SamplingParams(max_new_tokens=8))
    llm.executor.enqueue_requests(decodes)
    while not all(r.is_generation for r in decodes):
        llm.executor.step()
    prompt_ids = [20 + i % 200 for i in range(prompt_len)]
    (prompt,) = llm.make_requests([prompt_ids], SamplingParams(max_new_tokens=8))
    llm.executor.enqueue_requests([prompt])
    prompt.start(0.0)
    batch = SchedulerOutput(context_requests=[prompt], generation_requests=decodes)
    prompt.context_chunk_size = prompt_len
    kv = llm.kv_cache_manager
    kv.prepare_resources(batch)
    inputs = build_forward_batch(batch, kv, torch.device(DEVICE))
    model = llm.model_engine.model
    expected, eager_pool = eager_reference(model, inputs, kv.kv_pool)

    host = flatten_batch(batch, kv)
    assert host.num_tokens == prompt_len + 2 and runner.can_run(host)
    num_tiles = len(prefill_tiles(host.query_start_loc, runner.group, runner.block_m)) // 2
    assert num_tiles == (4 if prompt_len == 40 else 3)  # the long chunk takes two tiles
    got = runner.run(host, None if full else inputs, kv.kv_pool)
    assert got.shape == expected.shape == (3, model.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_only_slots_written(kv.kv_pool, eager_pool, inputs.slot_mapping)


@pytest.mark.parametrize("full", [False, True], ids=["pieces", "full"])
def test_capture_runs_every_bucket_on_inputs_that_write_nothing(full):
    """What capturing runs once before it records (``capture_graph``'s warm-up), after any
    step: each bucket's inputs cleared in turn (the buckets' views of the flat buffer overlap),
    its forward writes no KV slot and gives finite logits."""
    llm = make_llm()
    runner = attach(llm, [4, 8, 16], full=full)
    llm.generate([[5, 6, 7, 8, 9, 10]], SamplingParams(max_new_tokens=3))  # leaves stale inputs
    pool = llm.kv_cache_manager.kv_pool
    before = pool.clone()
    for bucket in reversed(runner.token_sizes):
        runner._clear_inputs(bucket)
        if full:
            runner._forward_full(bucket)
        else:
            for index in range(runner.num_pieces):
                runner._forward_piece(index, bucket)
        assert torch.isfinite(runner._logits[: runner.rows_for(bucket)]).all()
    assert torch.equal(pool, before)


def test_a_full_graph_refuses_a_step_it_has_no_room_for():
    """More sequences than the bucket's rows, or a sequence longer than the block table: the
    step runs eagerly instead (``can_run`` is False)."""
    llm = make_llm()
    runner = attach(llm, [4, 16], max_num_seqs=2, full=True)
    reqs = llm.make_requests([[5, 6], [7, 8], [9, 10]], SamplingParams(max_new_tokens=4))
    for r in reqs:
        r.context_chunk_size = 2
    kv = llm.kv_cache_manager
    three = SchedulerOutput(context_requests=reqs, generation_requests=[])
    kv.prepare_resources(three)
    assert not runner.can_run(flatten_batch(three, kv))  # 3 sequences, 2 rows
    two = SchedulerOutput(context_requests=reqs[:2], generation_requests=[])
    assert runner.can_run(flatten_batch(two, kv))
    runner._table = runner._table[:, :0]  # as if every sequence were longer than its width
    assert not runner.can_run(flatten_batch(two, kv))


@pytest.mark.parametrize(
    ("overlap", "full"), [(False, False), (True, False), (True, True)],
    ids=["sync", "overlap", "overlap-full"],
)  # fmt: skip
def test_a_whole_run_through_piecewise_buckets_equals_eager(overlap, full):
    """Chunked prefill, prefix reuse and preemption: every step runs through the buckets (8 and
    16 tokens), and the greedy tokens equal an all-eager run, with or without overlap
    scheduling (input ids filled from the previous step's tokens in the static buffer), with
    attention between the pieces or inside full graphs."""
    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, 259, (12,), generator=g).tolist()
    prompts = [system + torch.randint(3, 259, (n,), generator=g).tolist() for n in (9, 2, 20)]
    prompts.append(torch.randint(3, 259, (6,), generator=g).tolist())
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (10, 3, 7, 5)]
    small_pool = dict(tokens_per_block=4, num_blocks=12, enable_block_reuse=True)  # preempts
    eager = make_llm(kv_cache_manager=small_pool).generate(prompts, params)

    llm = make_llm(kv_cache_manager=small_pool, overlap_scheduler=overlap)
    runner = attach(llm, [8, 16], full=full)
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
    """LLM(piecewise_cuda_graphs=True) and LLM(full_cuda_graphs=True) on the GPU (float32): the
    same greedy tokens as without, with every step that carries prompt tokens served by the
    graphs (full: one graph a bucket)."""
    prompts = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate((5, 17, 30, 9))]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    config = dict(CONFIG, dtype="float32", enforce_eager=False)
    outputs = {}
    for mode in ("eager", "pieces", "full"):
        graphs = dict(piecewise_cuda_graphs=mode != "eager", full_cuda_graphs=mode == "full")
        llm = LLM(preset, device="cuda", attention_backend="triton", **config, **graphs)
        outputs[mode] = [o.token_ids for o in llm.generate(prompts, params)]
        if mode != "eager":
            runner = llm.model_engine.piecewise_runner
            assert runner.is_captured and runner.token_sizes == [16]
            assert runner.is_full == (mode == "full")
            assert len(runner._graphs) == (1 if mode == "full" else runner.num_pieces)
            steps = sum(1 for s in llm.executor.iteration_stats if s.num_context_tokens)
            assert runner.num_steps == steps > 0
    assert outputs["pieces"] == outputs["eager"]
    assert outputs["full"] == outputs["eager"]


@cuda
@pytest.mark.parametrize("full", [False, True], ids=["pieces", "full"])
def test_a_piecewise_step_does_not_synchronise_the_host(full):
    """A mixed step through the pieces (or a full graph) queues its work without waiting for
    the GPU (the decoder's read of the new tokens, outside ``forward``, is the step's only
    sync)."""
    llm = LLM(
        "llama-tiny",
        device="cuda",
        dtype="bfloat16",
        microbatch_scheduler=dict(max_batch_size=8, max_num_tokens=64),
        kv_cache_manager=dict(tokens_per_block=16, max_tokens=4096),
        piecewise_cuda_graphs=True,
        full_cuda_graphs=full,
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
