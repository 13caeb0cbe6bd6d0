"""CUDA graphs for decode-only steps.

A decode step launches some 40 kernels a layer. At small and medium batches the host's launch
time, not the GPU, sets the step time (llama-1b: 11-23 ms eager against a ~1 ms memory floor).
``DecodeGraphRunner`` captures the whole forward once per bucket batch size over static input
buffers, and a decode step becomes: write the inputs into the buffers, replay one graph.

A step of ``n`` sequences runs in the smallest bucket ``b >= n``; the rows past ``n`` are
padding::

    row:        0  1  2  3  4 | 5  6  7           n = 5, bucket b = 8
    input_id:   t  t  t  t  t | 0  0  0
    position:   p  p  p  p  p | 0  0  0
    slot:       s  s  s  s  s | -1 -1 -1          -1: the KV write skips the row
    seq_len:    l  l  l  l  l | 1  1  1           reads one key, of block 0 (always valid)
    logits:     the first n rows are returned; padding rows are garbage and dropped

Static buffers (B = the largest bucket, W = the longest sequence in blocks)::

    vectors      [4, B] int64   input_ids | positions | slot_mapping | seq_lens
    block_tables [B, W] int64   a step rewrites only the rows whose block ids changed, each
                                up to its own length; a sequence never reads past its own
                                blocks, so stale columns beyond are harmless

The inputs go host -> pinned staging -> one device copy -> a copy and an index_copy into the
buffers, with no host synchronisation (``StagingBuffer``).

Graphs are captured largest first into one shared memory pool (a smaller graph reuses the
larger one's intermediates), after a warm-up forward per bucket that compiles the Triton
variants. With ``capture=False`` the runner runs the same padded static-buffer forward eagerly:
the CPU tests exercise the padding and buffer logic that way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.model_engine import ForwardBatch, HostBatch, StagingBuffer, fill_pending_tokens


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
    """

    def __init__(
        self,
        model,
        kv_pool: torch.Tensor,
        batch_sizes: Sequence[int],
        max_blocks_per_seq: int,
        *,
        capture: bool = True,
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
        self._vectors = torch.zeros((4, rows), dtype=torch.int64, device=device)
        self._block_tables = torch.zeros((rows, width), dtype=torch.int64, device=device)
        # What each row of _block_tables holds (its first len(row) columns); padding rows may
        # hold any valid block ids (a padding sequence reads one key of its row's block 0).
        self._held_rows: list[list[int] | None] = [None] * rows
        self._held_keys: list[int | None] = [None] * rows  # the request each row was sent for
        self.last_num_rows_sent = 0  # block-table rows the last load sent (for tests, reports)
        self._arange = torch.arange(rows + 1, dtype=torch.int64, device=device)
        self._staging = StagingBuffer(device, capacity=4 * rows + rows * width)
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
        pad = [0] * extra
        values = host.input_ids + pad
        values += host.positions + pad
        values += host.slot_mapping + [-1] * extra
        values += host.seq_lens + [1] * extra
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
        staged = self._staging.send(values)
        self._vectors[:, :bucket].copy_(staged[: 4 * bucket].view(4, bucket))
        if pending_tokens is not None:
            fill_pending_tokens(self._vectors[0, :num_seqs], pending_tokens)
        offset = 4 * bucket
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
        return self.model.forward(self._static_batch(bucket), kv_pool)

    # ---- capture --------------------------------------------------------------------------------
    def _static_batch(self, bucket: int) -> ForwardBatch:
        vectors = self._vectors
        return ForwardBatch(
            input_ids=vectors[0, :bucket],
            positions=vectors[1, :bucket],
            slot_mapping=vectors[2, :bucket],
            query_start_loc=self._arange[: bucket + 1],
            seq_lens=vectors[3, :bucket],
            block_tables=self._block_tables[:bucket],
            logits_indices=self._arange[:bucket],
            max_query_len=1,
            max_seq_len=self.max_blocks_per_seq * self.kv_pool.shape[3],
            num_context_seqs=0,
            num_context_tokens=0,
        )

    def _capture_all(self) -> None:
        # Capture-time inputs are all padding: nothing is written to the pool.
        self._vectors.zero_()
        self._vectors[2].fill_(-1)
        self._vectors[3].fill_(1)
        self._block_tables.zero_()
        pool = None
        for bucket in reversed(self.batch_sizes):
            static = self._static_batch(bucket)
            graph, self._outputs[bucket] = capture_graph(
                lambda static=static: self.model.forward(static, self.kv_pool), pool
            )
            pool = graph.pool()
            self._graphs[bucket] = graph
        torch.cuda.synchronize()
        self.is_captured = True
