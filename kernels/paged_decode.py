"""Triton kernel: decode attention over the paged KV pool (one new token per sequence).

Same semantics as ``engine.models.attention.paged_attention`` for a batch of single-token
sequences: sequence ``s``'s query sits at position ``seq_lens[s] - 1`` (its K/V already in the
pool) and attends to key positions ``0 .. seq_lens[s] - 1``, or only the last
``sliding_window`` of them when a window is given.

Layout of the work::

    grid = (num_seqs, num_kv_heads, num_splits)
    program (s, h, j): query heads h*G .. h*G+G-1 of sequence s (G = num_heads // num_kv_heads)
                       x KV tiles of BLOCK_N positions in split j of the sequence's range

Grouped-query heads share one program, so each K/V tile is read from memory once per group
rather than once per query head. Each tile gathers its positions' slots through the block
table (a per-position gather, so BLOCK_N is free of tokens_per_block), then updates an online
softmax (running max and sum in fp32, in base 2) and an fp32 accumulator.

Flash-decoding: with ``num_splits > 1`` the KV range of each sequence is cut into that many
contiguous chunks handled by separate programs, each writing a normalised partial output and
its log-sum-exp; a second small kernel merges them. It keeps the GPU busy when
``num_seqs * num_kv_heads`` is small against the SM count and the sequences are long.

Scores: two code paths with the same math. ``USE_DOT`` runs the two products on tensor cores
(``tl.dot``: the query group is padded to 16 rows, since tl.dot needs every dimension >= 16);
the other one uses broadcast multiplies and ``tl.sum``, for any group size.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.decode_splits import DEFAULT_BLOCK_N, num_decode_splits
from kernels.launch import FastLauncher

# tl.dot's minimum size along every dimension (M, N and K).
_MIN_DOT = 16
# Upper bound on the broadcast product [GROUP_PAD, BLOCK_N, HEAD_DIM_PAD] of the tl.sum path,
# in elements: keeps it in registers on a GPU.
_MAX_BROADCAST = 8192
# (BLOCK_N, num_warps, num_stages) of the tl.dot path; SCHEDLAB_DECODE_CONFIG=B,W,S overrides it
# for a tuning run (bench/attention_kernels.py --decode-sweep prints the candidates).
DECODE_CONFIG: tuple[int, int, int] = tuple(  # type: ignore[assignment]
    int(x) for x in os.environ.get("SCHEDLAB_DECODE_CONFIG", f"{DEFAULT_BLOCK_N},4,3").split(",")
)
if len(DECODE_CONFIG) != 3:
    raise ValueError(f"SCHEDLAB_DECODE_CONFIG must be BLOCK_N,WARPS,STAGES: {DECODE_CONFIG}")


@triton.jit
def _attend_tile(
    q, q_scaled, acc, l_i, m_i, tile, kv_start, seq_len, bt_row, kv_head_ptr,
    stride_kv_kv, stride_kv_b, stride_kv_t, stride_kv_d, stride_bt_b, qk_scale,
    offs_n, offs_d, mask_d,
    TOKENS_PER_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One KV tile (positions tile * BLOCK_N ..) folded into the online softmax of a query
    group: returns the updated (acc, l_i, m_i)."""
    pos = tile * BLOCK_N + offs_n
    valid = (pos >= kv_start) & (pos < seq_len)
    # Masked gathers: table entries past the used blocks may hold anything (padding), and
    # slots past seq_len may hold NaN/inf garbage; neither is ever read.
    block_ids = tl.load(bt_row + (pos // TOKENS_PER_BLOCK) * stride_bt_b, mask=valid, other=0).to(
        tl.int64
    )
    row = block_ids * stride_kv_b + (pos % TOKENS_PER_BLOCK) * stride_kv_t
    kv_ptrs = kv_head_ptr + row[:, None] + offs_d[None, :] * stride_kv_d
    kv_mask = valid[:, None] & mask_d[None, :]
    k = tl.load(kv_ptrs, mask=kv_mask, other=0.0)  # [BLOCK_N, HEAD_DIM_PAD]
    v = tl.load(kv_ptrs + stride_kv_kv, mask=kv_mask, other=0.0)

    if USE_DOT:
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
    else:
        s = tl.sum(q_scaled[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    s = tl.where(valid[None, :], s, float("-inf"))  # [GROUP_PAD, BLOCK_N]

    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing visible yet keeps m = -inf; subtracting 0 instead avoids
    # (-inf) - (-inf) = NaN, and its exp2 terms are then exactly 0.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_DOT:
        # Probabilities in the query dtype (bf16/fp16 tensor cores), as in flash attention.
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    else:
        pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


# The block table's row stride (its width) and the offset of a decode slice of a mixed batch
# change from step to step; specialising on them (divisibility by 16) would compile new variants
# in the middle of a run.
@triton.jit(
    do_not_specialize=["stride_bt_s"],
    do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr"],
)
def _paged_decode_kernel(
    q_ptr,
    kv_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    lse_ptr,
    stride_q_s,
    stride_q_h,
    stride_q_d,
    stride_kv_kv,
    stride_kv_b,
    stride_kv_t,
    stride_kv_h,
    stride_kv_d,
    stride_bt_s,
    stride_bt_b,
    stride_seq_lens,
    stride_o_s,
    stride_o_h,
    stride_o_split,
    stride_o_d,
    stride_lse_s,
    stride_lse_h,
    stride_lse_split,
    qk_scale,
    sliding_window,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,  # running in the Triton interpreter (CPU tensors)
):
    # int64 row indices: pool and output offsets can exceed 2^31 elements.
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq * stride_seq_lens).to(tl.int32)
    # First visible key: the query (position seq_len - 1) sees keys > its position - window.
    kv_start = 0
    if HAS_WINDOW:
        kv_start = tl.maximum(seq_len - sliding_window, 0)

    # Tiles are aligned to BLOCK_N positions; the first one may start before kv_start (masked).
    tile_lo = kv_start // BLOCK_N
    tile_hi = tl.cdiv(seq_len, BLOCK_N)
    if NUM_SPLITS > 1:
        # Ragged sequences: each one splits its own tile range; trailing splits may be empty.
        tiles_per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, tile_hi)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    # Query head h uses kv head h // GROUP (HF repeat_kv order).
    heads = kv_head * GROUP + offs_g

    q = tl.load(
        q_ptr + seq * stride_q_s + heads[:, None] * stride_q_h + offs_d[None, :] * stride_q_d,
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )
    # The tl.sum path folds the softmax scale and log2(e) into the query once instead of into
    # every score; the tl.dot path scales its scores after the product (q_scaled unused).
    q_scaled = q if USE_DOT else q.to(tl.float32) * qk_scale

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    bt_row = block_tables_ptr + seq * stride_bt_s
    kv_head_ptr = kv_ptr + kv_head * stride_kv_h
    if INTERPRET:
        # The interpreter turns runtime range() bounds into Python ints through a numpy
        # conversion that numpy >= 2.4 rejects (1-element arrays are not scalars); a while loop
        # only needs bool(). Compiled, the for loop is kept: Triton software-pipelines it
        # (num_stages), issuing the next tile's K/V loads before this tile's products, which a
        # while loop never gets.
        tile = tile_lo
        while tile < tile_hi:
            acc, l_i, m_i = _attend_tile(
                q, q_scaled, acc, l_i, m_i, tile, kv_start, seq_len, bt_row, kv_head_ptr,
                stride_kv_kv, stride_kv_b, stride_kv_t, stride_kv_d, stride_bt_b, qk_scale,
                offs_n, offs_d, mask_d, TOKENS_PER_BLOCK, BLOCK_N, USE_DOT, DOT_PRECISION,
            )  # fmt: skip
            tile += 1
    else:
        for tile in range(tile_lo, tile_hi):
            acc, l_i, m_i = _attend_tile(
                q, q_scaled, acc, l_i, m_i, tile, kv_start, seq_len, bt_row, kv_head_ptr,
                stride_kv_kv, stride_kv_b, stride_kv_t, stride_kv_d, stride_bt_b, qk_scale,
                offs_n, offs_d, mask_d, TOKENS_PER_BLOCK, BLOCK_N, USE_DOT, DOT_PRECISION,
            )  # fmt: skip

    # l == 0 only for an empty split (or seq_len == 0): output 0 and lse -inf, not NaN.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out_ptrs = (
        out_ptr
        + seq * stride_o_s
        + heads[:, None] * stride_o_h
        + split * stride_o_split
        + offs_d[None, :] * stride_o_d
    )
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        lse_ptrs = lse_ptr + seq * stride_lse_s + heads * stride_lse_h + split * stride_lse_split
        tl.store(lse_ptrs, lse, mask=mask_g)


@triton.jit
def _merge_splits_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    stride_p_s,
    stride_p_h,
    stride_p_split,
    stride_p_d,
    stride_lse_s,
    stride_lse_h,
    stride_lse_split,
    stride_o_s,
    stride_o_h,
    stride_o_d,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs_j = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_j = offs_j < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(
        lse_ptr + seq * stride_lse_s + head * stride_lse_h + offs_j * stride_lse_split,
        mask=mask_j,
        other=float("-inf"),
    )
    partial = tl.load(
        partial_ptr
        + seq * stride_p_s
        + head * stride_p_h
        + offs_j[:, None] * stride_p_split
        + offs_d[None, :] * stride_p_d,
        mask=mask_j[:, None] & mask_d[None, :],
        other=0.0,
    )
    # Each split's weight is its share of the total softmax mass: 2^(lse_j - max lse).
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_max)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * partial, axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + seq * stride_o_s + head * stride_o_h + offs_d * stride_o_d,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )


_SM_COUNTS: dict[int, int] = {}


def _default_num_splits(
    device: torch.device, num_programs: int, max_positions: int, block_n: int
) -> int:
    """``num_decode_splits`` for the device's SM count; none on CPU.

    Uses only host-side shapes (``max_positions`` from the block table's width), never
    ``seq_lens`` values, so the launch needs no device sync and is CUDA-graph safe.
    """
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return num_decode_splits(_SM_COUNTS[index], num_programs, max_positions, block_n)


_paged_decode_launch = FastLauncher(_paged_decode_kernel)
_merge_splits_launch = FastLauncher(_merge_splits_kernel)


def paged_decode_attention(
    query: torch.Tensor,
    kv_pool_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    num_splits: int | None = None,
    use_dot: bool | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of each sequence's one new token to its keys in the paged pool (Triton).

    query: [num_seqs, num_heads, head_dim] (RoPE applied), any strides; the token of sequence
        ``s`` is at position ``seq_lens[s] - 1`` and its K/V are already in the pool.
    kv_pool_layer: [2, num_blocks, tokens_per_block, num_kv_heads, head_dim], any strides;
        ``num_heads`` must be a multiple of ``num_kv_heads`` (grouped-query attention).
    block_tables: [num_seqs, max_blocks] int32/int64; entries past a sequence's used blocks
        may hold anything (they are never read).
    seq_lens: [num_seqs] int32/int64 KV lengths, each >= 1. A 0 is not supported (its row
        comes out as zeros, which is no attention result).
    scale: softmax scale (usually head_dim ** -0.5).
    sliding_window: if given, a query sees only keys at positions > its own - sliding_window.
    num_splits: flash-decoding split count of each sequence's KV range; None picks one from
        the SM count and the block table's width (1 on CPU).
    use_dot: run the two products with tl.dot (query group padded to 16 rows); None means on
        CUDA only. Float32 inputs use IEEE precision (no TF32).
    block_n, num_warps, num_stages: KV positions per tile, warps per program and software
        pipeline depth; None takes ``DECODE_CONFIG`` (CUDA, tl.dot) or what fits the registers
        (the tl.sum path: 64 positions down to 16).

    Returns [num_seqs, num_heads, head_dim] in ``query``'s dtype; softmax and accumulation in
    float32.
    """
    num_seqs, num_heads, head_dim = query.shape
    if kv_pool_layer.dim() != 5 or kv_pool_layer.shape[0] != 2:
        raise ValueError(
            f"kv_pool_layer must be [2, blocks, tpb, heads, dim], got {kv_pool_layer.shape}"
        )
    _, _, tokens_per_block, num_kv_heads, pool_head_dim = kv_pool_layer.shape
    if pool_head_dim != head_dim:
        raise ValueError(f"pool head_dim {pool_head_dim} != query head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if (
        seq_lens.shape != (num_seqs,)
        or block_tables.dim() != 2
        or block_tables.shape[0] != num_seqs
    ):
        raise ValueError(
            f"seq_lens {tuple(seq_lens.shape)} / block_tables {tuple(block_tables.shape)} do not"
            f" match {num_seqs} sequences"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    group = num_heads // num_kv_heads
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out

    if use_dot is None:
        use_dot = query.is_cuda
    head_dim_pad = triton.next_power_of_2(head_dim)
    default_block_n, default_warps, default_stages = DECODE_CONFIG
    if use_dot:
        group_pad = max(_MIN_DOT, triton.next_power_of_2(group))
        head_dim_pad = max(_MIN_DOT, head_dim_pad)
        block_n = block_n or default_block_n
    else:
        group_pad = triton.next_power_of_2(group)
        if block_n is None:
            # Largest tile (64 down to 16 positions) whose broadcast product stays register-sized.
            block_n = 64
            while block_n > 16 and group_pad * block_n * head_dim_pad > _MAX_BROADCAST:
                block_n //= 2
    if block_n < _MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= {_MIN_DOT}, got {block_n}")
    num_warps = num_warps or default_warps
    num_stages = num_stages or default_stages

    max_positions = block_tables.shape[1] * tokens_per_block
    if sliding_window is not None:
        max_positions = min(max_positions, sliding_window + block_n)
    if num_splits is None:
        num_splits = _default_num_splits(
            query.device, num_seqs * num_kv_heads, max_positions, block_n
        )
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    if num_splits == 1:
        # One split: the kernel normalises and writes the final output directly.
        partial = out.unsqueeze(2)  # [S, H, 1, D]
        lse = out  # unused (NUM_SPLITS == 1), any tensor will do
        lse_strides = (0, 0, 0)
    else:
        partial = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
        )
        lse = torch.empty(
            (num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device
        )
        lse_strides = lse.stride()

    # tl.dot on fp32 inputs defaults to TF32 on GPUs; keep full precision there.
    dot_precision = "ieee" if query.dtype == torch.float32 else "tf32"
    _paged_decode_launch[(num_seqs, num_kv_heads, num_splits)](
        query,
        kv_pool_layer,
        block_tables,
        seq_lens,
        partial,
        lse,
        *query.stride(),
        *kv_pool_layer.stride(),
        *block_tables.stride(),
        seq_lens.stride(0),
        *partial.stride(),
        *lse_strides,
        scale * math.log2(math.e),
        sliding_window if sliding_window is not None else 0,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        TOKENS_PER_BLOCK=tokens_per_block,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        HAS_WINDOW=sliding_window is not None,
        USE_DOT=use_dot,
        DOT_PRECISION=dot_precision,
        INTERPRET=not query.is_cuda,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_launch[(num_seqs, num_heads)](
            partial,
            lse,
            out,
            *partial.stride(),
            *lse.stride(),
            *out.stride(),
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        )
    return out
