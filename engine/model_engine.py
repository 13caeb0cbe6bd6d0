"""The model engine: turns one scheduled batch into logits.

``TorchModelEngine`` flattens the batch into one token sequence (varlen), with the metadata a
paged forward needs::

    requests:        ctx A (chunk of 3, 2 already computed)   ctx B (chunk of 2)   gen C
    input_ids:       a2 a3 a4                                  b0 b1                c7
    positions:       2  3  4                                   0  1                 7
    query_start_loc: 0        3                                      5                 6
    seq_lens:        5                                         2                    8
    slot_mapping:    where each new token's K/V is written in the pool
    block_tables:    one padded row of block ids per request
    logits_indices:  flat index of each token whose next-token logits are needed
                     (A's chunk is last -> index 2; B's is not; C -> index 5)
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from engine.kv_cache import KVCacheManager
from engine.scheduler import SchedulerOutput


@dataclass
class ForwardBatch:
    """Flattened inputs of one step (all tensors on the model's device)."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * tokens_per_block + offset
    query_start_loc: torch.Tensor  # [num_seqs + 1] int64: cu_seqlens of the new tokens
    seq_lens: torch.Tensor  # [num_seqs] int64: KV length of each sequence after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    logits_indices: torch.Tensor  # [num_logits] int64
    max_query_len: int
    max_seq_len: int
    # Host-side split (contexts first, then single-token generations), known to the builder;
    # None: derive it from the tensors (a device-to-host copy on CUDA).
    num_context_seqs: int | None = None
    num_context_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class ModelEngine(ABC):
    """Runs the model forward for a scheduled batch.

    ``forward`` returns logits [len(batch.sampling_requests), vocab] (float32 or the model's
    dtype), one row per request that samples this step, in ``sampling_requests`` order. It reads
    and writes KV only through the KV-cache manager's pool.
    """

    max_seq_len: int
    vocab_size: int
    # Host time the last forward spent building its inputs (s); reported per iteration.
    last_input_prep_time: float = 0.0

    @abstractmethod
    def forward(self, batch: SchedulerOutput, kv_cache_manager: KVCacheManager) -> torch.Tensor: ...


def build_forward_batch(
    batch: SchedulerOutput, kv_cache_manager: KVCacheManager, device: torch.device
) -> ForwardBatch:
    """Flatten ``batch`` (contexts first, then generations) into a ``ForwardBatch``.

    Built in plain lists and sent to the device as one int64 tensor in one copy: at 256 decoding
    requests this runs every step, so it avoids per-request tensors and never copies a whole
    token history (a generation step needs only its last token).
    """
    tpb = kv_cache_manager.tokens_per_block
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    block_rows: list[list[int]] = []

    for request in batch.context_requests:
        start = request.num_computed_tokens
        end = start + request.context_chunk_size
        block_ids = kv_cache_manager.get_block_ids(request)
        prompt = request.prompt_token_ids
        tokens = prompt[start:end] if end <= len(prompt) else request.all_token_ids[start:end]
        input_ids += tokens
        positions += range(start, end)
        slots += [block_ids[p // tpb] * tpb + p % tpb for p in range(start, end)]
        query_start_loc.append(len(input_ids))
        seq_lens.append(end)
        block_rows.append(block_ids)
        if request.is_last_context_chunk:
            logits_indices.append(len(input_ids) - 1)
    for request in batch.generation_requests:
        position = request.num_tokens - 1  # the last sampled token, not yet in the cache
        block_ids = kv_cache_manager.get_block_ids(request)
        input_ids.append(request.output_token_ids[-1])
        positions.append(position)
        slots.append(block_ids[position // tpb] * tpb + position % tpb)
        logits_indices.append(len(input_ids) - 1)
        query_start_loc.append(len(input_ids))
        seq_lens.append(position + 1)
        block_rows.append(block_ids)

    num_tokens, num_seqs = len(input_ids), len(seq_lens)
    max_blocks = max(max((len(row) for row in block_rows), default=0), 1)
    table = [b for row in block_rows for b in (*row, *([0] * (max_blocks - len(row))))]
    #   flat = input_ids | positions | slots | query_start_loc | seq_lens | logits | table
    sizes = [num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, len(logits_indices)]
    flat = torch.tensor(
        input_ids + positions + slots + query_start_loc + seq_lens + logits_indices + table,
        dtype=torch.int64,
    ).to(device)
    parts = torch.split(flat, [*sizes, len(table)])
    q_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(num_seqs)]
    return ForwardBatch(
        input_ids=parts[0],
        positions=parts[1],
        slot_mapping=parts[2],
        query_start_loc=parts[3],
        seq_lens=parts[4],
        block_tables=parts[6].view(num_seqs, max_blocks),
        logits_indices=parts[5],
        max_query_len=max(q_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        num_context_seqs=len(batch.context_requests),
        num_context_tokens=batch.num_context_tokens,
    )


class TorchModelEngine(ModelEngine):
    """The real model: a paged forward (``engine.models.PagedCausalLM``) on cpu or cuda."""

    def __init__(self, model, device: torch.device):
        self.model = model  # PagedCausalLM
        self.device = device
        self.max_seq_len = model.max_seq_len
        self.vocab_size = model.vocab_size

    def forward(self, batch: SchedulerOutput, kv_cache_manager: KVCacheManager) -> torch.Tensor:
        if kv_cache_manager.kv_pool is None:
            raise RuntimeError("the KV cache manager has no pool: call allocate_pool first")
        start = time.perf_counter()
        inputs = build_forward_batch(batch, kv_cache_manager, self.device)
        self.last_input_prep_time = time.perf_counter() - start
        return self.model.forward(inputs, kv_cache_manager.kv_pool)


def pad_decode_batch(inputs: ForwardBatch, num_seqs: int) -> ForwardBatch:
    """A decode-only batch padded to ``num_seqs`` sequences (a CUDA-graph bucket size).

    Padding rows carry token 0 at position 0 with slot -1 (the KV write skips it) and a
    one-token sequence in block 0; their attention output and logits are garbage and must be
    dropped (the first ``inputs.num_seqs`` logits rows are the real ones). Real rows compute
    exactly what they compute unpadded.
    """
    real = inputs.num_seqs
    if inputs.num_context_seqs or inputs.num_tokens != real:
        raise ValueError("pad_decode_batch takes a decode-only batch (one token a sequence)")
    if num_seqs < real:
        raise ValueError(f"cannot pad {real} sequences down to {num_seqs}")
    extra = num_seqs - real

    def grow(tensor: torch.Tensor, fill: int) -> torch.Tensor:
        pad = tensor.new_full((extra, *tensor.shape[1:]), fill)
        return torch.cat([tensor, pad])

    return ForwardBatch(
        input_ids=grow(inputs.input_ids, 0),
        positions=grow(inputs.positions, 0),
        slot_mapping=grow(inputs.slot_mapping, -1),
        query_start_loc=torch.arange(
            num_seqs + 1, dtype=torch.int64, device=inputs.seq_lens.device
        ),
        seq_lens=grow(inputs.seq_lens, 1),
        block_tables=grow(inputs.block_tables, 0),
        logits_indices=torch.arange(num_seqs, dtype=torch.int64, device=inputs.seq_lens.device),
        max_query_len=1,
        max_seq_len=inputs.max_seq_len,
        num_context_seqs=0,
        num_context_tokens=0,
    )
