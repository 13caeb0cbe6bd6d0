"""A paged forward for decoder-only HF Llama-family models (Llama, Mistral, Qwen2, Qwen3).

The weights stay in the HF model. Two sets of projections are fused, as serving engines do:
q/k/v into one ``[(H + 2 Hkv) * D, hidden]`` matrix and gate/up into one
``[2 * intermediate, hidden]`` matrix, one GEMM each instead of three and two. The HF modules'
weights become views of the fused matrices, so memory is not doubled and ``hf_model`` itself
still runs (``generate()`` for comparisons).

Attention is ours: RoPE from the model's own rotary module, K/V written into the paged pool,
attention read back through the block tables. With the torch backend everything else calls
the HF submodules (norms, activation, q/k norms), so the numerics match ``hf_model``; with the
triton backend the norms (fused with the residual add), RoPE and SiLU-and-mul run as Triton
kernels, a few launches a layer instead of ~40.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_engine import ForwardBatch
from engine.models.attention import paged_attention, write_kv

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, head_dim] (HF rotate_half form)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class PagedCausalLM:
    """Paged-KV forward over an HF ``*ForCausalLM`` of a supported architecture.

    ``forward(batch, kv_pool)`` takes the flattened varlen batch and the whole pool
    ``[num_layers, 2, num_blocks, tokens_per_block, num_kv_heads, head_dim]``, writes this
    step's K/V into it and returns logits ``[len(batch.logits_indices), vocab_size]`` in the
    model's dtype. Raises ``ValueError`` for any other architecture.
    """

    def __init__(self, hf_model: nn.Module, attention_backend: str = "auto") -> None:
        arch = type(hf_model).__name__
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(SUPPORTED_ARCHITECTURES)
            raise ValueError(f"unsupported architecture {arch!r}; supported: {supported}")
        self.hf_model = hf_model
        config = hf_model.config
        self._model = hf_model.model  # the decoder stack (embed_tokens, layers, norm, rotary_emb)
        self.lm_head: nn.Module = hf_model.lm_head  # hidden [T, hidden] -> logits
        self.attention_backend = resolve_attention_backend(attention_backend, self.device)
        self._num_heads: int = config.num_attention_heads
        self._num_kv_heads: int = config.num_key_value_heads or config.num_attention_heads
        self._head_dim: int = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self._attns = [layer.self_attn for layer in self._model.layers]
        self._qkv = [_fuse_linears(a.q_proj, a.k_proj, a.v_proj) for a in self._attns]
        self._gate_up = [
            _fuse_linears(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in self._model.layers
        ]
        self._qkv_sizes = [
            self._num_heads * self._head_dim,
            self._num_kv_heads * self._head_dim,
            self._num_kv_heads * self._head_dim,
        ]
        # The triton backend also runs norms, RoPE and SiLU-and-mul as Triton kernels.
        self._fused_elementwise = self.attention_backend == "triton"
        self._is_silu = getattr(config, "hidden_act", None) in ("silu", "swish")
        self._scales: list[float] = []
        self._windows: list[int | None] = []
        for layer in self._model.layers:
            attn = layer.self_attn
            # HF keeps the softmax scale on the attention module; use it when present so any
            # config-driven scaling carries over.
            self._scales.append(float(getattr(attn, "scaling", self._head_dim**-0.5)))
            # Qwen2/3 decide per layer (attn.sliding_window, None on full-attention layers);
            # Mistral reads config.sliding_window for every layer.
            if hasattr(attn, "sliding_window"):
                self._windows.append(attn.sliding_window)
            else:
                self._windows.append(getattr(config, "sliding_window", None))

    # ---- shape properties ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self._model.layers)

    @property
    def num_heads(self) -> int:
        return self._num_heads

    @property
    def num_kv_heads(self) -> int:
        return self._num_kv_heads

    @property
    def head_dim(self) -> int:
        return self._head_dim

    @property
    def vocab_size(self) -> int:
        return int(self.hf_model.config.vocab_size)

    @property
    def max_seq_len(self) -> int:
        return int(self.hf_model.config.max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return self._model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self._model.embed_tokens.weight.device

    # ---- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_pool: torch.Tensor) -> torch.Tensor:
        """Run one step; see the class docstring for shapes. Mutates ``kv_pool`` in place."""
        expected = (self.num_layers, 2, self.num_kv_heads, self.head_dim)
        got = (kv_pool.shape[0], kv_pool.shape[1], kv_pool.shape[4], kv_pool.shape[5])
        if kv_pool.dim() != 6 or got != expected:
            raise ValueError(
                f"kv_pool shape {tuple(kv_pool.shape)} does not match the model: expected "
                f"[{self.num_layers}, 2, num_blocks, tokens_per_block, {self.num_kv_heads}, "
                f"{self.head_dim}]"
            )
        hidden, cos, sin = self.embed(batch.input_ids, batch.positions)
        if self._fused_elementwise:
            hidden = self._layers_triton(hidden, cos, sin, batch, kv_pool)
        else:
            hidden = self._layers_torch(hidden, cos, sin, batch, kv_pool)
        return self.lm_head(hidden)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor):
        """Token embeddings [T, hidden] and RoPE's cos, sin [T, head_dim]."""
        hidden = self._model.embed_tokens(input_ids)
        # The HF rotary module applies rope scaling (e.g. llama3) and its attention_scaling.
        cos, sin = self._model.rotary_emb(hidden, positions[None, :])
        return hidden, cos[0], sin[0]

    def _layers_torch(self, hidden, cos, sin, batch: ForwardBatch, kv_pool) -> torch.Tensor:
        """The decoder stack on HF's own norms and activation (the numerics of ``hf_model``);
        returns the final-normed hidden states of the ``logits_indices`` rows."""
        for i, layer in enumerate(self._model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            residual = hidden
            q, k, v = self._qkv_heads(i, layer.input_layernorm(hidden))
            if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            out = self.attention(q, k, v, kv_pool[i], batch, i)
            hidden = residual + attn.o_proj(out.flatten(1))

            residual = hidden
            x = layer.post_attention_layernorm(hidden)
            gate, up = F.linear(x, *self._gate_up[i]).chunk(2, dim=-1)
            hidden = residual + mlp.down_proj(mlp.act_fn(gate) * up)
        # Norm and lm_head are per token: apply them only where logits are wanted.
        return self._model.norm(hidden[batch.logits_indices])

    def _layers_triton(self, hidden, cos, sin, batch: ForwardBatch, kv_pool) -> torch.Tensor:
        """The same stack with Triton elementwise kernels: each residual add is fused into the
        norm after it, so the residual stream is carried alongside::

            x = norm(h); r = h                  (first layer)
            x, r = norm(out + r), out + r       (every later add: one kernel)
        """
        residual = None
        for i in range(self.num_layers):
            q, k, v, residual = self.pre_attention(i, hidden, residual, cos, sin)
            out = self.attention(q, k, v, kv_pool[i], batch, i)
            hidden, residual = self.post_attention(i, out, residual)
        return self.final_norm(hidden, residual, batch.logits_indices)

    # The Triton stack in pieces, cut at attention: the eager forward runs them in turn, and the
    # piecewise CUDA graphs (engine/piecewise_graphs.py) capture everything between two
    # attentions. Each piece is per token, so it runs the same on a batch padded to a bucket.
    def pre_attention(self, layer: int, hidden, residual, cos, sin):
        """Layer ``layer`` up to attention: the input norm (with the previous layer's residual
        add fused in; ``residual`` None for the first layer), q/k/v, q/k norms, RoPE. Returns
        ``(q, k, v, residual)``, q/k/v as head views [T, heads, head_dim]."""
        import kernels

        attn, norm = self._attns[layer], self._model.layers[layer].input_layernorm
        if residual is None:
            residual, x = hidden, kernels.rms_norm(hidden, norm.weight, norm.variance_epsilon)
        else:
            x, residual = kernels.rms_norm(
                hidden, norm.weight, norm.variance_epsilon, residual=residual
            )
        q, k, v = self._qkv_heads(layer, x)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
            q = kernels.rms_norm(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
            k = kernels.rms_norm(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
        kernels.apply_rotary(q, k, cos, sin)  # in place
        return q, k, v, residual

    def post_attention(self, layer: int, out: torch.Tensor, residual: torch.Tensor):
        """Layer ``layer`` after attention (``out`` [T, heads, head_dim] or [T, heads *
        head_dim]): o_proj, the residual add fused into the post-attention norm, the MLP.
        Returns ``(mlp output, residual)``; the next norm adds them."""
        import kernels

        block = self._model.layers[layer]
        norm, mlp = block.post_attention_layernorm, block.mlp
        x, residual = kernels.rms_norm(
            block.self_attn.o_proj(out.flatten(1)),
            norm.weight,
            norm.variance_epsilon,
            residual=residual,
        )
        gate_up = F.linear(x, *self._gate_up[layer])
        if self._is_silu:
            return mlp.down_proj(kernels.silu_and_mul(gate_up)), residual
        gate, up = gate_up.chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up), residual

    def final_norm(self, hidden, residual, rows: torch.Tensor) -> torch.Tensor:
        """The final norm (with the last residual add) of the ``rows`` that want logits."""
        import kernels

        norm = self._model.norm
        hidden, _ = kernels.rms_norm(
            hidden[rows], norm.weight, norm.variance_epsilon, residual=residual[rows]
        )
        return hidden

    def _qkv_heads(self, layer: int, x: torch.Tensor):
        """One GEMM for q, k and v; returns head views [T, heads, head_dim] of its output."""
        num_tokens = x.shape[0]
        q, k, v = F.linear(x, *self._qkv[layer]).split(self._qkv_sizes, dim=-1)
        return (
            q.view(num_tokens, self._num_heads, self._head_dim),
            k.view(num_tokens, self._num_kv_heads, self._head_dim),
            v.view(num_tokens, self._num_kv_heads, self._head_dim),
        )

    __call__ = forward

    def profile_run(self, num_tokens: int, num_seqs: int, tokens_per_block: int) -> int:
        """Run the largest step a scheduler can send (``num_tokens`` context tokens over
        ``num_seqs`` sequences, each sampling) on a one-block dummy pool; returns the peak
        bytes it allocated beyond what was allocated before (activations, logits, workspaces).

        Run before the KV pool is sized: the memory stays in torch's cache, so the free memory
        the pool is sized from already excludes it (TensorRT-LLM sizes its pool after such a
        warm-up too). Nothing is written (slots -1); every read stays in the dummy block.
        """
        device = self.device
        num_seqs = max(1, min(num_seqs, num_tokens))
        per_seq = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        starts = [0]
        for n in per_seq:
            starts.append(starts[-1] + n)
        max_len = max(per_seq)
        num_blocks = -(-max_len // tokens_per_block)

        positions = [p for n in per_seq for p in range(n)]
        batch = ForwardBatch(
            input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device),
            positions=_int_tensor(device, positions),
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
            query_start_loc=_int_tensor(device, starts),
            seq_lens=_int_tensor(device, per_seq),
            block_tables=torch.zeros((num_seqs, num_blocks), dtype=torch.int64, device=device),
            logits_indices=_int_tensor(device, [end - 1 for end in starts[1:]]),
            max_query_len=max_len,
            max_seq_len=max_len,
            num_context_seqs=num_seqs,
            num_context_tokens=num_tokens,
        )
        pool = torch.zeros(
            (self.num_layers, 2, 1, tokens_per_block, self._num_kv_heads, self._head_dim),
            dtype=self.dtype,
            device=device,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        logits = self.forward(batch, pool)
        logits.argmax(dim=-1)  # the decoder's work on the logits
        if device.type != "cuda":
            return 0
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before

    def compile_kernels(self, kv_pool: torch.Tensor) -> None:
        """Compile every Triton variant a run can launch, on one-token dummy batches.

        A variant first met mid-run compiles inside a timed step (about a second each on an
        empty cache). A mixed step (one context token, one decode) through the whole forward
        compiles every kernel once; the decode launcher then picks a split count from the batch
        shape, so each one (1, 2, 4, 8, 16) is compiled too, per distinct sliding window.
        Nothing is written (slots -1); every read stays in block 0.
        """
        if self.attention_backend != "triton" or self.device.type != "cuda":
            return
        import kernels
        from kernels.decode_splits import MAX_SPLITS

        device = self.device

        mixed = ForwardBatch(
            input_ids=_int_tensor(device, [0, 0]),
            positions=_int_tensor(device, [0, 0]),
            slot_mapping=_int_tensor(device, [-1, -1]),
            query_start_loc=_int_tensor(device, [0, 1, 2]),
            seq_lens=_int_tensor(device, [1, 1]),
            block_tables=_int_tensor(device, [[0], [0]]),
            logits_indices=_int_tensor(device, [0, 1]),
            max_query_len=1,
            max_seq_len=1,
            num_context_seqs=1,
            num_context_tokens=1,
        )
        self.forward(mixed, kv_pool)
        q = torch.zeros((1, self._num_heads, self._head_dim), dtype=self.dtype, device=device)
        for window in set(self._windows):
            splits = 1
            while splits <= MAX_SPLITS:
                kernels.paged_decode_attention(
                    q,
                    kv_pool[0],
                    _int_tensor(device, [[0]]),
                    _int_tensor(device, [1]),
                    1.0,
                    window,
                    num_splits=splits,
                )
                splits *= 2
        torch.cuda.synchronize(device)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pool_layer: torch.Tensor,
        batch: ForwardBatch,
        layer: int,
    ) -> torch.Tensor:
        """Write this step's K/V into the pool, then attend through the block tables."""
        scale, window = self._scales[layer], self._windows[layer]
        if self.attention_backend == "torch":
            write_kv(k, v, pool_layer, batch.slot_mapping)
            return paged_attention(q, pool_layer, batch, scale, window)
        import kernels

        kernels.write_kv(k, v, pool_layer, batch.slot_mapping)
        num_ctx_seqs, num_ctx_tokens = context_split(batch)
        outputs = []
        if num_ctx_seqs:  # contexts (chunked prefill), flattened first in the batch
            outputs.append(
                kernels.paged_prefill_attention(
                    q[:num_ctx_tokens],
                    pool_layer,
                    batch.query_start_loc[: num_ctx_seqs + 1],
                    batch.seq_lens[:num_ctx_seqs],
                    batch.block_tables[:num_ctx_seqs],
                    batch.max_query_len,
                    scale,
                    window,
                )
            )
        if num_ctx_seqs < batch.num_seqs:  # generations: one token each, at seq_len - 1
            outputs.append(
                kernels.paged_decode_attention(
                    q[num_ctx_tokens:],
                    pool_layer,
                    batch.block_tables[num_ctx_seqs:],
                    batch.seq_lens[num_ctx_seqs:],
                    scale,
                    window,
                )
            )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def tiled_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pool_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        launches: Sequence[tuple[torch.Tensor, int]],
        out: torch.Tensor,
        layer: int,
    ) -> None:
        """``attention`` as a full CUDA graph runs it (``engine.piecewise_graphs``): every
        launch's grid fixed by the static buffers' shapes, the batch read from them (slots,
        ``-1`` for padding); one varlen launch for each ``(tiles, block_m)`` of ``launches``
        (the programs' tiles, ``kernels.paged_prefill.prefill_tiles``, built with that
        ``block_m``). Writes ``out`` [num_tokens, heads, dim]."""
        import kernels

        kernels.write_kv(k, v, pool_layer, slot_mapping)
        scale, window = self._scales[layer], self._windows[layer]
        for tiles, block_m in launches:
            kernels.paged_prefill_attention(
                q, pool_layer, query_start_loc, seq_lens, block_tables, None, scale, window,
                tiles=tiles, out=out, block_m=block_m,
            )  # fmt: skip


def _int_tensor(device: torch.device, values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the linears stacked along the output dim; each linear's parameters
    become views into them (no second copy). A model fused before (another engine over the same
    HF model) is recognised, while its parameters still point into the fused matrix."""
    rows = [lin.weight.shape[0] for lin in linears]
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    fused = getattr(linears[0], "_schedlab_fused", None)
    if fused is not None:
        weight, bias = fused
        if all(
            lin.weight.data_ptr() == weight[offset].data_ptr()
            for lin, offset in zip(linears, offsets, strict=True)
        ):
            return weight, bias
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot fuse projections where only some have a bias")
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    for lin, offset, n in zip(linears, offsets, rows, strict=True):
        lin.weight = nn.Parameter(weight[offset : offset + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[offset : offset + n], requires_grad=False)
    linears[0]._schedlab_fused = (weight, bias)
    return weight, bias


ATTENTION_BACKENDS = ("auto", "torch", "triton")


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """``auto``: Triton kernels on CUDA, the torch reference elsewhere. Triton on a CPU runs only
    through its interpreter (TRITON_INTERPRET=1 set before the kernels are imported)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "attention_backend='triton' on a CPU needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before starting (slow; for tests)"
        )
    return name


def context_split(batch: ForwardBatch) -> tuple[int, int]:
    """(number of context sequences, their tokens): the builder's host-side values, or derived
    from the tensors (trailing single-token sequences are generations)."""
    if batch.num_context_seqs is not None and batch.num_context_tokens is not None:
        return batch.num_context_seqs, batch.num_context_tokens
    q_lens = (batch.query_start_loc[1:] - batch.query_start_loc[:-1]).tolist()
    split = len(q_lens)
    while split > 0 and q_lens[split - 1] == 1:
        split -= 1
    return split, sum(q_lens[:split])
