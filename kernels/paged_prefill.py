"""Varlen causal attention over the paged KV pool (chunked prefill, prefix hits, mixed decodes).

Same semantics as the torch reference ``engine.models.attention.paged_attention``: sequence ``i``
owns query rows ``query_start_loc[i] .. query_start_loc[i + 1] - 1``, its ``q_len_i`` new tokens at
positions ``seq_len_i - q_len_i .. seq_len_i - 1``; all its keys ``0 .. seq_len_i - 1`` (earlier
chunks, prefix-cache hits and this step's tokens) are already in the pool. Query position ``p``
attends key positions ``<= p`` (and ``> p - sliding_window`` with a window).

Tiling: one program per (sequence, tile of BLOCK_M folded rows, kv head). The query heads that
share a kv head (a GQA group of size G) are folded into the M dimension, so every K/V tile read
through the block table serves the whole group, and a single-token (decode) row fills G rows of
the tile instead of one::

    folded row f = token * G + head_in_group          (G = num_heads // num_kv_heads = 2)

    f:       0    1    2    3    4    5    6    7   ...
    token:   t0   t0   t1   t1   t2   t2   t3   t3
    head:    h0   h1   h0   h1   h0   h1   h0   h1      (query head = kv_head * G + head_in_group)
             |<------ tile m = 0 (BLOCK_M = 4) -->|<---- tile m = 1 ...

Each program streams key tiles of BLOCK_N positions, gathering each key through the block table
(block = table[pos // TOKENS_PER_BLOCK], offset = pos % TOKENS_PER_BLOCK, so BLOCK_N need not
match the pool's block size), with an online softmax in fp32. Key tiles are aligned to multiples
of BLOCK_N (N below) and come in two kinds, as in flash-attention's Triton tutorial. The rows of
an M tile sit at positions first_pos .. last_pos (of its first and last token; rows past the
chunk count as its last token), so with a sliding window W::

    key position:  0       N       2N      3N      4N      5N      6N      7N      8N
    key tiles:     [ skip ][ mask ][ mask ][ full ][ full ][ full ][ mask ][ mask ]
                              ^        ^                             ^         ^
                              lo       full_lo                       full_hi   hi
                           |<- phase 2 -->|<------- phase 1 ------>|<-- phase 2 -->|
                             window edge          fully visible          diagonal

    lo      = first_pos - W + 1   first key any row sees      (at least 0; 0 without a window)
    full_lo = last_pos - W + 1    first key every row sees    (at least 0; 0 without a window)
    full_hi = first_pos + 1       one past the last key every row sees
    hi      = last_pos + 1        one past the last key any row sees (<= seq_len)

Phase 1 tiles lie wholly inside [full_lo, full_hi): at or below every row's position, inside
every row's window and inside the sequence, so they run with no score mask and no load masks;
they are most of the work of a long chunk or of a chunk after a long prefix. Phase 2 tiles (the
window edge, the causal diagonal, the end of the sequence) mask scores and never load keys past
hi. Tiles wholly below lo ("skip") are not visited. Without a window, lo = full_lo = 0 and there
is no window-edge phase.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.launch import FastLauncher

# exp(x) == exp2(x * log2(e)); the scale is folded into this factor once per launch.
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_key_tile(
    q,  # [BLOCK_M, HEAD_DIM] queries of the tile
    q_pos,  # [BLOCK_M] absolute position of each row
    acc,  # [BLOCK_M, HEAD_DIM] fp32 running numerator
    l_i,  # [BLOCK_M] fp32 running denominator
    m_i,  # [BLOCK_M] fp32 running max (log2 domain)
    start_n,  # first key position of this tile
    hi,  # one past the last key position the tile may see (read only when MASKED)
    k_base,
    v_base,
    table_row,  # this sequence's block table row
    qk_scale,
    sliding_window,
    stride_kb,
    stride_ko,
    stride_kd,
    stride_btb,
    offs_d,
    TOKENS_PER_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # False only for tiles that every row of the tile fully sees
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of one tile with keys start_n .. start_n + BLOCK_N - 1."""
    key_pos = start_n + tl.arange(0, BLOCK_N)
    # Gather: each key position finds its own block, so a tile may span several blocks
    # (TOKENS_PER_BLOCK < BLOCK_N) or part of one.
    table_ptrs = table_row + (key_pos // TOKENS_PER_BLOCK) * stride_btb
    if MASKED:
        # Positions past hi are never loaded: their table column may not exist and their slots
        # may hold garbage (even NaN).
        key_valid = key_pos < hi
        block = tl.load(table_ptrs, mask=key_valid, other=0).to(tl.int64)
    else:
        # Every position is < seq_len: its table column and its slot are real.
        block = tl.load(table_ptrs).to(tl.int64)
    slot = block * stride_kb + (key_pos % TOKENS_PER_BLOCK) * stride_ko
    # K is loaded already transposed, [HEAD_DIM, BLOCK_N], ready for Q @ K^T.
    k_ptrs = k_base + slot[None, :] + offs_d[:, None] * stride_kd
    v_ptrs = v_base + slot[:, None] + offs_d[None, :] * stride_kd
    k = tl.load(k_ptrs, mask=key_valid[None, :], other=0.0) if MASKED else tl.load(k_ptrs)
    # Raw scores; the scale is applied inside the exponent (one FMA per score).
    qk = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)
    if MASKED:
        visible = (key_pos[None, :] <= q_pos[:, None]) & key_valid[None, :]
        if HAS_WINDOW:
            visible = visible & (key_pos[None, :] > q_pos[:, None] - sliding_window)
        qk = tl.where(visible, qk, float("-inf"))  # -inf * qk_scale stays -inf (scale > 0)

    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)

    v = tl.load(v_ptrs, mask=key_valid[:, None], other=0.0) if MASKED else tl.load(v_ptrs)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attend_key_tiles(
    q,
    q_pos,
    acc,
    l_i,
    m_i,
    tile_lo,  # first key tile (keys tile_lo * BLOCK_N ..)
    tile_hi,  # one past the last key tile
    hi,  # one past the last key position the tile may see (read only when MASKED)
    k_base,
    v_base,
    table_row,
    qk_scale,
    sliding_window,
    stride_kb,
    stride_ko,
    stride_kd,
    stride_btb,
    offs_d,
    TOKENS_PER_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``_attend_key_tile`` over key tiles tile_lo .. tile_hi - 1 (none if tile_hi <= tile_lo)."""
    if INTERPRET:
        # The interpreter turns runtime range() bounds into Python ints through a numpy
        # conversion that numpy >= 2.4 rejects (1-element arrays are not scalars); a while loop
        # only needs bool(). Compiled, the for loop is kept: Triton software-pipelines it.
        start_n = tile_lo * BLOCK_N
        while start_n < tile_hi * BLOCK_N:
            acc, l_i, m_i = _attend_key_tile(
                q, q_pos, acc, l_i, m_i, start_n, hi, k_base, v_base, table_row, qk_scale,
                sliding_window, stride_kb, stride_ko, stride_kd, stride_btb, offs_d,
                TOKENS_PER_BLOCK, BLOCK_N, MASKED, HAS_WINDOW, DOT_PRECISION,
            )  # fmt: skip
            start_n += BLOCK_N
    else:
        for start_n in range(tile_lo * BLOCK_N, tile_hi * BLOCK_N, BLOCK_N):
            acc, l_i, m_i = _attend_key_tile(
                q, q_pos, acc, l_i, m_i, start_n, hi, k_base, v_base, table_row, qk_scale,
                sliding_window, stride_kb, stride_ko, stride_kd, stride_btb, offs_d,
                TOKENS_PER_BLOCK, BLOCK_N, MASKED, HAS_WINDOW, DOT_PRECISION,
            )  # fmt: skip
    return acc, l_i, m_i


# The metadata tensors are views into one flat per-step buffer, at offsets that move with the
# batch's token and sequence counts, and the block table's row stride is its width: specialising
# on their alignment or divisibility would compile new variants in the middle of a run.
@triton.jit(
    do_not_specialize=["stride_bts"],
    do_not_specialize_on_alignment=["QUERY_START_LOC", "SEQ_LENS", "BLOCK_TABLES", "TILES"],
)
def _paged_prefill_kernel(
    Q,  # [num_tokens, num_heads, HEAD_DIM]
    KV,  # [2, num_blocks, TOKENS_PER_BLOCK, num_kv_heads, HEAD_DIM]
    OUT,  # [num_tokens, num_heads, HEAD_DIM]
    QUERY_START_LOC,  # [num_seqs + 1]
    SEQ_LENS,  # [num_seqs]
    BLOCK_TABLES,  # [num_seqs, max_blocks]
    TILES,  # [num_tiles, 2] (sequence, tile_m) of each program; read only when TILED
    qk_scale,  # softmax scale * log2(e)
    sliding_window,  # only read when HAS_WINDOW
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kv,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_kd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_bts,
    stride_btb,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # folded (token, head) rows per program
    BLOCK_N: tl.constexpr,  # key positions per inner iteration
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (match torch), else "tf32" (unused)
    INTERPRET: tl.constexpr,  # running in the Triton interpreter (CPU tensors)
    TILED: tl.constexpr,  # programs read their (sequence, tile) from TILES (a fixed grid)
):
    if TILED:
        # A CUDA graph's grid is frozen at capture: it has a program for every tile the bucket
        # could need, and a tile of sequence -1 is padding.
        seq = tl.load(TILES + 2 * tl.program_id(0)).to(tl.int32)
        tile_m = tl.load(TILES + 2 * tl.program_id(0) + 1).to(tl.int32)
        if seq < 0:
            return
    else:
        seq = tl.program_id(0)
        tile_m = tl.program_id(1)
    kv_head = tl.program_id(2)

    # Positions fit in int32 (metadata may be int64): keeps the key loop's index math 32-bit.
    q_start = tl.load(QUERY_START_LOC + seq).to(tl.int64)
    q_len = (tl.load(QUERY_START_LOC + seq + 1) - q_start).to(tl.int32)
    seq_len = tl.load(SEQ_LENS + seq).to(tl.int32)
    # The grid is sized for the longest chunk of the batch: shorter ones end early.
    if tile_m * BLOCK_M >= q_len * GROUP:
        return
    context_len = seq_len - q_len  # keys before this step's first new token

    # Folded rows of this tile -> (token of the chunk, query head); see the module diagram.
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    token = offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = token < q_len
    # Rows past the chunk reuse its last position, so that no row is fully masked (a fully
    # masked row would turn the softmax into 0/0); they are never stored.
    q_pos = context_len + tl.minimum(token, q_len - 1)
    offs_d = tl.arange(0, HEAD_DIM)

    q_rows = q_start + token
    q_ptrs = (
        Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)

    # Rows are sorted by position (G rows per token): the first row has the smallest position,
    # the last (clamped to the chunk) the largest. See the module docstring's diagram.
    first_pos = context_len + (tile_m * BLOCK_M) // GROUP
    last_pos = context_len + tl.minimum((tile_m * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
    hi = last_pos + 1  # <= seq_len
    full_hi = first_pos + 1
    # Key tiles (aligned to BLOCK_N) of the tile: [tile_lo, tile_hi), of which the fully
    # visible ones are [full_tile_lo, full_tile_hi), possibly empty (short chunks, narrow
    # windows); full_lo >= lo and full_hi <= hi keep the three ranges in order.
    tile_hi = tl.cdiv(hi, BLOCK_N)
    full_tile_hi = full_hi // BLOCK_N
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - sliding_window + 1, 0)
        full_lo = tl.maximum(last_pos - sliding_window + 1, 0)
        tile_lo = lo // BLOCK_N
        full_tile_lo = tl.minimum(tl.cdiv(full_lo, BLOCK_N), tile_hi)
        full_tile_hi = tl.maximum(full_tile_hi, full_tile_lo)
    else:
        full_tile_lo = 0

    # Finite start for the running max: a row that meets a masked tile in which it sees no key
    # (below its window, or all past its position) before any key it sees keeps m_i finite, so
    # exp2(m_i - m_new) stays 1 rather than exp2(-inf + inf).
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    k_base = KV + kv_head * stride_kh
    v_base = KV + stride_kv + kv_head * stride_kh
    table_row = BLOCK_TABLES + seq.to(tl.int64) * stride_bts
    # The online softmax does not depend on the order of the tiles; they run in key order.
    if HAS_WINDOW:
        # Phase 2, window edge: tiles below full_lo, which some rows no longer see.
        acc, l_i, m_i = _attend_key_tiles(
            q, q_pos, acc, l_i, m_i, tile_lo, full_tile_lo, hi, k_base, v_base, table_row,
            qk_scale, sliding_window, stride_kb, stride_ko, stride_kd, stride_btb, offs_d,
            TOKENS_PER_BLOCK, BLOCK_N, True, HAS_WINDOW, DOT_PRECISION, INTERPRET,
        )  # fmt: skip
    # Phase 1: fully visible tiles, no masks.
    acc, l_i, m_i = _attend_key_tiles(
        q, q_pos, acc, l_i, m_i, full_tile_lo, full_tile_hi, hi, k_base, v_base, table_row,
        qk_scale, sliding_window, stride_kb, stride_ko, stride_kd, stride_btb, offs_d,
        TOKENS_PER_BLOCK, BLOCK_N, False, HAS_WINDOW, DOT_PRECISION, INTERPRET,
    )  # fmt: skip
    # Phase 2, diagonal: tiles reaching past first_pos (causal) and up to hi (sequence end).
    acc, l_i, m_i = _attend_key_tiles(
        q, q_pos, acc, l_i, m_i, full_tile_hi, tile_hi, hi, k_base, v_base, table_row,
        qk_scale, sliding_window, stride_kb, stride_ko, stride_kd, stride_btb, offs_d,
        TOKENS_PER_BLOCK, BLOCK_N, True, HAS_WINDOW, DOT_PRECISION, INTERPRET,
    )  # fmt: skip

    # Every stored row saw at least its own key, so l_i > 0.
    acc = acc / l_i[:, None]
    o_ptrs = (
        OUT + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=row_valid[:, None])


def _default_config(query: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this query's device, dtype and head_dim."""
    if not query.is_cuda:
        # Interpreter: cost is per tl op per program, so fewer, larger programs run faster.
        return 64, 64, 4, 1
    if query.element_size() == 4:
        # fp32 tiles take twice the shared memory of 16-bit ones.
        return 64, 32, 4, 2
    if query.shape[-1] <= 64:
        return 128, 64, 4, 3
    # With 2 stages, Triton (3.6, sm_90) leaves the block-table load of the gather outside the
    # software pipeline; 3 stages give it its own stage for ~1 KB more shared memory. Untimed:
    # bench/attention_kernels.py --sweep compares.
    return 128, 64, 8, 2


_paged_prefill_launch = FastLauncher(_paged_prefill_kernel)


def prefill_block_m(query: torch.Tensor) -> int:
    """The BLOCK_M ``paged_prefill_attention`` tiles ``query`` with by default (a tile table
    for a tiled launch is built with it)."""
    return _default_config(query)[0]


# A decode's folded rows are its GQA group (4 for Llama 3's): the smallest tile tl.dot takes
# wastes the least tensor-core work on them. In 128-row tiles, a llama-1b mixed step with ~250
# decodes (330k KV tokens) took 1.5-2 ms longer on the H200 (docs/performance.md).
DECODE_BLOCK_M = 16


def prefill_tiles(
    query_start_loc: Sequence[int], group: int, block_m: int, first_seq: int = 0
) -> list[int]:
    """The programs of a tiled launch, flat: ``seq, tile_m`` for every M tile of every
    sequence's folded rows (``q_len * group`` of them, ``block_m`` a tile); sequences counted
    from ``first_seq`` (``query_start_loc`` a slice of the batch's, from that sequence on)::

        query_start_loc  0 5 6 7     (a 5-token chunk, two decodes), group 4, block_m 16
        tiles            0 0  0 1  1 0  2 0     (the chunk's 20 rows take two tiles)
    """
    tiles: list[int] = []
    for i in range(len(query_start_loc) - 1):
        rows = (query_start_loc[i + 1] - query_start_loc[i]) * group
        if rows <= block_m:  # a decode, or a short chunk: one tile
            tiles += (first_seq + i, 0)
        else:
            for tile in range(-(-rows // block_m)):
                tiles += (first_seq + i, tile)
    return tiles


def max_prefill_tiles(num_tokens: int, num_seqs: int, group: int, block_m: int) -> int:
    """An upper bound on ``len(prefill_tiles(...)) // 2`` for any batch of at most
    ``num_tokens`` tokens in ``num_seqs`` sequences: every sequence adds at most one partial
    tile to the ``num_tokens * group / block_m`` full ones."""
    return -(-num_tokens * group // block_m) + num_seqs


def paged_prefill_attention(
    query: torch.Tensor,
    kv_pool_layer: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int | None,
    scale: float,
    sliding_window: int | None = None,
    *,
    tiles: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal varlen attention of the batch's new tokens to their keys in the paged pool.

    Shapes (S = num_seqs, H = num_heads, Hkv = num_kv_heads, D = head_dim):
        query:           [num_tokens, H, D], flattened in sequence order (RoPE applied)
        kv_pool_layer:   [2, num_blocks, tokens_per_block, Hkv, D] (0 = K, 1 = V), any strides,
                         already holding every key of every sequence (this step's included)
        query_start_loc: [S + 1] int, cu_seqlens of the new tokens; must end at num_tokens
        seq_lens:        [S] int, KV length of each sequence after this step
        block_tables:    [>= S, max_blocks] int, block ids in position order
        max_query_len:   max over sequences of the chunk length (sizes the grid)
        returns:         [num_tokens, H, D] in query's dtype (``out`` if given)

    H must be a multiple of Hkv (query head h uses kv head h // (H // Hkv)); D a power of two
    in [16, 256]. K/V are cast to query's dtype for the dot products; softmax runs in fp32.
    Single-token rows (decodes) are fine, so one call can serve a mixed batch.

    Grid: (S, cdiv(max_query_len * G, BLOCK_M), Hkv) with G = H // Hkv: the G query heads of a
    kv head are folded into the M tile (see the module docstring).

    Tiled (for a CUDA graph, whose grid cannot follow the batch): ``tiles`` [num_tiles, 2]
    int (``prefill_tiles``, padded with ``-1`` rows, built with ``block_m``, which must then be
    given) gives each program its sequence and tile; the grid is (num_tiles, 1, Hkv), S and
    ``max_query_len`` are not read from the shapes, and query rows no tile covers (a padded
    batch's) are left as they are in ``out``.
    """
    num_tokens, num_heads, head_dim = query.shape
    two, _, tokens_per_block, num_kv_heads, pool_head_dim = kv_pool_layer.shape
    assert two == 2, f"kv_pool_layer must be [2, blocks, tokens, kv_heads, dim], got {two} first"
    assert pool_head_dim == head_dim, f"query head_dim {head_dim} != pool head_dim {pool_head_dim}"
    assert head_dim >= 16 and head_dim <= 256 and head_dim & (head_dim - 1) == 0, (
        f"head_dim must be a power of two in [16, 256] (tl.arange and tl.dot), got {head_dim}"
    )
    assert num_heads % num_kv_heads == 0, (
        f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    )
    assert sliding_window is None or sliding_window >= 1, f"bad sliding_window {sliding_window}"
    num_seqs = seq_lens.shape[0]
    assert query_start_loc.shape[0] == num_seqs + 1 and block_tables.shape[0] >= num_seqs
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens)):
        assert t.is_contiguous(), f"{name} must be contiguous"
    if tiles is not None:
        assert block_m is not None, "a tiled launch needs the block_m its tiles were built with"
        assert tiles.dim() == 2 and tiles.shape[1] == 2 and tiles.is_contiguous(), (
            f"tiles must be a contiguous [num_tiles, 2], got {tuple(tiles.shape)}"
        )

    if out is None:
        out = torch.empty_like(query)
    else:
        assert out.shape == query.shape and out.dtype == query.dtype, (
            f"out {tuple(out.shape)} {out.dtype} != query {tuple(query.shape)} {query.dtype}"
        )
    is_empty = tiles.shape[0] == 0 if tiles is not None else not max_query_len
    if num_tokens == 0 or num_seqs == 0 or is_empty:
        return out

    group = num_heads // num_kv_heads
    cfg = _default_config(query)
    block_m = block_m or cfg[0]
    block_n = block_n or cfg[1]
    assert block_m >= 16 and block_n >= 16, "tl.dot needs BLOCK_M, BLOCK_N >= 16"
    # torch's fp32 matmul defaults to full precision; tf32 would cost ~1e-3 relative error.
    dot_precision = "ieee" if query.dtype == torch.float32 else "tf32"

    if tiles is None:
        grid = (num_seqs, triton.cdiv(max_query_len * group, block_m), num_kv_heads)
    else:
        grid = (tiles.shape[0], 1, num_kv_heads)
    _paged_prefill_launch[grid](
        query,
        kv_pool_layer,
        out,
        query_start_loc,
        seq_lens,
        block_tables,
        seq_lens if tiles is None else tiles,  # never read untiled
        scale * _LOG2E,
        sliding_window or 0,
        *query.stride(),
        *kv_pool_layer.stride(),
        *out.stride(),
        *block_tables.stride(),
        GROUP=group,
        HEAD_DIM=head_dim,
        TOKENS_PER_BLOCK=tokens_per_block,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision,
        INTERPRET=not query.is_cuda,
        TILED=tiles is not None,
        num_warps=num_warps or (4 if block_m <= 32 else cfg[2]),
        num_stages=num_stages or cfg[3],
    )
    return out
