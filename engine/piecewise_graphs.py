"""Steps with prompt tokens through piecewise CUDA graphs: captured between the attentions.

An eager prefill or mixed step launches ~11 kernels a layer from Python, so a short one costs the
host's launch time (12 ms for llama-8b on an H100 host even with kernels/launch.py), whatever its
size. Everything but attention is per token, so it can be captured for a token count and replayed
for any batch of that many tokens; attention depends on the batch's sequences and runs eagerly
between the graphs (vLLM's "piecewise" CUDA graphs)::

    piece 0            attention 0    piece 1               ...   piece L
    embed, RoPE,       (eager: the    o_proj, norm, MLP,          o_proj, norm, MLP,
    norm, qkv, ...  -> real batch) -> next norm, qkv, ...   ...   final norm, lm_head
    [bucket tokens]    [T tokens]     [bucket tokens]             [logits rows]

A step of T tokens runs in the smallest bucket B >= T of ``token_sizes``. The pieces read and
write static buffers (the rows past T hold stale, finite values that no real row reads: every
piece is per token, and attention sees only the real T tokens); their temporaries live in one
memory pool shared by every piece and bucket, which is safe because pieces never overlap.

``capture=False`` runs the same pieces on the same padded buffers without capturing (CPU tests).
On by default where it can run (``LLM(piecewise_cuda_graphs=None)``) since the H200 run of
2026-11-28: the same tokens as eager steps, and a 16-token llama-8b step in 5.9 ms against 15.2.

``full=True`` (``LLM(full_cuda_graphs=True)``, vLLM's FULL mode) captures each bucket's whole
step, attention included, as one graph: the host then sends the step's inputs and replays it,
whatever the model's depth, instead of launching three kernels a layer between the pieces. The
graph's grids cannot follow the batch, so attention reads everything from static buffers that
the host fills before the replay: the KV slots (``-1`` on padding rows, which ``write_kv``
skips), the sequences' starts and lengths, their block table, and a table of the programs'
(sequence, M tile) pairs (``kernels.paged_prefill.prefill_tiles``, padded with ``-1``), so a
grid sized for the bucket's worst case runs only the batch's tiles. Decodes take the same
varlen kernel as the contexts, in a second launch with 16-row tiles (one a decode), instead of
the split-KV decode kernel. One flat buffer holds a bucket's inputs, at offsets fixed at
capture::

    ids [B] | positions [B] | logits rows [R] | slots [B] | starts [R + 1] | lengths [R]
    | context tiles [2 Tc] | decode tiles [2 Td]
    (B: the bucket's tokens; R: its rows, the most sequences it can hold; Tc, Td: the most
    tiles of each launch, kernels.paged_prefill.max_prefill_tiles)

and the block table has a row of ``max_blocks_per_seq`` columns for each of ``max_num_seqs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property

import torch

from engine.cuda_graphs import capture_graph, check_capture_device
from engine.model_engine import ForwardBatch, HostBatch, StagingBuffer, fill_pending_tokens
from kernels.paged_prefill import (
    DECODE_BLOCK_M,
    max_prefill_tiles,
    prefill_block_m,
    prefill_tiles,
)


def default_piecewise_token_sizes(max_num_tokens: int) -> list[int]:
    """Powers of two from 16, then ``max_num_tokens`` itself: 2x padding at most."""
    sizes, size = [], 16
    while size < max_num_tokens:
        sizes.append(size)
        size *= 2
    return [*sizes, max_num_tokens]


@dataclass(frozen=True)
class BucketInputs:
    """One bucket's views of the runner's flat input buffer (module diagram); the attention
    fields are read by full graphs only."""

    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    logits_rows: torch.Tensor  # [R]
    slot_mapping: torch.Tensor  # [B]
    query_start_loc: torch.Tensor  # [R + 1]
    seq_lens: torch.Tensor  # [R]
    context_tiles: torch.Tensor  # [Tc, 2]
    decode_tiles: torch.Tensor  # [Td, 2]

    @cached_property
    def size(self) -> int:
        """Values a step sends for the bucket (without its block table)."""
        return sum(getattr(self, f.name).numel() for f in fields(self))


class PiecewiseGraphRunner:
    """Piecewise CUDA graphs of ``model`` (a ``PagedCausalLM`` on the Triton backend) for steps
    of up to ``max(token_sizes)`` tokens and ``max_num_seqs`` sequences; with ``full=True``
    one graph a bucket, attention included, for sequences of up to ``max_blocks_per_seq``
    blocks."""

    def __init__(
        self,
        model,
        kv_pool: torch.Tensor,
        token_sizes: Sequence[int],
        max_num_seqs: int,
        *,
        capture: bool = True,
        full: bool = False,
        max_blocks_per_seq: int | None = None,
    ) -> None:
        sizes = sorted(set(token_sizes))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"piecewise token sizes must be positive ints, got {token_sizes}")
        if model.attention_backend != "triton":
            raise ValueError("piecewise CUDA graphs need the triton attention backend")
        device = kv_pool.device
        if capture:
            check_capture_device(device)
        self.model = model
        self.kv_pool = kv_pool
        self.token_sizes = sizes
        self.max_num_tokens = sizes[-1]
        self.max_num_seqs = max(1, max_num_seqs)
        self.num_pieces = model.num_layers + 1
        self.is_captured = False
        self.is_full = full
        self._capture = capture

        n, dtype = self.max_num_tokens, model.dtype
        heads, kv_heads, dim = model.num_heads, model.num_kv_heads, model.head_dim
        hidden = model.hf_model.config.hidden_size
        self._q = torch.zeros((n, heads, dim), dtype=dtype, device=device)
        self._k = torch.zeros((n, kv_heads, dim), dtype=dtype, device=device)
        self._v = torch.zeros((n, kv_heads, dim), dtype=dtype, device=device)
        self._out = torch.zeros((n, heads * dim), dtype=dtype, device=device)
        self._residual = torch.zeros((n, hidden), dtype=dtype, device=device)
        self._cos = torch.zeros((n, dim), dtype=dtype, device=device)
        self._sin = torch.zeros((n, dim), dtype=dtype, device=device)
        self._logits = torch.zeros((self.rows_for(n), model.vocab_size), dtype=dtype, device=device)
        # Full graphs: the GQA group and the attention kernel's M tile (the tiles' shape), the
        # block table.
        self.group = heads // kv_heads
        self.block_m = prefill_block_m(self._q)
        if full:
            if not max_blocks_per_seq or max_blocks_per_seq < 1:
                raise ValueError("full CUDA graphs need max_blocks_per_seq (a block table width)")
            table_shape = (self.max_num_seqs, max_blocks_per_seq)
        else:
            table_shape = (0, 0)
        self._table = torch.zeros(table_shape, dtype=torch.int64, device=device)
        self._inputs, size = self._lay_out_inputs(device)
        self._staging = StagingBuffer(device, capacity=size)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.num_steps = 0  # steps served (for tests and reports)
        if capture:
            self._capture_all()

    def _lay_out_inputs(self, device: torch.device) -> tuple[dict[int, BucketInputs], int]:
        """Each bucket's views of one flat int64 buffer (module diagram); the buffer's size."""
        layouts: dict[int, tuple[int, ...]] = {}
        for bucket in self.token_sizes:
            rows = self.rows_for(bucket)
            if self.is_full:
                contexts = max_prefill_tiles(bucket, rows, self.group, self.block_m)
                decodes = max_prefill_tiles(rows, rows, self.group, DECODE_BLOCK_M)
                attention = (bucket, rows + 1, rows, 2 * contexts, 2 * decodes)
            else:
                attention = (0, 0, 0, 0, 0)
            layouts[bucket] = (bucket, bucket, rows, *attention)
        # Room past the largest layout for the block table's rows, sent flat.
        size = max(sum(sizes) for sizes in layouts.values()) + self._table.numel()
        flat = torch.zeros(size, dtype=torch.int64, device=device)
        self._flat = flat
        inputs = {}
        for bucket, sizes in layouts.items():
            parts = torch.split(flat[: sum(sizes)], sizes)
            inputs[bucket] = BucketInputs(*parts[:6], parts[6].view(-1, 2), parts[7].view(-1, 2))
        return inputs, size

    def _clear_inputs(self, bucket: int) -> None:
        """Inputs that capturing ``bucket`` can run on: token 0 at position 0, no KV slot to
        write, no tile to attend (the buckets' views overlap, so each is cleared in turn)."""
        inputs = self._inputs[bucket]
        self._flat.zero_()
        inputs.slot_mapping.fill_(-1)
        inputs.context_tiles.fill_(-1)
        inputs.decode_tiles.fill_(-1)

    # ---- per step -------------------------------------------------------------------------------
    def rows_for(self, bucket: int) -> int:
        """Logits rows a bucket computes: one per sequence, at most one per token."""
        return min(bucket, self.max_num_seqs)

    def bucket_for(self, num_tokens: int) -> int:
        for size in self.token_sizes:
            if size >= num_tokens:
                return size
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.max_num_tokens}")

    def can_run(self, host: HostBatch) -> bool:
        if not 0 < host.num_tokens <= self.max_num_tokens:
            return False
        rows = self.rows_for(self.bucket_for(host.num_tokens))
        if self.is_full and not (host.num_seqs <= rows and host.max_blocks <= self._table.shape[1]):
            return False
        return len(host.logits_indices) <= rows

    @torch.inference_mode()
    def run(
        self,
        host: HostBatch,
        batch: ForwardBatch | None,
        kv_pool: torch.Tensor,
        pending_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [len(host.logits_indices), vocab] of the step; ``batch`` is the same step on
        the device (attention's metadata; None for full graphs, which send their own);
        ``pending_tokens`` as in ``fill_pending_tokens``. A view of a static buffer: read it
        before the next step."""
        if kv_pool is not self.kv_pool:
            raise RuntimeError("the KV pool was reallocated after the CUDA graphs were captured")
        num_tokens, num_rows = host.num_tokens, len(host.logits_indices)
        bucket = self.bucket_for(num_tokens)
        inputs = self._send(host, bucket)
        if pending_tokens is not None:
            fill_pending_tokens(inputs.input_ids[:num_tokens], pending_tokens)
        self._piece(0, bucket)  # full: the whole step
        if not self.is_full:
            for layer in range(self.model.num_layers):
                q, k, v = self._q[:num_tokens], self._k[:num_tokens], self._v[:num_tokens]
                out = self.model.attention(q, k, v, kv_pool[layer], batch, layer)
                self._out[:num_tokens].copy_(out.flatten(1))
                self._piece(layer + 1, bucket)
        self.num_steps += 1
        return self._logits[:num_rows]

    def _send(self, host: HostBatch, bucket: int) -> BucketInputs:
        """The step's inputs into the bucket's views, in one copy (and one for a full graph's
        block table)."""
        inputs = self._inputs[bucket]
        num_rows, pad = len(host.logits_indices), bucket - host.num_tokens
        # Padding: token 0 at position 0; padding logits rows read token 0. Stale values would
        # do for the tokens, but a stale row index could point past this bucket.
        values = host.input_ids + [0] * pad + host.positions + [0] * pad
        values += host.logits_indices + [0] * (inputs.logits_rows.shape[0] - num_rows)
        if not self.is_full:
            self._staging.send(values, out=self._flat)
            return inputs
        rows, starts = inputs.seq_lens.shape[0], host.query_start_loc
        num_seqs, width = host.num_seqs, host.max_blocks
        num_contexts = host.num_context_seqs
        contexts = prefill_tiles(starts[: num_contexts + 1], self.group, self.block_m)
        decodes = prefill_tiles(starts[num_contexts:], self.group, DECODE_BLOCK_M, num_contexts)
        # Padding: no slot (-1: write_kv skips the row), no tile (-1: the program returns);
        # starts and lengths past the batch's sequences are never read (no tile names them).
        values += host.slot_mapping + [-1] * pad
        values += starts + [0] * (rows - num_seqs) + host.seq_lens + [0] * (rows - num_seqs)
        values += contexts + [-1] * (inputs.context_tiles.numel() - len(contexts))
        values += decodes + [-1] * (inputs.decode_tiles.numel() - len(decodes))
        values += host.block_table
        self._staging.send(values, out=self._flat)
        table = self._flat[inputs.size : inputs.size + num_seqs * width]
        self._table[:num_seqs, :width].copy_(table.view(num_seqs, width))
        return inputs

    def _piece(self, index: int, bucket: int) -> None:
        if self._capture:
            self._graphs[(bucket, index)].replay()
        elif self.is_full:
            self._forward_full(bucket)
        else:
            self._forward_piece(index, bucket)

    # ---- the pieces ------------------------------------------------------------------------------
    def _forward_full(self, bucket: int) -> None:
        """The whole step of a bucket: the pieces with attention on the static inputs between
        them."""
        inputs, n = self._inputs[bucket], bucket
        q, k, v = self._q[:n], self._k[:n], self._v[:n]
        out = self._out[:n].view(q.shape)
        for index in range(self.num_pieces):
            if index:
                self.model.tiled_attention(
                    q, k, v, self.kv_pool[index - 1], inputs.slot_mapping,
                    inputs.query_start_loc, inputs.seq_lens, self._table,
                    ((inputs.context_tiles, self.block_m), (inputs.decode_tiles, DECODE_BLOCK_M)),
                    out, index - 1,
                )  # fmt: skip
            self._forward_piece(index, bucket)

    def _forward_piece(self, index: int, bucket: int) -> None:
        """Piece ``index`` on the first ``bucket`` rows of the static buffers: static in,
        static out, every temporary dropped at its end."""
        model, n, inputs = self.model, bucket, self._inputs[bucket]
        if index == 0:
            hidden, cos, sin = model.embed(inputs.input_ids, inputs.positions)
            self._cos[:n].copy_(cos)
            self._sin[:n].copy_(sin)
            residual = None
        else:
            hidden, residual = model.post_attention(index - 1, self._out[:n], self._residual[:n])
        if index < model.num_layers:
            q, k, v, residual = model.pre_attention(
                index, hidden, residual, self._cos[:n], self._sin[:n]
            )
            self._q[:n].copy_(q)
            self._k[:n].copy_(k)
            self._v[:n].copy_(v)
            self._residual[:n].copy_(residual)
        else:
            rows = inputs.logits_rows
            self._logits[: len(rows)].copy_(model.lm_head(model.final_norm(hidden, residual, rows)))

    def _capture_all(self) -> None:
        pool = None
        with torch.inference_mode():
            for bucket in reversed(self.token_sizes):
                self._clear_inputs(bucket)
                if self.is_full:  # one graph, under the pieces' first key
                    graph, _ = capture_graph(lambda bucket=bucket: self._forward_full(bucket), pool)
                    pool = graph.pool()
                    self._graphs[(bucket, 0)] = graph
                    continue
                for index in range(self.num_pieces):
                    graph, _ = capture_graph(
                        lambda index=index, bucket=bucket: self._forward_piece(index, bucket), pool
                    )
                    pool = graph.pool()
                    self._graphs[(bucket, index)] = graph
        torch.cuda.synchronize()
        self.is_captured = True
