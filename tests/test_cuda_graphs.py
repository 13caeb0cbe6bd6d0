"""Decode steps through ``DecodeGraphRunner``: padded buckets, static buffers, captured graphs.

On CPU the runner runs its padded static-buffer forward eagerly (``capture=False``), which checks
everything but the capture itself; on CUDA the same tests capture real graphs, and the tests
marked ``cuda`` add what only a GPU can show (no host sync, bf16 tolerance).
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import DecodeGraphRunner, default_cuda_graph_batch_sizes
from engine.model_engine import build_forward_batch, flatten_batch
from engine.scheduler import SchedulerOutput

IS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if IS_CUDA else "cpu"
cuda = pytest.mark.skipif(not IS_CUDA, reason="needs a CUDA GPU")


def make_llm(backend: str = "triton", **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_manager", dict(tokens_per_block=4, num_blocks=32))
    return LLM(
        "llama-tiny",
        device=DEVICE,
        dtype=kwargs.pop("dtype", "float32"),
        attention_backend=backend,
        enforce_eager=True,
        **kwargs,
    )


def attach_runner(
    llm: LLM, batch_sizes, *, capture: bool | None = None, max_pending_rows: int | None = None
) -> DecodeGraphRunner:
    """The runner LLM builds on CUDA, attached by hand so CPU tests can run it uncaptured."""
    kv = llm.kv_cache_manager
    runner = DecodeGraphRunner(
        llm.model_engine.model,
        kv.kv_pool,
        batch_sizes,
        max_blocks_per_seq=kv.num_blocks,
        capture=IS_CUDA if capture is None else capture,
        max_pending_rows=max_pending_rows,
    )
    llm.model_engine.graph_runner = runner
    return runner


def decoding(llm: LLM, prompts: list[list[int]]):
    """Requests of ``prompts`` run until each has its first token (all decoding)."""
    requests = llm.make_requests(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    llm.executor.enqueue_requests(requests)
    while not all(r.is_generation for r in requests):
        llm.executor.step()
    return requests


def test_default_buckets():
    assert default_cuda_graph_batch_sizes(256) == [1, 2, 4, 8, 16, 32, *range(48, 257, 16)]
    assert default_cuda_graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert default_cuda_graph_batch_sizes(3) == [1, 2, 3]
    assert default_cuda_graph_batch_sizes(1) == [1]


def test_bucket_choice_and_eligibility():
    llm = make_llm("torch")
    runner = attach_runner(llm, [4, 1, 2], capture=False)
    assert runner.batch_sizes == [1, 2, 4]
    assert [runner.bucket_for(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    with pytest.raises(ValueError, match="exceed the largest bucket 4"):
        runner.bucket_for(5)
    kv = llm.kv_cache_manager
    requests = decoding(llm, [[5, 6, 7], [8, 9], [10, 11, 12, 13], [3, 4], [20, 21]])
    decode_batch = SchedulerOutput(generation_requests=requests[:3])
    kv.prepare_resources(decode_batch)
    assert runner.can_run(flatten_batch(decode_batch, kv))
    too_many = SchedulerOutput(generation_requests=requests)
    assert not runner.can_run(flatten_batch(too_many, kv))  # 5 > the largest bucket


def decode_batch(rows: list[list[int]], keys: list[int] | None = None):
    """A decode-only ``HostBatch`` of sequences holding ``rows`` of blocks (4 tokens a block,
    one slot free in the last), with request ids ``keys`` (None: unknown)."""
    from engine.model_engine import HostBatch

    n = len(rows)
    lens = [4 * len(r) - 1 for r in rows]
    return HostBatch(
        input_ids=[7] * n,
        positions=[s - 1 for s in lens],
        query_start_loc=list(range(n + 1)),
        logits_indices=list(range(n)),
        block_rows=rows,
        tokens_per_block=4,
        num_context_seqs=0,
        num_context_tokens=0,
        row_keys=keys or [],
    )


def test_block_table_rows_are_sent_only_when_they_change():
    """A decode step sends the block-table rows that differ from the table's: none for the same
    batch again, one for a sequence that gained a block, the moved ones for a new order."""
    llm = make_llm("torch")
    runner = attach_runner(llm, [4], capture=False)
    host = decode_batch

    def table_rows(rows):
        return [runner._block_tables[i, : len(r)].tolist() for i, r in enumerate(rows)]

    first = [[1, 2], [3], [4, 5, 6]]
    runner.load(host(first))
    assert runner.last_num_rows_sent == 3 and table_rows(first) == first
    runner.load(host([list(r) for r in first]))
    assert runner.last_num_rows_sent == 0
    grown = [[1, 2], [3, 9], [4, 5, 6]]
    runner.load(host(grown))
    assert runner.last_num_rows_sent == 1 and table_rows(grown) == grown
    reordered = [[4, 5, 6], [1, 2], [3, 9], [8]]
    runner.load(host(reordered))
    assert runner.last_num_rows_sent == 4 and table_rows(reordered) == reordered
    runner._derive_inputs(4)
    assert runner._derived[3, :4].tolist() == [11, 7, 7, 3]  # seq_lens follow the new order
    assert runner._derived[2, :4].tolist() == [6 * 4 + 2, 2 * 4 + 2, 9 * 4 + 2, 8 * 4 + 2]


def test_runner_rejects_bad_setups():
    llm = make_llm("torch")
    kv = llm.kv_cache_manager
    model = llm.model_engine.model
    with pytest.raises(ValueError, match="positive"):
        DecodeGraphRunner(model, kv.kv_pool, [], 8, capture=False)
    with pytest.raises(ValueError, match="positive"):
        DecodeGraphRunner(model, kv.kv_pool, [0, 2], 8, capture=False)
    if not IS_CUDA:
        with pytest.raises(ValueError, match="need a CUDA device"):
            DecodeGraphRunner(model, kv.kv_pool, [1], 8, capture=True)
    else:
        with pytest.raises(ValueError, match="triton attention backend"):
            DecodeGraphRunner(model, kv.kv_pool, [1], 8, capture=True)
        with pytest.raises(ValueError, match="enforce_eager=True"):
            LLM("llama-tiny", device="cuda", attention_backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padding_rows_leave_real_rows_and_the_pool_untouched(backend):
    """2 real decodes in a bucket of 8: the real rows' logits equal the unpadded forward, and the
    padding rows (slot -1) write no pool slot."""
    llm = make_llm(backend)
    capture = IS_CUDA and backend == "triton"
    runner = attach_runner(llm, [8], capture=capture)
    requests = decoding(llm, [[5, 6, 7, 8, 9], [10, 11, 12]])
    batch = SchedulerOutput(generation_requests=requests)
    kv = llm.kv_cache_manager
    kv.prepare_resources(batch)
    inputs = build_forward_batch(batch, kv, torch.device(DEVICE))
    model = llm.model_engine.model
    expected, pool_after_real = eager_reference(model, inputs, kv.kv_pool)

    bucket = runner.load(flatten_batch(batch, kv))
    padded = runner.replay(bucket, kv.kv_pool)
    assert bucket == 8 and padded.shape[0] == 8
    torch.testing.assert_close(padded[:2], expected, rtol=1e-5, atol=1e-5)
    assert_only_slots_written(kv.kv_pool, pool_after_real, inputs.slot_mapping)


def forward_without_sync(llm, batch: SchedulerOutput) -> torch.Tensor:
    """``model_engine.forward`` of a prepared batch, failing on any host synchronisation."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return llm.model_engine.forward(batch, llm.kv_cache_manager)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def eager_reference(model, inputs, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager forward's logits and the pool it leaves behind; ``pool`` is put back as it
    was, for the path under test to write it again."""
    before = pool.clone()
    expected = model.forward(inputs, pool)
    after = pool.clone()
    pool.copy_(before)
    return expected, after


def assert_only_slots_written(pool: torch.Tensor, reference: torch.Tensor, slots: torch.Tensor):
    """``pool`` equals ``reference`` (the pool after the unpadded step) at the real ``slots``, to
    float32 rounding (a padded batch may take other BLAS paths), and bit for bit everywhere
    else: the padding wrote nothing."""
    layers, _, blocks, tpb = pool.shape[:4]
    after = pool.reshape(layers, 2, blocks * tpb, -1)
    expected = reference.reshape(layers, 2, blocks * tpb, -1)
    real = torch.zeros(blocks * tpb, dtype=torch.bool, device=after.device)
    real[slots] = True
    torch.testing.assert_close(after[:, :, real], expected[:, :, real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[:, :, ~real], expected[:, :, ~real], rtol=0, atol=0)


@pytest.mark.parametrize(
    "overlap,max_pending_rows",
    [(False, None), (True, None), (True, 2)],
    ids=["sync", "overlap", "overlap-pending-past-the-buffer"],
)
def test_a_whole_run_through_graph_buckets_equals_eager(overlap, max_pending_rows):
    """Preemption, prefix reuse, chunked prefill and decode batches of every size from 5 down to
    1: buckets 1, 2, 4 serve the decode-only steps of <= 4 sequences (3 pads to 4), the rest run
    eagerly, and the greedy tokens equal an all-eager run. With overlap scheduling the graphs'
    input ids come from the previous step's tokens on the device: inside the graph, or, when
    the previous step sampled more rows than the graph's buffer holds, filled in before it."""
    g = torch.Generator().manual_seed(7)
    system = torch.randint(3, 259, (12,), generator=g).tolist()
    prompts = [system + torch.randint(3, 259, (n,), generator=g).tolist() for n in (9, 2, 20, 5)]
    prompts.append(torch.randint(3, 259, (6,), generator=g).tolist())
    lengths = [12, 3, 7, 10, 5]  # ragged: the batch shrinks one request at a time
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    config = dict(
        capacity_scheduler="max_utilization",
        microbatch_scheduler=dict(max_batch_size=5, max_num_tokens=16, chunking="equal_progress"),
        kv_cache_manager=dict(tokens_per_block=4, num_blocks=20, enable_block_reuse=True),
    )
    backend = "triton" if IS_CUDA else "torch"
    eager = make_llm(backend, **config).generate(prompts, params)

    llm = make_llm(backend, **config, overlap_scheduler=overlap)
    runner = attach_runner(llm, [1, 2, 4], max_pending_rows=max_pending_rows)
    buckets: list[tuple[int, int]] = []
    load = runner.load

    def spy(host, pending_tokens=None):
        bucket = load(host, pending_tokens)
        buckets.append((host.num_seqs, bucket))
        return bucket

    runner.load = spy
    graphed = llm.generate(prompts, params)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    assert runner.num_advanced_steps > 0  # repeated steady steps, advanced without flattening
    assert sum(o.metrics.num_preemptions for o in graphed) > 0
    assert sum(o.metrics.num_cached_tokens for o in graphed) > 0
    assert llm.model_engine.num_graph_steps == len(buckets) + runner.num_advanced_steps
    assert len(buckets) > 0
    assert (3, 4) in buckets and (1, 1) in buckets
    assert all(n <= b for n, b in buckets)
    # Each row records the rows its dense layers ran on: the graph's bucket, or its own tokens
    for row in llm.executor.iteration_stats:
        n = row.num_scheduled_tokens
        is_graphed = n > 0 and row.num_context_tokens == 0 and n <= 4
        assert row.num_padded_tokens == (min(b for b in (1, 2, 4) if b >= n) if is_graphed else n)
    kv = llm.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks


@cuda
def test_llm_captures_graphs_on_cuda_and_uses_them():
    llm = LLM(
        "llama-tiny",
        device="cuda",
        dtype="float32",
        microbatch_scheduler=dict(max_batch_size=8),
        kv_cache_manager=dict(tokens_per_block=16, max_tokens=4096),
    )
    runner = llm.model_engine.graph_runner
    assert runner is not None and runner.is_captured
    assert runner.batch_sizes == [1, 2, 4, 8]
    outputs = llm.generate([[5, 6, 7], [8, 9, 10, 11]], SamplingParams(max_new_tokens=6))
    assert all(len(o.token_ids) == 6 for o in outputs)
    assert llm.model_engine.num_graph_steps == 5  # every step after the prefill
    assert LLM("llama-tiny", device="cuda", enforce_eager=True).model_engine.graph_runner is None
    assert llm.activation_peak_bytes > 0  # the largest step was profiled before the pool


@cuda
@pytest.mark.parametrize("eager", [False, True])
def test_a_step_does_not_synchronise_the_host(eager):
    """Building inputs and running the forward queue work without waiting for the GPU; the only
    sync of a step is the decoder reading the new tokens (outside ``forward``)."""
    llm = LLM(
        "llama-tiny",
        device="cuda",
        dtype="bfloat16",
        enforce_eager=eager,
        microbatch_scheduler=dict(max_batch_size=8),
        kv_cache_manager=dict(tokens_per_block=16, max_tokens=4096),
    )
    requests = decoding(llm, [[5, 6, 7], [8, 9, 10, 11], [12] * 40])
    kv = llm.kv_cache_manager
    decode = SchedulerOutput(generation_requests=requests)
    kv.prepare_resources(decode)
    logits = forward_without_sync(llm, decode)
    assert logits.shape[0] == 3
    assert llm.model_engine.num_graph_steps == (0 if eager else 1)


@cuda
def test_bf16_graphs_track_the_torch_reference():
    """bf16 on the kernels + graphs against the eager torch reference, on the same decode batch,
    on llama-1b (a realistic weight scale; the tiny presets' large random weights amplify
    rounding chaotically, so bf16 paths of theirs drift apart after a few dozen positions).

    Tolerance: every logit within 3% of its row's logit range (max - min) of the reference.
    bf16 keeps 8 mantissa bits and the two paths round in different places (HF rounds RoPE
    and SiLU-and-mul in bf16 several times, the kernels once). The greedy token must be equal
    wherever the reference's top-2 margin exceeds twice that bound.
    """
    from engine.models import load_model

    hf = load_model("llama-1b", device="cuda", dtype=torch.bfloat16, seed=0).hf_model
    config = dict(dtype="bfloat16", kv_cache_manager=dict(tokens_per_block=16, max_tokens=8192))
    reference = LLM(hf, device="cuda", attention_backend="torch", enforce_eager=True, **config)
    fast = LLM(hf, device="cuda", **config)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 32000, (n,), generator=g).tolist() for n in (5, 17, 130, 64, 9)]
    logits, first_tokens = {}, None
    for name, llm in (("reference", reference), ("fast", fast)):
        requests = decoding(llm, prompts)
        # Random weights have near-ties: the two paths may sample a different first token from
        # their prefills. Decode the reference's tokens in both, so the inputs are the same.
        if first_tokens is None:
            first_tokens = [r.output_token_ids[-1] for r in requests]
        for request, token in zip(requests, first_tokens, strict=True):
            request.output_token_ids[-1] = token
        kv = llm.kv_cache_manager
        batch = SchedulerOutput(generation_requests=requests)
        kv.prepare_resources(batch)
        logits[name] = llm.model_engine.forward(batch, kv).float()
    assert fast.model_engine.num_graph_steps == 1
    ref, got = logits["reference"], logits["fast"]
    span = ref.max(dim=-1).values - ref.min(dim=-1).values
    error = (got - ref).abs().max(dim=-1).values
    assert bool((error <= 0.03 * span).all()), f"max |error| {error.tolist()} vs span {span}"
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * 0.03 * span
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    print("bf16 max |error| / span per row:", (error / span).tolist())


@cuda
def test_nothing_compiles_after_start_up():
    """Start-up compiles every Triton variant a run can meet (chunked prefill, mixed steps,
    every decode split count), so no step of the run pays for a compile."""
    import kernels

    llm = LLM(
        "mistral-tiny",  # a sliding window: its own variants
        device="cuda",
        microbatch_scheduler=dict(max_batch_size=8, max_num_tokens=64),
        kv_cache_manager=dict(tokens_per_block=16, max_tokens=8192),
        cuda_graph_batch_sizes=[1, 2],
    )
    before = kernels.compiled_variants()
    assert before["_paged_decode_kernel"] >= 5 and before["_rms_norm_kernel"] > 0
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 259, (n,), generator=g).tolist() for n in (3, 40, 150, 300, 7, 90)]
    llm.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    after = kernels.compiled_variants()
    new_keys = [
        str(key)
        for fn in kernels.JIT_FUNCTIONS
        for cache in fn.device_caches.values()
        for key in cache[0]
        if after[fn.__name__] != before[fn.__name__]
    ]
    assert after == before, new_keys


@cuda
@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen3-tiny"])
def test_fast_launch_gives_the_same_tokens(preset):
    """kernels/launch.py: launching the cached compiled kernels directly runs the very kernels
    JITFunction.run would pick, so a whole run (prefill, chunks, mixed steps, every decode
    split count) is bit-identical with it on and off, and it is used on every eager step."""
    import kernels

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (3, 40, 150, 7, 90)]
    results = {}
    previous = kernels.LAUNCHERS[0].enabled
    for enabled in (False, True):
        kernels.use_fast_launch(enabled)
        try:
            llm = LLM(
                preset,
                device="cuda",
                dtype="bfloat16",
                enforce_eager=True,  # every step launches kernels
                microbatch_scheduler=dict(max_batch_size=8, max_num_tokens=64),
                kv_cache_manager=dict(tokens_per_block=16, max_tokens=8192),
            )
            before = kernels.num_fast_launches()
            outputs = llm.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
            results[enabled] = [o.token_ids for o in outputs]
            fast = kernels.num_fast_launches() - before
        finally:
            kernels.use_fast_launch(previous)
        assert (fast > 0) == enabled, fast
    assert results[True] == results[False]


def test_rows_that_move_up_are_moved_on_the_device_not_sent_again():
    """With the requests' keys, a sequence leaving the batch moves the rows after it up by a
    gather on the device; only rows whose blocks differ are sent. Stale rows past the batch's
    end never stand in for a key's current row."""
    llm = make_llm("torch")
    runner = attach_runner(llm, [4], capture=False)
    host = decode_batch

    def table_rows(rows):
        return [runner._block_tables[i, : len(r)].tolist() for i, r in enumerate(rows)]

    first = [[1, 2], [3], [4, 5, 6], [7]]
    runner.load(host(first, [10, 11, 12, 13]))
    assert runner.last_num_rows_sent == 4 and table_rows(first) == first
    left = [[1, 2], [4, 5, 6], [7]]  # 11 left: 12 and 13 move up
    runner.load(host(left, [10, 12, 13]))
    assert runner.last_num_rows_sent == 0 and table_rows(left) == left
    grown = [[1, 2], [4, 5, 6], [7, 9], [8]]  # 13 gained a block, 14 joined in the stale row
    runner.load(host(grown, [10, 12, 13, 14]))
    assert runner.last_num_rows_sent == 2 and table_rows(grown) == grown
    swapped = [[7, 9], [1, 2], [8], [4, 5, 6]]
    runner.load(host(swapped, [13, 10, 14, 12]))
    assert runner.last_num_rows_sent == 0 and table_rows(swapped) == swapped


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_a_repeated_step_advances_the_inputs_as_a_full_load_would(overlap):
    """A steady decode step the scheduler repeated (``is_repeat``) is loaded by ``advance``:
    positions one further, only the new blocks sent. Its derived inputs (ids, positions, slots,
    sequence lengths) and block-table rows equal what a full ``load`` of the flattened batch
    gives a fresh runner, step after step, across block boundaries and finishes."""
    backend = "triton" if IS_CUDA else "torch"
    config = dict(
        capacity_scheduler="guaranteed_no_evict",
        microbatch_scheduler=dict(max_batch_size=4, max_num_tokens=64),
        kv_cache_manager=dict(tokens_per_block=4, num_blocks=64),
    )
    llm = make_llm(backend, **config, overlap_scheduler=overlap)
    runner = attach_runner(llm, [1, 2, 4], capture=False)
    kv = llm.kv_cache_manager
    shadow = DecodeGraphRunner(
        llm.model_engine.model, kv.kv_pool, [1, 2, 4], kv.num_blocks, capture=False
    )
    engine = llm.model_engine
    forward = engine.forward
    num_compared = num_with_new_blocks = 0

    def checked_forward(batch, kv_manager, pending_tokens=None):
        nonlocal num_compared, num_with_new_blocks
        num_advanced = runner.num_advanced_steps
        logits = forward(batch, kv_manager, pending_tokens)
        if runner.num_advanced_steps > num_advanced:
            bucket = shadow.load(flatten_batch(batch, kv_manager), pending_tokens)
            runner._derive_inputs(bucket)
            shadow._derive_inputs(bucket)
            assert runner._derived[:, :bucket].tolist() == shadow._derived[:, :bucket].tolist()
            rows = kv_manager.block_id_rows(batch.generation_requests)
            for i, row in enumerate(rows):
                assert runner._block_tables[i, : len(row)].tolist() == list(row)
            num_compared += 1
            num_with_new_blocks += runner.last_num_rows_sent > 0
        return logits

    engine.forward = checked_forward
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 259, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (14, 9, 17, 12)]
    outputs = llm.generate(prompts, params)
    eager = make_llm(backend, **config).generate(prompts, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in eager]
    assert num_compared == runner.num_advanced_steps > 5
    assert num_with_new_blocks > 0  # some advanced steps crossed a block boundary
