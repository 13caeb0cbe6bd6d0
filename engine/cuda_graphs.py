"""CUDA graphs for decode-only steps.

A decode step launches some 40 kernels a layer. At small and medium batches the host's launch
time, not the GPU, sets the step time (llama-1b: 11-23 ms eager against a ~1 ms memory floor).
``DecodeGraphRunner`` captures the whole forward once per bucket batch size over static input
buffers, and a decode step becomes: write the inputs into the buffers, replay one graph.

A step of ``n`` sequences runs in the smallest bucket ``b >= n``; the rows past ``n`` are
padding. The host sends token ids and positions only; the graph derives the rest on the device
(``_derive_inputs``), so a step builds two lists of ``n`` ints::

    row:          0  1  2  3  4 | 5  6  7           n = 5, bucket b = 8
    sent:
      input_id    t  t  t  t -2 | 0  0  0           < 0: a token still on the device (overlap):
      position    p  p  p  p  p | -1 -1 -1          row -1 - id of the previous step's tokens
    derived in the graph:
      input_id    t  t  t  t  t | 0  0  0
      position    p  p  p  p  p | 0  0  0
      slot        s  s  s  s  s | -1 -1 -1          table[row, p // tpb] * tpb + p % tpb;
                                                    -1: the KV write skips the row
      seq_len     p+1 ...       | 1  1  1           reads one key, of block 0 (always valid)
    logits:       the first n rows are returned; padding rows are garbage and dropped

Static buffers (B = the largest bucket, W = the longest sequence in blocks)::

    sent         [2, b] int64   input_ids | positions, as sent: the first 2b values of the
                                upload buffer, a fixed view per bucket b
    pending      [P] int64      the previous step's sampled tokens (overlap), P = max_pending_rows
    derived      [4, B] int64   input_ids | positions | slot_mapping | seq_lens
    block_tables [B, W] int64   a step rewrites only the rows whose block ids changed, each
                                up to its own length; a sequence never reads past its own
                                blocks, so stale columns beyond are harmless

The inputs go host -> pinned staging -> one device copy into a static upload buffer (the
graph reads the ids and positions there) -> an index_copy of the changed block-table rows,
with no host synchronisation (``StagingBuffer``). A step the scheduler repeated (the same
sequences, one token further) skips even that: ``advance`` moves the last load's positions on
by one and sends only the block-table entries of tokens that start a block.

Graphs are captured largest first into one shared memory pool (a smaller graph reuses the
larger one's intermediates), after a warm-up forward per bucket that compiles the Triton
variants. With ``capture=False`` the runner runs the same padded static-buffer forward eagerly:
the CPU tests exercise the padding and buffer logic that way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.model_engine import ForwardBatch, HostBatch, StagingBuffer, fill_pending_tokens
from kernels.decode_inputs import decode_inputs, decode_inputs_reference

if TYPE_CHECKING:
    from engine.kv_cache import KVCacheManager
    from engine.request import Request


def capture_graph(run: Callable[[], Any], pool: Any = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``run()`` once on a side stream (it compiles Triton variants and sets up cuBLAS
    workspaces, neither of which may happen during capture), then capture it into a graph that
    allocates from ``pool`` (None: a new pool, ``graph.pool()`` to share it). Returns the graph
    and what the captured ``run()`` returned (its output tensors live in the pool)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        result = run()
    return graph, result


def check_capture_device(device: torch.device) -> None:
    """Graph capture needs the model on a CUDA device (CPU runs use ``capture=False``)."""
    if device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device; this model is on " + str(device))


def default_cuda_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, then every 16 up to ``max_batch_size`` (always included): at most
    16 padding rows above 32, and about 20 graphs for a batch of 256."""
    sizes = [s for s in (1, 2, 4, 8, 16, 32) if s < max_batch_size]
    sizes += range(48, max_batch_size, 16)
    return sorted({*sizes, max_batch_size})


class DecodeGraphRunner:
    """Captured decode forwards of ``model`` (a ``PagedCausalLM``) over ``kv_pool``.

    ``batch_sizes``: the bucket sizes. ``max_blocks_per_seq``: the block-table width W (the
    longest sequence the executor can hold, in blocks). ``capture``: capture CUDA graphs (needs
    a CUDA model on the Triton attention backend); False runs the static-buffer forward eagerly.
    ``max_pending_rows``: the most tokens a step samples (the micro-batch scheduler's
    ``max_batch_size``; default: the largest bucket): overlap's pending tokens are copied into
    a buffer of that size that the graph reads. A step after a larger one fills them in
    outside the graph.
    """

    def __init__(
        self,
        model,
        kv_pool: torch.Tensor,
        batch_sizes: Sequence[int],
        max_blocks_per_seq: int,
        *,
        capture: bool = True,
        max_pending_rows: int | None = None,
    ) -> None:
        sizes = sorted(set(batch_sizes))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"cuda_graph_batch_sizes must be positive ints, got {batch_sizes}")
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be >= 1, got {max_blocks_per_seq}")
        device = kv_pool.device
        if capture:
            check_capture_device(device)
        if capture and model.attention_backend != "triton":
            raise ValueError(
                f"attention_backend={model.attention_backend!r} cannot run in CUDA graphs (the "
                "torch reference reads sequence lengths on the host): use the triton attention "
                "backend, or enforce_eager=True"
            )
        self.model = model
        self.kv_pool = kv_pool
        self.batch_sizes = sizes
        self.max_batch_size = sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.is_captured = False
        self._capture = capture

        rows, width = self.max_batch_size, max_blocks_per_seq
        self.tokens_per_block = kv_pool.shape[3]
        # One Triton launch with the model's kernels; the torch reference on the torch backend.
        is_triton = model.attention_backend == "triton"
        self._derive = decode_inputs if is_triton else decode_inputs_reference
        # Everything a step sends lands here in one copy: a bucket's graph reads its ids and
        # positions from the first 2 * bucket values (``_sent``); what follows is for the
        # block-table updates made before the replay.
        upload_size = 2 * rows + 2 * rows + rows * width
        self._upload = torch.zeros(upload_size, dtype=torch.int64, device=device)
        self._pending = torch.zeros(max_pending_rows or rows, dtype=torch.int64, device=device)
        self._derived = torch.zeros((4, rows), dtype=torch.int64, device=device)
        self._block_tables = torch.zeros((rows, width), dtype=torch.int64, device=device)
        # What each row of _block_tables holds (its first len(row) columns); padding rows may
        # hold any valid block ids (a padding sequence reads one key of its row's block 0).
        self._held_rows: list[list[int] | None] = [None] * rows
        self._held_keys: list[int | None] = [None] * rows  # the request each row was sent for
        self.last_num_rows_sent = 0  # block-table rows the last load sent (for tests, reports)
        # Positions of the last loaded batch's sequences, for ``advance``; None: cannot advance.
        self._positions: np.ndarray | None = None
        self._pending_ids = -1 - np.arange(rows, dtype=np.int64)
        self.num_advanced_steps = 0  # steps loaded by ``advance`` (for tests and reports)
        self._arange = torch.arange(rows + 1, dtype=torch.int64, device=device)
        self._staging = StagingBuffer(device, capacity=upload_size)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    # ---- per step -------------------------------------------------------------------------------
    def bucket_for(self, num_seqs: int) -> int:
        for size in self.batch_sizes:
            if size >= num_seqs:
                return size
        raise ValueError(f"{num_seqs} sequences exceed the largest bucket {self.max_batch_size}")

    def can_run(self, host: HostBatch) -> bool:
        return (
            host.is_decode_only
            and 0 < host.num_seqs <= self.max_batch_size
            and host.max_blocks <= self.max_blocks_per_seq
        )

    def load(self, host: HostBatch, pending_tokens: torch.Tensor | None = None) -> int:
        """Write a decode-only batch into the static buffers, padded; returns its bucket.
        ``pending_tokens``: the previous step's tokens, for input ids still pending on the
        device (``fill_pending_tokens``).

        Only the block-table rows that differ from what the table already holds are sent:
        from one decode step to the next the batch is mostly the same sequences in the same
        order, and a sequence gains a block only every ``tokens_per_block`` tokens, so at 256
        sequences a step sends a few rows instead of ~10,000 block ids. Columns past a row's
        blocks are never read, so a changed row is written only up to its own length. When a
        sequence leaves, those after it move up a row: with ``host.row_keys`` the held rows
        are moved on the device (one gather) instead of sent again::

            held   keys 10 11 12 13          gather rows [0, 2, 3]      send what still
            batch  keys 10 12 13      ->     table  10 12 13 (13)  ->   differs (none here)
        """
        num_seqs = host.num_seqs
        bucket = self.bucket_for(num_seqs)
        extra = bucket - num_seqs
        values = host.input_ids + [0] * extra
        values += host.positions + [-1] * extra  # -1: a padding row (see the module docstring)
        held = self._held_rows
        moved = self._move_rows(host.row_keys)
        changed = [i for i, row in enumerate(host.block_rows) if row != held[i]]
        width = max((len(host.block_rows[i]) for i in changed), default=0)
        values += moved
        values += changed
        for i in changed:
            row = host.block_rows[i]
            held[i] = list(row)  # a snapshot: the caller's list may change later
            values += row
            if len(row) < width:
                values += [0] * (width - len(row))
        self.last_num_rows_sent = len(changed)
        self._positions = np.array(host.positions, dtype=np.int64)
        staged = self._staging.send(values, out=self._upload)
        self._take_pending(bucket, num_seqs, pending_tokens)
        offset = 2 * bucket
        if moved:  # a gather (it copies) before the write: rows may swap
            self._block_tables[:num_seqs] = self._block_tables[staged[offset : offset + num_seqs]]
            offset += num_seqs
        if changed:
            num_changed = len(changed)
            rows = staged[offset + num_changed :].view(num_changed, width)
            self._block_tables[:, :width].index_copy_(
                0, staged[offset : offset + num_changed], rows
            )
        return bucket

    def _sent(self, bucket: int) -> torch.Tensor:
        """[2, bucket]: the ids and positions a bucket's graph reads (a fixed view)."""
        return self._upload[: 2 * bucket].view(2, bucket)

    def pending_buffer(self, num_tokens: int) -> torch.Tensor | None:
        """Where a step's sampled tokens can go for the next step's graph to read them without
        a copy (``ModelEngine.token_buffer``); None if they do not fit."""
        return self._pending[:num_tokens] if num_tokens <= len(self._pending) else None

    def _take_pending(
        self, bucket: int, num_seqs: int, pending_tokens: torch.Tensor | None
    ) -> None:
        """The previous step's tokens into ``_pending``, for the graph to take (sampled there
        already when the decoder wrote them into ``pending_buffer``)."""
        if pending_tokens is None or pending_tokens.data_ptr() == self._pending.data_ptr():
            return
        if len(pending_tokens) <= len(self._pending):
            self._pending[: len(pending_tokens)].copy_(pending_tokens)
        else:  # more than the graph's buffer holds: fill them in here
            fill_pending_tokens(self._sent(bucket)[0, :num_seqs], pending_tokens)

    # ---- a repeated step: the last batch, one token further -----------------------------------
    def forget(self) -> None:
        """The step ran elsewhere (eagerly): the next one cannot ``advance`` the last load."""
        self._positions = None

    def can_advance(self, num_seqs: int) -> bool:
        """The last load was a batch of ``num_seqs`` whose next tokens stay within the table."""
        positions = self._positions
        return (
            positions is not None
            and len(positions) == num_seqs
            and int(positions.max()) + 1 < self.max_blocks_per_seq * self.tokens_per_block
        )

    def advance(
        self,
        requests: Sequence[Request],
        kv_cache_manager: KVCacheManager,
        pending_tokens: torch.Tensor | None = None,
    ) -> int:
        """Load the last loaded batch's sequences one token further; returns the bucket.
        ``requests``: those sequences, in the same order (``SchedulerOutput.is_repeat``): each
        holds the blocks it held, plus one when its new token starts a block (the KV manager's
        ``steady_decode`` contract). So instead of flattening the batch, the positions advance
        by one in a host array, and only those new blocks are sent::

            positions   +1 each                     table[rows, cols] = blocks, where
            rows        positions % tpb == 0        cols = positions // tpb and blocks are
                                                    the requests' block ids there

        Token ids are each request's last: with overlap, the pending ids -1 - i."""
        positions = self._positions
        positions += 1
        if int(positions[0]) != requests[0].num_computed_tokens:  # a cheap guard: row 0 only
            raise RuntimeError(
                f"advance: {requests[0]} is not one token past the last load (position "
                f"{int(positions[0])}); the batch is not the last one repeated"
            )
        num_seqs = len(requests)
        bucket = self.bucket_for(num_seqs)
        tpb = self.tokens_per_block
        rows = np.flatnonzero(positions % tpb == 0)  # new tokens that start a block
        num_rows = len(rows)
        values = np.empty(2 * bucket + 3 * num_rows, dtype=np.int64)
        if pending_tokens is None:
            values[:num_seqs] = [r.output_token_ids[-1] for r in requests]
        else:
            # Overlap: each request's last token is still pending, sampled at its own row of the
            # last step (the same batch): ids -1 - i, no need to read them (ends checked).
            first, last = requests[0].output_token_ids[-1], requests[-1].output_token_ids[-1]
            if (first, last) != (-1, -num_seqs):
                raise RuntimeError(f"advance: pending ids {first}, {last} are not -1, -{num_seqs}")
            values[:num_seqs] = self._pending_ids[:num_seqs]
        values[num_seqs:bucket] = 0
        values[bucket : bucket + num_seqs] = positions
        values[bucket + num_seqs : 2 * bucket] = -1
        if num_rows:
            cols = positions[rows] // tpb
            tables = kv_cache_manager.block_id_rows([requests[i] for i in rows.tolist()])
            held = self._held_rows
            for i, table in zip(rows.tolist(), tables, strict=True):
                held[i] = list(table)
            offset = 2 * bucket
            values[offset : offset + num_rows] = rows
            values[offset + num_rows : offset + 2 * num_rows] = cols
            values[offset + 2 * num_rows :] = [
                t[c] for t, c in zip(tables, cols.tolist(), strict=True)
            ]
        self.last_num_rows_sent = num_rows
        staged = self._staging.send(values, out=self._upload)
        self._take_pending(bucket, num_seqs, pending_tokens)
        if num_rows:
            index = staged[2 * bucket :].view(3, num_rows)
            self._block_tables.index_put_((index[0], index[1]), index[2])
        self.num_advanced_steps += 1
        return bucket

    def decode_work(self) -> tuple[int, int]:
        """``(decode_kv_tokens, max_decode_kv)`` of the last loaded batch."""
        positions = self._positions
        return int(positions.sum()) + len(positions), int(positions.max()) + 1

    def _move_rows(self, keys: list[int]) -> list[int]:
        """For each sequence of the batch (by ``keys``), the row that holds its blocks now, if
        any row moved; else an empty list. Moves ``_held_rows`` the same way. Which row a key
        maps to is only a guess at what saves sending: the rows sent next are decided by
        comparing contents."""
        held_keys = self._held_keys
        num_seqs = len(keys)
        if not keys or keys == held_keys[:num_seqs]:
            return []
        # First occurrence: a row past the last batch's end may hold a stale copy of a key.
        where = {key: i for i, key in reversed(list(enumerate(held_keys))) if key is not None}
        sources = [where.get(key, i) for i, key in enumerate(keys)]
        held_keys[:num_seqs] = keys
        if all(source == i for i, source in enumerate(sources)):
            return []
        held = self._held_rows
        held[:num_seqs] = [held[source] for source in sources]
        return sources

    def replay(self, bucket: int, kv_pool: torch.Tensor) -> torch.Tensor:
        """Logits [bucket, vocab] of the loaded batch (a static buffer: read it before the next
        replay)."""
        if kv_pool is not self.kv_pool:
            raise RuntimeError("the KV pool was reallocated after the CUDA graphs were captured")
        if self._capture:
            self._graphs[bucket].replay()
            return self._outputs[bucket]
        return self._static_forward(bucket)

    # ---- capture --------------------------------------------------------------------------------
    def _derive_inputs(self, bucket: int) -> None:
        """Device side of ``load``, inside the graph: the model's inputs from the ids and
        positions sent (``kernels.decode_inputs``; see the module docstring)."""
        self._derive(
            self._sent(bucket),
            self._pending,
            self._block_tables,
            self.tokens_per_block,
            self._derived[:, :bucket],
        )

    def _static_forward(self, bucket: int) -> torch.Tensor:
        self._derive_inputs(bucket)
        return self.model.forward(self._static_batch(bucket), self.kv_pool)

    def _static_batch(self, bucket: int) -> ForwardBatch:
        derived = self._derived
        return ForwardBatch(
            input_ids=derived[0, :bucket],
            positions=derived[1, :bucket],
            slot_mapping=derived[2, :bucket],
            query_start_loc=self._arange[: bucket + 1],
            seq_lens=derived[3, :bucket],
            block_tables=self._block_tables[:bucket],
            logits_indices=self._arange[:bucket],
            max_query_len=1,
            max_seq_len=self.max_blocks_per_seq * self.tokens_per_block,
            num_context_seqs=0,
            num_context_tokens=0,
        )

    def _capture_all(self) -> None:
        # Capture-time inputs are all padding: nothing is written to the pool.
        self._block_tables.zero_()
        pool = None
        for bucket in reversed(self.batch_sizes):
            self._sent(bucket)[0].zero_()
            self._sent(bucket)[1].fill_(-1)
            graph, self._outputs[bucket] = capture_graph(
                lambda bucket=bucket: self._static_forward(bucket), pool
            )
            pool = graph.pool()
            self._graphs[bucket] = graph
        torch.cuda.synchronize()
        self.is_captured = True
