"""Torch reference attention over the paged KV pool (cpu and cuda, any float dtype).

One layer's slice of the pool is ``[2, num_blocks, tokens_per_block, num_kv_heads, head_dim]``
(index 0 = keys, 1 = values). A token at position ``p`` of a sequence lives in block
``block_table[p // tokens_per_block]`` at offset ``p % tokens_per_block``; its flat slot is
``block_id * tokens_per_block + offset``.

``paged_attention`` pads the varlen batch to ``[num_seqs, max_query_len]`` queries and
``[num_seqs, max_seq_len]`` keys gathered through the block tables, then masks. Its scores tensor
is ``num_seqs * num_heads * max_query_len * max_seq_len``: fine for tests and small batches, not
meant for long prefills mixed with many decodes (the Triton kernels cover that).
"""

from __future__ import annotations

import torch

from engine.model_engine import ForwardBatch


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_pool_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write each new token's K/V into its pool slot, in place.

    key, value: [num_tokens, num_kv_heads, head_dim]; kv_pool_layer: [2, num_blocks,
    tokens_per_block, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64 flat slots.
    Values are cast to the pool's dtype. A negative slot (a padding row) is skipped, as in the
    Triton kernel.
    """
    tokens_per_block = kv_pool_layer.shape[2]
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    blocks = slot_mapping // tokens_per_block
    offsets = slot_mapping % tokens_per_block
    # Index (block, offset) rather than a flattened view: works on a non-contiguous pool slice
    # too, where a flatten would silently write into a copy.
    kv_pool_layer[0, blocks, offsets] = key.to(kv_pool_layer.dtype)
    kv_pool_layer[1, blocks, offsets] = value.to(kv_pool_layer.dtype)


def paged_attention(
    query: torch.Tensor,
    kv_pool_layer: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of the batch's new tokens to their sequences' keys in the pool.

    query: [num_tokens, num_heads, head_dim] (RoPE applied), flattened in ``batch`` order;
    kv_pool_layer: [2, num_blocks, tokens_per_block, num_kv_heads, head_dim], already holding
    this step's K/V (see ``write_kv``). Sequence ``i`` has keys at positions ``0..seq_len_i - 1``
    and its ``q_len_i`` new tokens at ``seq_len_i - q_len_i .. seq_len_i - 1``; each attends to
    key positions ``<= its own`` (and ``> its own - sliding_window`` when a window is given).
    ``num_heads`` must be a multiple of ``num_kv_heads`` (grouped-query attention).

    Returns [num_tokens, num_heads, head_dim] in ``query``'s dtype. Scores and softmax run in
    at least float32 (float64 stays float64).

    The batch builder puts single-token sequences (decodes) after the contexts. Padding both
    groups to one [max_query_len, max_seq_len] would give every decode a context's query rows,
    so the two groups are padded separately::

        seqs:    ctx0 ctx1 | gen2 gen3 gen4        -> padded [2, max_q, max_k_ctx]
                           |                        + padded [3, 1, max_k_gen]
    """
    q_lens = (batch.query_start_loc[1:] - batch.query_start_loc[:-1]).tolist()
    seq_lens = batch.seq_lens.tolist()
    # First sequence of the trailing run of single-token sequences.
    split = len(q_lens)
    while split > 0 and q_lens[split - 1] == 1:
        split -= 1
    groups = [(0, split), (split, len(q_lens))] if 0 < split < len(q_lens) else [(0, len(q_lens))]
    outputs = []
    for first, last in groups:
        token_start, token_end = sum(q_lens[:first]), sum(q_lens[:last])
        outputs.append(
            _padded_attention(
                query[token_start:token_end],
                kv_pool_layer,
                batch.query_start_loc[first : last + 1] - token_start,
                batch.seq_lens[first:last],
                batch.block_tables[first:last],
                max(q_lens[first:last]),
                max(seq_lens[first:last]),
                scale,
                sliding_window,
            )
        )
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _padded_attention(
    query: torch.Tensor,
    kv_pool_layer: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """``paged_attention`` for one group of sequences, padded to [max_q] x [max_k]."""
    num_tokens, num_heads, head_dim = query.shape
    _, _, tokens_per_block, num_kv_heads, _ = kv_pool_layer.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    device = query.device
    compute_dtype = torch.promote_types(query.dtype, torch.float32)

    # Varlen -> padded: token t belongs to sequence seq_of[t] at row local[t] of its chunk.
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    seq_of = torch.repeat_interleave(
        torch.arange(num_seqs, device=device), q_lens, output_size=num_tokens
    )
    local = torch.arange(num_tokens, device=device) - query_start_loc[seq_of]
    q = query.new_zeros((num_seqs, max_q, num_heads, head_dim))
    q[seq_of, local] = query

    # Gather every sequence's keys/values through its block table: [S, max_k, Hkv, D].
    key_pos = torch.arange(max_k, device=device)
    # Positions past a sequence's length may fall beyond its table row; clamp them to a real
    # column (they are masked below, whatever block they read).
    block_col = (key_pos // tokens_per_block).clamp(max=block_tables.shape[1] - 1)
    blocks = block_tables[:, block_col]  # [S, max_k]
    offsets = (key_pos % tokens_per_block).expand(num_seqs, max_k)
    k = kv_pool_layer[0, blocks, offsets]
    v = kv_pool_layer[1, blocks, offsets]
    # Padding reads other sequences' or never-written slots, possibly NaN/inf (an empty pool):
    # zero them, since 0 probability times NaN would still poison the output.
    key_valid = key_pos[None, :] < seq_lens[:, None]  # [S, max_k]
    k = k.masked_fill(~key_valid[:, :, None, None], 0)
    v = v.masked_fill(~key_valid[:, :, None, None], 0)

    # Absolute position of each padded query row; padding rows reuse the last real position so
    # that no row is fully masked (they are dropped at the end anyway).
    rows = torch.arange(max_q, device=device)
    first_pos = (seq_lens - q_lens)[:, None]  # [S, 1]
    query_pos = torch.minimum(first_pos + rows[None, :], seq_lens[:, None] - 1)  # [S, Qmax]
    allowed = key_pos[None, None, :] <= query_pos[:, :, None]  # [S, Qmax, max_k]
    if sliding_window is not None:
        allowed &= key_pos[None, None, :] > query_pos[:, :, None] - sliding_window

    # Grouped-query heads: view query heads as [Hkv, group] so K/V broadcast instead of being
    # repeated per query head (query head h uses kv head h // group, as in HF repeat_kv).
    q = q.to(compute_dtype).view(num_seqs, max_q, num_kv_heads, group, head_dim)
    q = q.permute(0, 2, 3, 1, 4)  # [S, Hkv, G, Qmax, D]
    k = k.to(compute_dtype).permute(0, 2, 1, 3)[:, :, None]  # [S, Hkv, 1, max_k, D]
    v = v.to(compute_dtype).permute(0, 2, 1, 3)[:, :, None]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [S, Hkv, G, Qmax, max_k]
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [S, Hkv, G, Qmax, D]

    out = out.permute(0, 3, 1, 2, 4).reshape(num_seqs, max_q, num_heads, head_dim)
    return out[seq_of, local].to(query.dtype)
