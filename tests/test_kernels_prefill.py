"""The Triton paged prefill kernel against the torch reference ``paged_attention``.

Without a GPU the kernel runs through the Triton interpreter on CPU tensors (numpy, true fp32
dot products), so the CPU cases stay small; on a CUDA machine the same tests run compiled.
"""

import itertools
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernel, i.e. before the kernel module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.model_engine import ForwardBatch
from engine.models.attention import paged_attention
from kernels.paged_prefill import max_prefill_tiles, paged_prefill_attention, prefill_tiles

# Sequences as (context_len, q_len): context_len keys already in the pool from earlier chunks or
# a prefix hit, then q_len new tokens. Lengths straddle the 16/32/64 tile edges; contexts are
# not multiples of the block sizes; q_len 1 rows sit both mid-batch and at the end (decodes).
RAGGED = [(0, 37), (21, 19), (45, 1), (0, 16), (16, 17), (70, 1), (9, 1)]


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_case(
    seqs,
    *,
    tokens_per_block,
    num_kv_heads,
    group,
    head_dim,
    dtype,
    device,
    seed=0,
    spare_blocks=5,
    index_dtype=torch.int64,
):
    """Random queries and a pool holding every sequence's keys in shuffled blocks.

    Unused slots (spare blocks, the tail of each last block, the blocks that the table's padding
    columns name) are NaN: a kernel that reads a key it should not see poisons its output instead
    of passing by luck.
    """
    gen = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    blocks_per_seq = [-(-(ctx + q) // tokens_per_block) for ctx, q in seqs]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()

    pool = torch.full(
        (2, num_blocks, tokens_per_block, num_kv_heads, head_dim), float("nan"), dtype=dtype
    )
    # Columns past a sequence's blocks point at an all-NaN spare block, so that a gather past
    # seq_len (an unmasked table load) poisons the output too.
    table = torch.full((len(seqs), max(blocks_per_seq)), perm[-1], dtype=torch.int64)
    next_block = 0
    for i, ((ctx, q), nb) in enumerate(zip(seqs, blocks_per_seq, strict=True)):
        table[i, :nb] = torch.tensor(perm[next_block : next_block + nb])
        next_block += nb
        pos = torch.arange(ctx + q)
        blocks, offsets = table[i, pos // tokens_per_block], pos % tokens_per_block
        kv = torch.randn((2, ctx + q, num_kv_heads, head_dim), generator=gen)
        pool[:, blocks, offsets] = kv.to(dtype)

    q_lens = [q for _, q in seqs]
    num_tokens = sum(q_lens)
    query = torch.randn((num_tokens, num_heads, head_dim), generator=gen).to(dtype)
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    seq_lens = torch.tensor([ctx + q for ctx, q in seqs])
    return (
        query.to(device),
        pool.to(device),
        query_start_loc.to(device, index_dtype),
        seq_lens.to(device, index_dtype),
        table.to(device, index_dtype),
        max(q_lens),
    )


def reference(query, pool, query_start_loc, seq_lens, table, scale, window):
    """``paged_attention`` in float32 on the case's tensors (it reads only the metadata below)."""
    empty = torch.empty(0, dtype=torch.int64, device=query.device)
    batch = ForwardBatch(
        input_ids=empty,
        positions=empty,
        slot_mapping=empty,
        query_start_loc=query_start_loc.long(),
        seq_lens=seq_lens.long(),
        block_tables=table.long(),
        logits_indices=empty,
        max_query_len=0,
        max_seq_len=0,
    )
    return paged_attention(query.float(), pool.float(), batch, scale, window)


def check(case, *, window=None, atol, rtol, **kernel_kwargs):
    query, pool, query_start_loc, seq_lens, table, max_q = case
    scale = query.shape[-1] ** -0.5
    out = paged_prefill_attention(
        query, pool, query_start_loc, seq_lens, table, max_q, scale, window, **kernel_kwargs
    )
    expected = reference(query, pool, query_start_loc, seq_lens, table, scale, window)
    assert out.shape == query.shape and out.dtype == query.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


# The interpreter's tl.dot is np.matmul in fp32 (input_precision is ignored) and on CUDA the
# launcher asks for "ieee" fp32 dots, so fp32 differs from torch only by summation order.
FP32_TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize("tokens_per_block", [4, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_ragged_batch_fp32(device, tokens_per_block, head_dim, group):
    case = make_case(
        RAGGED,
        tokens_per_block=tokens_per_block,
        num_kv_heads=2 if group < 4 else 1,
        group=group,
        head_dim=head_dim,
        dtype=torch.float32,
        device=device,
        seed=tokens_per_block * 100 + head_dim + group,
    )
    # Small tiles, so that rows and keys cross many tile edges.
    check(case, block_m=16, block_n=16, **FP32_TOL)


@pytest.mark.parametrize(("block_m", "block_n"), [(None, None), (32, 16), (16, 64)])
def test_tile_sizes(device, block_m, block_n):
    """Default tiles and M != N: every (row tile, key tile) alignment gives the same result."""
    case = make_case(
        RAGGED,
        tokens_per_block=16,
        num_kv_heads=2,
        group=2,
        head_dim=64,
        dtype=torch.float32,
        device=device,
        seed=7,
    )
    check(case, block_m=block_m, block_n=block_n, **FP32_TOL)


@pytest.mark.parametrize("window", [1, 7, 16, 40, 1000])
@pytest.mark.parametrize("group", [1, 4])
def test_sliding_window(device, window, group):
    case = make_case(
        RAGGED,
        tokens_per_block=4 if group == 1 else 16,
        num_kv_heads=1,
        group=group,
        head_dim=64,
        dtype=torch.float32,
        device=device,
        seed=window + group,
    )
    check(case, window=window, block_m=16, block_n=16, **FP32_TOL)


# Long sequences for the two key-loop phases (fully visible tiles without masks, boundary tiles
# with them): prefix hits much longer than their chunks, so that most key tiles of every row
# tile lie wholly below its first token, then a diagonal; chunk lengths that are not multiples
# of 16 or 32 and sequence ends (context + chunk) that are not either; a decode after a long
# context; a long first chunk.
LONG = [(301, 19), (450, 9), (0, 45), (260, 1), (97, 35)]


@pytest.mark.parametrize(
    ("group", "block_m", "block_n"),
    [(1, 16, 16), (2, 16, 16), (4, 16, 16), (8, 32, 16), (2, 32, 16), (4, 16, 32), (4, None, None)],
)
def test_long_context_fully_visible_tiles(device, group, block_m, block_n):
    """Many unmasked tiles plus a diagonal per row tile; with group 4 or 8, a row tile holds only
    four tokens. (None, None) is the default config (64-wide tiles on CPU)."""
    case = make_case(
        LONG,
        tokens_per_block=16 if group != 2 else 8,
        num_kv_heads=1,
        group=group,
        head_dim=32,
        dtype=torch.float32,
        device=device,
        seed=100 + group,
    )
    check(case, block_m=block_m, block_n=block_n, **FP32_TOL)


@pytest.mark.parametrize(
    ("window", "block_m", "block_n"),
    [(24, 16, 16), (50, 16, 16), (100, 16, 16), (77, 32, 16), (77, 16, 32), (300, 16, 16)],
)
def test_window_inside_long_sequences(device, window, block_m, block_n):
    """A window shorter than the sequences: masked tiles at the window edge, unmasked tiles
    inside it, masked tiles on the diagonal, and key tiles below the window never visited. A
    24-key window leaves at most one fully visible tile per row tile; a 300-key one covers the
    shorter sequences whole."""
    case = make_case(
        LONG,
        tokens_per_block=16,
        num_kv_heads=1,
        group=2,
        head_dim=32,
        dtype=torch.float32,
        device=device,
        seed=200 + window,
    )
    check(case, window=window, block_m=block_m, block_n=block_n, **FP32_TOL)


@pytest.mark.parametrize(
    "seqs",
    [
        [(30, 1), (5, 1), (63, 1)],  # decode-only batch
        [(0, 1)],  # a one-token prompt
        [(0, 50)],  # one first chunk
        [(33, 31)],  # one later chunk
    ],
)
def test_single_kind_batches(device, seqs):
    case = make_case(
        seqs,
        tokens_per_block=16,
        num_kv_heads=2,
        group=2,
        head_dim=64,
        dtype=torch.float32,
        device=device,
        seed=len(seqs),
    )
    check(case, block_m=16, block_n=16, **FP32_TOL)


def test_int32_metadata_and_strided_inputs(device):
    """int32 metadata, a query sliced out of a fused qkv tensor, a pool layer sliced from a
    layer-major pool, and a strided block table: only the strides reach the kernel."""
    query, pool, query_start_loc, seq_lens, table, max_q = make_case(
        RAGGED,
        tokens_per_block=16,
        num_kv_heads=2,
        group=2,
        head_dim=64,
        dtype=torch.float32,
        device=device,
        seed=3,
        index_dtype=torch.int32,
    )
    num_tokens, num_heads, head_dim = query.shape
    fused = torch.randn((num_tokens, num_heads + 4, head_dim), device=device)
    fused[:, 2 : 2 + num_heads] = query
    strided_query = fused[:, 2 : 2 + num_heads]
    big_pool = torch.randn((2, 3, *pool.shape[1:]), device=device)  # [2, layers, ...]
    big_pool[:, 1] = pool
    strided_pool = big_pool[:, 1]
    wide_table = torch.zeros((table.shape[0], 2 * table.shape[1]), dtype=table.dtype, device=device)
    wide_table[:, ::2] = table
    strided_table = wide_table[:, ::2]
    assert not (strided_query.is_contiguous() or strided_pool.is_contiguous())
    assert not strided_table.is_contiguous()
    case = (strided_query, strided_pool, query_start_loc, seq_lens, strided_table, max_q)
    check(case, block_m=16, block_n=32, **FP32_TOL)


def test_prefill_tiles_list_every_m_tile_of_every_sequence():
    # A 5-token chunk (20 folded rows: two tiles of 16), two decodes, a 4-token chunk (one tile).
    assert prefill_tiles([0, 5, 6, 7, 11], group=4, block_m=16) == [0, 0, 0, 1, 1, 0, 2, 0, 3, 0]
    assert prefill_tiles([0, 32], group=1, block_m=16) == [0, 0, 0, 1]
    assert prefill_tiles([0], group=4, block_m=16) == []
    # The decodes alone, as the batch's sequences 1 and 2.
    assert prefill_tiles([5, 6, 7], group=4, block_m=16, first_seq=1) == [1, 0, 2, 0]


@given(
    q_lens=st.lists(st.integers(1, 70), min_size=1, max_size=12),
    group=st.sampled_from([1, 2, 4, 8]),
    block_m=st.sampled_from([16, 64, 128]),
)
def test_max_prefill_tiles_bounds_every_batch(q_lens, group, block_m):
    starts = [0, *itertools.accumulate(q_lens)]
    tiles = prefill_tiles(starts, group, block_m)
    assert len(tiles) // 2 <= max_prefill_tiles(sum(q_lens), len(q_lens), group, block_m)
    # Each tile once, in order, covering exactly its sequence's folded rows.
    pairs = list(zip(tiles[::2], tiles[1::2], strict=True))
    for seq, q_len in enumerate(q_lens):
        assert [t for s, t in pairs if s == seq] == list(range(-(-q_len * group // block_m)))


@pytest.mark.parametrize(("group", "window"), [(1, None), (4, None), (4, 7)])
def test_a_tiled_launch_on_padded_static_buffers_equals_the_plain_one(device, group, window):
    """What a CUDA graph runs: metadata in buffers longer than the batch, a tile table padded
    with -1 rows, a grid that does not follow the batch. The batch's rows equal the untiled
    launch's; the padded query rows of ``out`` keep what they held."""
    query, pool, query_start_loc, seq_lens, table, max_q = make_case(
        RAGGED, tokens_per_block=16, num_kv_heads=2, group=group, head_dim=64,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    scale, block_m = 0.125, 16
    expected = paged_prefill_attention(
        query, pool, query_start_loc, seq_lens, table, max_q, scale, window, block_m=block_m
    )
    num_tokens, num_seqs = query.shape[0], seq_lens.shape[0]
    bucket, max_seqs = num_tokens + 9, num_seqs + 3  # the static buffers' sizes
    padded_query = torch.zeros((bucket, *query.shape[1:]), device=device)
    padded_query[:num_tokens] = query
    starts = torch.zeros(max_seqs + 1, dtype=torch.int64, device=device)
    starts[: num_seqs + 1] = query_start_loc
    lens = torch.zeros(max_seqs, dtype=torch.int64, device=device)
    lens[:num_seqs] = seq_lens
    wide = torch.full((max_seqs + 2, table.shape[1] + 4), 10**6, dtype=torch.int64, device=device)
    wide[:num_seqs, : table.shape[1]] = table
    real = prefill_tiles(query_start_loc.tolist(), group, block_m)
    num_tiles = max_prefill_tiles(bucket, max_seqs, group, block_m)
    tiles = torch.tensor(real + [-1] * (2 * num_tiles - len(real)), device=device).view(-1, 2)
    out = torch.full_like(padded_query, 7.0)
    got = paged_prefill_attention(
        padded_query, pool, starts, lens, wide, None, scale, window,
        tiles=tiles, out=out, block_m=block_m,
    )  # fmt: skip
    assert got is out
    torch.testing.assert_close(out[:num_tokens], expected, **FP32_TOL)
    assert (out[num_tokens:] == 7.0).all()
    with pytest.raises(AssertionError, match="block_m"):
        paged_prefill_attention(padded_query, pool, starts, lens, wide, None, scale, tiles=tiles)


def test_empty_batch(device):
    query = torch.empty((0, 4, 64), device=device)
    pool = torch.zeros((2, 3, 16, 2, 64), device=device)
    meta = torch.zeros(1, dtype=torch.int64, device=device)
    table = torch.zeros((0, 1), dtype=torch.int64, device=device)
    empty = meta[:0]
    out = paged_prefill_attention(query, pool, meta, empty, table, 0, 0.125)
    assert out.shape == (0, 4, 64)


def test_rejects_bad_shapes(device):
    meta = torch.tensor([0, 1], device=device)
    seq_lens = torch.tensor([1], device=device)
    table = torch.zeros((1, 1), dtype=torch.int64, device=device)
    with pytest.raises(AssertionError, match="power of two"):
        paged_prefill_attention(
            torch.zeros((1, 2, 96), device=device),
            torch.zeros((2, 1, 16, 1, 96), device=device),
            meta,
            seq_lens,
            table,
            1,
            1.0,
        )
    with pytest.raises(AssertionError, match="multiple of num_kv_heads"):
        paged_prefill_attention(
            torch.zeros((1, 3, 64), device=device),
            torch.zeros((2, 1, 16, 2, 64), device=device),
            meta,
            seq_lens,
            table,
            1,
            1.0,
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [None, 100])
def test_half_precision_cuda(dtype, head_dim, window):
    """Long chunks in 16-bit with the default tiles. The reference runs in fp32 on the same
    16-bit inputs; the kernel rounds P to 16 bits for the PV dot, hence the looser tolerance."""
    seqs = [(0, 700), (300, 257), (1000, 1), (129, 64), (0, 1), (2047, 1)]
    case = make_case(
        seqs,
        tokens_per_block=16,
        num_kv_heads=2,
        group=4,
        head_dim=head_dim,
        dtype=dtype,
        device="cuda",
        seed=head_dim,
    )
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    check(case, window=window, atol=tol, rtol=tol)
