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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.cuda_graphs import capture_graph, check_capture_device
from engine.model_engine import ForwardBatch, HostBatch, StagingBuffer, fill_pending_tokens


def default_piecewise_token_sizes(max_num_tokens: int) -> list[int]:
    """Powers of two from 16, then ``max_num_tokens`` itself: 2x padding at most."""
    sizes, size = [], 16
    while size < max_num_tokens:
        sizes.append(size)
        size *= 2
    return [*sizes, max_num_tokens]


class PiecewiseGraphRunner:
    """Piecewise CUDA graphs of ``model`` (a ``PagedCausalLM`` on the Triton backend) for steps
    of up to ``max(token_sizes)`` tokens and ``max_num_seqs`` sequences."""

    def __init__(
        self,
        model,
        kv_pool: torch.Tensor,
        token_sizes: Sequence[int],
        max_num_seqs: int,
        *,
        capture: bool = True,
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
        self._capture = capture

        n, dtype = self.max_num_tokens, model.dtype
        heads, kv_heads, dim = model.num_heads, model.num_kv_heads, model.head_dim
        hidden = model.hf_model.config.hidden_size
        # ids | positions | logits rows, one int64 row each (rows: the first rows_for(B) used)
        self._vectors = torch.zeros((3, n), dtype=torch.int64, device=device)
        self._q = torch.zeros((n, heads, dim), dtype=dtype, device=device)
        self._k = torch.zeros((n, kv_heads, dim), dtype=dtype, device=device)
        self._v = torch.zeros((n, kv_heads, dim), dtype=dtype, device=device)
        self._out = torch.zeros((n, heads * dim), dtype=dtype, device=device)
        self._residual = torch.zeros((n, hidden), dtype=dtype, device=device)
        self._cos = torch.zeros((n, dim), dtype=dtype, device=device)
        self._sin = torch.zeros((n, dim), dtype=dtype, device=device)
        self._logits = torch.zeros((self.rows_for(n), model.vocab_size), dtype=dtype, device=device)
        self._staging = StagingBuffer(device, capacity=3 * n)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.num_steps = 0  # steps served (for tests and reports)
        if capture:
            self._capture_all()

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
        return len(host.logits_indices) <= self.rows_for(self.bucket_for(host.num_tokens))

    @torch.inference_mode()
    def run(
        self,
        host: HostBatch,
        batch: ForwardBatch,
        kv_pool: torch.Tensor,
        pending_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [len(host.logits_indices), vocab] of the step; ``batch`` is the same step on
        the device (attention's metadata); ``pending_tokens`` as in ``fill_pending_tokens``. A
        view of a static buffer: read it before the next step."""
        if kv_pool is not self.kv_pool:
            raise RuntimeError("the KV pool was reallocated after the CUDA graphs were captured")
        num_tokens, num_rows = host.num_tokens, len(host.logits_indices)
        bucket = self.bucket_for(num_tokens)
        pad = bucket - num_tokens
        # Padding: token 0 at position 0; padding logits rows read token 0. Stale values would
        # do for the tokens, but a stale row index could point past this bucket.
        values = host.input_ids + [0] * pad + host.positions + [0] * pad
        values += host.logits_indices + [0] * (bucket - num_rows)
        staged = self._staging.send(values)
        self._vectors[:, :bucket].copy_(staged.view(3, bucket))
        if pending_tokens is not None:
            fill_pending_tokens(self._vectors[0, :num_tokens], pending_tokens)
        self._piece(0, bucket)
        for layer in range(self.model.num_layers):
            q, k, v = self._q[:num_tokens], self._k[:num_tokens], self._v[:num_tokens]
            out = self.model.attention(q, k, v, kv_pool[layer], batch, layer)
            self._out[:num_tokens].copy_(out.flatten(1))
            self._piece(layer + 1, bucket)
        self.num_steps += 1
        return self._logits[:num_rows]

    def _piece(self, index: int, bucket: int) -> None:
        if self._capture:
            self._graphs[(bucket, index)].replay()
        else:
            self._forward_piece(index, bucket)

    # ---- the pieces ------------------------------------------------------------------------------
    def _forward_piece(self, index: int, bucket: int) -> None:
        """Piece ``index`` on the first ``bucket`` rows of the static buffers: static in,
        static out, every temporary dropped at its end."""
        model, n = self.model, bucket
        if index == 0:
            hidden, cos, sin = model.embed(self._vectors[0, :n], self._vectors[1, :n])
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
            rows = self._vectors[2, : self.rows_for(n)]
            self._logits[: len(rows)].copy_(model.lm_head(model.final_norm(hidden, residual, rows)))

    def _capture_all(self) -> None:
        pool = None
        with torch.inference_mode():
            for bucket in reversed(self.token_sizes):
                for index in range(self.num_pieces):
                    graph, _ = capture_graph(
                        lambda index=index, bucket=bucket: self._forward_piece(index, bucket), pool
                    )
                    pool = graph.pool()
                    self._graphs[(bucket, index)] = graph
        torch.cuda.synchronize()
        self.is_captured = True
