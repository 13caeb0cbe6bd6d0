"""Triton kernel: a decode step's model inputs from the token ids and positions the host sent.

A CUDA-graph decode step (``engine.cuda_graphs``) gets two ints a row from the host, a token id
and a position, and derives the rest on the device, in one launch inside the graph::

    sent[0]  token id     t >= 0, or -1 - i: row i of the previous step's tokens (``pending``)
    sent[1]  position     p >= 0, or -1: a padding row
    out[0]   token id     t, or pending[-1 - t]
    out[1]   position     max(p, 0)
    out[2]   slot         block_tables[row, p // TOKENS_PER_BLOCK] * TOKENS_PER_BLOCK
                          + p % TOKENS_PER_BLOCK; -1 for a padding row (its KV write is skipped)
    out[3]   seq_len      max(p, 0) + 1 (a padding row reads one key of its row's block 0)

``decode_inputs_reference`` is the same in torch (CPU runs and the tests' reference). In torch
it takes some fifteen small kernels, about 30 µs of a graph's GPU time; here one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import FastLauncher


# Row counts vary with the bucket, and the buffers are views: no specialisation on either.
@triton.jit(do_not_specialize=["num_rows", "num_pending"])
def _decode_inputs_kernel(
    sent_ptr,
    pending_ptr,
    table_ptr,
    out_ptr,
    num_rows,
    num_pending,
    stride_sent,
    stride_table,
    stride_out,
    TOKENS_PER_BLOCK: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask = rows < num_rows
    ids = tl.load(sent_ptr + rows, mask=mask, other=0)
    positions = tl.load(sent_ptr + stride_sent + rows, mask=mask, other=-1)

    is_pending = ids < 0
    pending_rows = tl.minimum(tl.maximum(-1 - ids, 0), num_pending - 1)
    pending = tl.load(pending_ptr + pending_rows, mask=mask & is_pending, other=0)
    ids = tl.where(is_pending, pending, ids)

    real_positions = tl.maximum(positions, 0)
    # int64: a table row offset can pass 2^31 elements only with huge tables, but costs nothing.
    block_ids = tl.load(
        table_ptr + rows.to(tl.int64) * stride_table + real_positions // TOKENS_PER_BLOCK,
        mask=mask,
        other=0,
    )
    slots = block_ids * TOKENS_PER_BLOCK + real_positions % TOKENS_PER_BLOCK
    slots = tl.where(positions >= 0, slots, -1)

    tl.store(out_ptr + rows, ids, mask=mask)
    tl.store(out_ptr + stride_out + rows, real_positions, mask=mask)
    tl.store(out_ptr + 2 * stride_out + rows, slots, mask=mask)
    tl.store(out_ptr + 3 * stride_out + rows, real_positions + 1, mask=mask)


_decode_inputs_launch = FastLauncher(_decode_inputs_kernel)

BLOCK_ROWS = 128


def _check(sent: torch.Tensor, block_tables: torch.Tensor, out: torch.Tensor) -> int:
    num_rows = sent.shape[1]
    if sent.dim() != 2 or sent.shape[0] != 2 or sent.stride(1) != 1:
        raise ValueError(f"sent must be [2, rows] with unit row stride, got {tuple(sent.shape)}")
    if out.shape != (4, num_rows) or out.stride(1) != 1:
        raise ValueError(f"out must be [4, {num_rows}] with unit row stride, got {out.shape}")
    if block_tables.dim() != 2 or block_tables.shape[0] < num_rows or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be [>= {num_rows}, width], got {block_tables.shape}")
    return num_rows


def decode_inputs(
    sent: torch.Tensor,
    pending: torch.Tensor,
    block_tables: torch.Tensor,
    tokens_per_block: int,
    out: torch.Tensor,
) -> None:
    """Write ``out`` [4, rows] (token ids, positions, slots, seq_lens) from ``sent`` [2, rows]
    (token ids, positions), ``pending`` [P] (the previous step's tokens) and ``block_tables``
    [>= rows, W] (Triton; int64 throughout). See the module docstring."""
    num_rows = _check(sent, block_tables, out)
    if num_rows == 0:
        return
    _decode_inputs_launch[(triton.cdiv(num_rows, BLOCK_ROWS),)](
        sent,
        pending,
        block_tables,
        out,
        num_rows,
        pending.shape[0],
        sent.stride(0),
        block_tables.stride(0),
        out.stride(0),
        TOKENS_PER_BLOCK=tokens_per_block,
        BLOCK_ROWS=BLOCK_ROWS,
    )


def decode_inputs_reference(
    sent: torch.Tensor,
    pending: torch.Tensor,
    block_tables: torch.Tensor,
    tokens_per_block: int,
    out: torch.Tensor,
) -> None:
    """``decode_inputs`` in torch."""
    num_rows = _check(sent, block_tables, out)
    ids, positions = sent[0], sent[1]
    is_pending = ids < 0
    pending_rows = torch.where(is_pending, -1 - ids, 0).clamp_(max=pending.shape[0] - 1)
    out[0] = torch.where(is_pending, pending[pending_rows], ids)
    real_positions = positions.clamp(min=0)
    out[1] = real_positions
    blocks = block_tables[:num_rows].gather(1, (real_positions // tokens_per_block).unsqueeze(1))
    slots = blocks.squeeze(1) * tokens_per_block + real_positions % tokens_per_block
    out[2] = torch.where(positions >= 0, slots, -1)
    out[3] = real_positions + 1
