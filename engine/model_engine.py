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
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.kv_cache import KVCacheManager
from engine.scheduler import SchedulerOutput
from engine.stats import StepWork


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

    Overlap scheduling (engines with ``supports_overlap``): a generation's last token may still
    be on the device, read as ``engine.request.pending_token_id(i)`` (< 0); ``forward`` then gets
    the previous step's sampled tokens as ``pending_tokens`` and takes row ``i`` of it instead.
    """

    supports_overlap: bool = False

    max_seq_len: int
    vocab_size: int
    # Host time the last forward spent building its inputs (s); reported per iteration.
    last_input_prep_time: float = 0.0

    @abstractmethod
    def forward(
        self,
        batch: SchedulerOutput,
        kv_cache_manager: KVCacheManager,
        pending_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def token_buffer(self, num_tokens: int) -> torch.Tensor | None:
        """Overlap scheduling: a device buffer for the decoder to write the step's
        ``num_tokens`` sampled tokens into, which the next step's ``forward`` reads as its
        ``pending_tokens`` without a copy; None: the decoder allocates them."""
        return None

    def step_work(self, batch: SchedulerOutput) -> StepWork:
        """The work of the batch the last ``forward`` ran, for its iteration row; called before
        the step's counters advance. Engines that counted it while building their inputs return
        those counts (a pass over 256 requests costs tens of microseconds a step). This one
        pads nothing."""
        return StepWork(
            batch.context_attention, batch.decode_kv_tokens, batch.max_decode_kv, batch.num_tokens
        )


@dataclass
class HostBatch:
    """A step's flattened inputs as host lists (contexts first, then generations): what
    ``ForwardBatch`` holds, before it is sent to the device. The CUDA-graph runner pads these
    lists to a bucket size instead of padding device tensors.

    Slots and sequence lengths are not stored: they follow from the positions and the block
    rows (``slot_mapping``, ``seq_lens``). The decode graphs derive them on the device, so a
    decode step never builds them on the host.
    """

    input_ids: list[int]
    positions: list[int]
    query_start_loc: list[int]
    logits_indices: list[int]
    block_rows: list[Sequence[int]]  # the KV manager's own rows: read them this step only
    tokens_per_block: int
    num_context_seqs: int
    num_context_tokens: int
    # One key per sequence (its request id), so a runner that keeps rows on the device can tell
    # a row that moved from one that changed; empty: unknown.
    row_keys: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.block_rows)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def is_decode_only(self) -> bool:
        return self.num_context_seqs == 0 and self.num_tokens == self.num_seqs

    @property
    def max_blocks(self) -> int:
        return max(max(map(len, self.block_rows), default=0), 1)

    @property
    def decode_positions(self) -> list[int]:
        """The generations' positions (one token each, after the context tokens)."""
        return self.positions[self.num_context_tokens :]

    @property
    def seq_lens(self) -> list[int]:
        """KV length of each sequence after this step: its last new token's position + 1."""
        positions = self.positions
        return [positions[end - 1] + 1 for end in self.query_start_loc[1:]]

    @property
    def block_table(self) -> list[int]:
        """The block rows, flat, each padded with 0 to ``max_blocks`` columns."""
        width = self.max_blocks
        return [b for row in self.block_rows for b in (*row, *([0] * (width - len(row))))]

    @property
    def slot_mapping(self) -> list[int]:
        """Where each new token's K/V goes: ``block_id * tokens_per_block + offset``."""
        tpb, positions, starts = self.tokens_per_block, self.positions, self.query_start_loc
        slots: list[int] = []
        for i, row in enumerate(self.block_rows):
            slots += [row[p // tpb] * tpb + p % tpb for p in positions[starts[i] : starts[i + 1]]]
        return slots

    def to_device(self, staging: StagingBuffer) -> ForwardBatch:
        """One int64 host buffer, one copy to the device, split into views."""
        num_tokens, num_seqs, width = self.num_tokens, self.num_seqs, self.max_blocks
        table = self.block_table
        seq_lens = self.seq_lens
        #   flat = input_ids | positions | slots | query_start_loc | seq_lens | logits | table
        sizes = [num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs]
        sizes += [len(self.logits_indices), len(table)]
        flat = staging.send(
            self.input_ids
            + self.positions
            + self.slot_mapping
            + self.query_start_loc
            + seq_lens
            + self.logits_indices
            + table
        )
        parts = torch.split(flat, sizes)
        starts = self.query_start_loc
        return ForwardBatch(
            input_ids=parts[0],
            positions=parts[1],
            slot_mapping=parts[2],
            query_start_loc=parts[3],
            seq_lens=parts[4],
            block_tables=parts[6].view(num_seqs, width),
            logits_indices=parts[5],
            max_query_len=max((starts[i + 1] - starts[i] for i in range(num_seqs)), default=0),
            max_seq_len=max(seq_lens, default=0),
            num_context_seqs=self.num_context_seqs,
            num_context_tokens=self.num_context_tokens,
        )


def flatten_batch(batch: SchedulerOutput, kv_cache_manager: KVCacheManager) -> HostBatch:
    """Flatten ``batch`` (contexts first, then generations) into host lists.

    Plain lists, no per-request tensors: at 256 decoding requests this runs every step, and it
    never copies a whole token history (a generation step needs only its last token).
    """
    input_ids: list[int] = []
    positions: list[int] = []
    query_start_loc = [0]
    logits_indices: list[int] = []
    block_rows: list[Sequence[int]] = []

    for request in batch.context_requests:
        start = request.num_computed_tokens
        end = start + request.context_chunk_size
        prompt = request.prompt_token_ids
        tokens = prompt[start:end] if end <= len(prompt) else request.all_token_ids[start:end]
        input_ids += tokens
        positions += range(start, end)
        query_start_loc.append(len(input_ids))
        block_rows.append(kv_cache_manager.get_block_ids(request))
        if request.is_last_context_chunk:
            logits_indices.append(len(input_ids) - 1)
    # Generations: one token each, one comprehension a field (this runs over every decoding
    # request every step). A generation's new token is its last sampled one, not yet cached:
    # its position is num_computed_tokens (= num_tokens - 1).
    generations = batch.generation_requests
    if generations:
        first = len(input_ids)
        input_ids += [r.output_token_ids[-1] for r in generations]
        positions += [r.num_computed_tokens for r in generations]
        logits_indices += range(first, first + len(generations))
        query_start_loc += range(first + 1, first + len(generations) + 1)
        block_rows += kv_cache_manager.block_id_rows(generations)
    return HostBatch(
        input_ids=input_ids,
        positions=positions,
        query_start_loc=query_start_loc,
        logits_indices=logits_indices,
        block_rows=block_rows,
        tokens_per_block=kv_cache_manager.tokens_per_block,
        num_context_seqs=len(batch.context_requests),
        num_context_tokens=batch.num_context_tokens,
        row_keys=[r.request_id for r in batch.context_requests]
        + [r.request_id for r in generations],
    )


def fill_pending_tokens(input_ids: torch.Tensor, pending_tokens: torch.Tensor) -> None:
    """In place, on the device: each id ``pending_token_id(i) = -1 - i`` becomes
    ``pending_tokens[i]``; other ids stay. No host synchronisation::

        input_ids        5  -1   9  -3          pending_tokens  [17, 4, 30]
        -1 - id          0   0   0   2  (clamped)
        result           5  17   9  30
    """
    index = (-1 - input_ids).clamp_(min=0)
    input_ids.copy_(torch.where(input_ids < 0, pending_tokens[index], input_ids))


def build_forward_batch(
    batch: SchedulerOutput, kv_cache_manager: KVCacheManager, device: torch.device
) -> ForwardBatch:
    """``flatten_batch`` then ``HostBatch.to_device``: the eager path's inputs."""
    return flatten_batch(batch, kv_cache_manager).to_device(StagingBuffer(device))


class StagingBuffer:
    """Host int lists -> a device int64 tensor, without synchronising the host.

    On CUDA the values go through a pinned host buffer and an asynchronous copy (a copy from
    pageable memory would block until the GPU is idle). The buffer is rewritten only after the
    event recorded behind its last copy has passed, so a queued copy never reads new values.
    On CPU ``send`` just builds the tensor.
    """

    def __init__(self, device: torch.device, capacity: int = 1 << 16):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self._event = torch.cuda.Event() if self.is_cuda else None
        self._host = torch.empty(0, dtype=torch.int64)
        if self.is_cuda:
            self._grow(capacity)

    def send(self, values: list[int] | np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """``values`` on the device: a new tensor, or the first ``len(values)`` of ``out`` (a
        contiguous int64 device buffer; one copy, no tensor to allocate)."""
        size = len(values)
        if not self.is_cuda:
            tensor = torch.tensor(values, dtype=torch.int64, device=self.device)
            return tensor if out is None else out[:size].copy_(tensor)
        self._event.synchronize()  # the previous copy out of the buffer has run
        if size > self._host.numel():
            self._grow(2 * size)
        self._host_np[:size] = values
        dest = (
            torch.empty(size, dtype=torch.int64, device=self.device) if out is None else out[:size]
        )
        dest.copy_(self._host[:size], non_blocking=True)
        self._event.record()
        return dest

    def _grow(self, capacity: int) -> None:
        self._host = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        self._host_np = self._host.numpy()


class TorchModelEngine(ModelEngine):
    """The real model: a paged forward (``engine.models.PagedCausalLM``) on cpu or cuda.

    With a ``graph_runner`` (``engine.cuda_graphs.DecodeGraphRunner``), decode-only steps that
    fit one of its buckets replay a captured CUDA graph. With a ``piecewise_runner``
    (``engine.piecewise_graphs.PiecewiseGraphRunner``), other steps that fit one of its token
    buckets replay graphs between eager attentions (or, full, one graph with attention
    inside). Every other step runs eagerly.
    """

    supports_overlap = True

    def __init__(self, model, device: torch.device, graph_runner=None, piecewise_runner=None):
        self.model = model  # PagedCausalLM
        self.device = device
        self.max_seq_len = model.max_seq_len
        self.vocab_size = model.vocab_size
        self.graph_runner = graph_runner
        self.piecewise_runner = piecewise_runner
        self._staging = StagingBuffer(device)
        self._last_work = StepWork()
        self.num_graph_steps = 0  # decode steps served by a graph (for tests and reports)

    def step_work(self, batch: SchedulerOutput) -> StepWork:
        return self._last_work

    def token_buffer(self, num_tokens: int) -> torch.Tensor | None:
        runner = self.graph_runner
        return None if runner is None else runner.pending_buffer(num_tokens)

    def forward(
        self,
        batch: SchedulerOutput,
        kv_cache_manager: KVCacheManager,
        pending_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kv_pool = kv_cache_manager.kv_pool
        if kv_pool is None:
            raise RuntimeError("the KV cache manager has no pool: call allocate_pool first")
        start = time.perf_counter()
        runner = self.graph_runner
        num_seqs = batch.batch_size
        if runner is not None and batch.is_repeat and runner.can_advance(num_seqs):
            # The last step's graph batch one token further: no flattening.
            bucket = runner.advance(batch.generation_requests, kv_cache_manager, pending_tokens)
            self._last_work = StepWork(0.0, *runner.decode_work(), bucket)
            return self._replay(runner, bucket, num_seqs, kv_pool, start)
        host = flatten_batch(batch, kv_cache_manager)
        # Generations' KV lengths are their positions + 1: summed in C, not over the requests.
        decode_positions = host.decode_positions
        work = StepWork(
            batch.context_attention,
            sum(decode_positions) + len(decode_positions),
            max(decode_positions, default=-1) + 1,
            host.num_tokens,  # eager: no padding
        )
        self._last_work = work
        if runner is not None:
            if runner.can_run(host):
                bucket = runner.load(host, pending_tokens)
                self._last_work = work._replace(num_padded_tokens=bucket)
                return self._replay(runner, bucket, num_seqs, kv_pool, start)
            runner.forget()  # the next step cannot advance this one's inputs
        piecewise = self.piecewise_runner
        if piecewise is not None and piecewise.can_run(host):
            # A full graph sends its own inputs, attention's included.
            inputs = None if piecewise.is_full else host.to_device(self._staging)
            self.last_input_prep_time = time.perf_counter() - start
            self._last_work = work._replace(num_padded_tokens=piecewise.bucket_for(host.num_tokens))
            return piecewise.run(host, inputs, kv_pool, pending_tokens)
        inputs = host.to_device(self._staging)
        self.last_input_prep_time = time.perf_counter() - start
        if pending_tokens is not None:
            fill_pending_tokens(inputs.input_ids, pending_tokens)
        return self.model.forward(inputs, kv_pool)

    def _replay(self, runner, bucket: int, num_seqs: int, kv_pool: torch.Tensor, start: float):
        """A decode graph step, its inputs loaded since ``start``: the real rows' logits."""
        self.last_input_prep_time = time.perf_counter() - start
        self.num_graph_steps += 1
        return runner.replay(bucket, kv_pool)[:num_seqs]
