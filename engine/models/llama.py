"""A paged forward for decoder-only HF Llama-family models (Llama, Mistral, Qwen2, Qwen3).

The weights stay in the HF modules (shared, not copied); only attention is ours: RoPE from the
model's own rotary module, K/V written into the paged pool, attention read back through the
block tables. Everything else (norms, MLP, projections with their biases, q/k norms) calls the
HF submodules, so the numerics match ``hf_model(input_ids)``.
"""

from __future__ import annotations

import os

import torch
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
        self._lm_head: nn.Module = hf_model.lm_head
        self.attention_backend = resolve_attention_backend(attention_backend, self.device)
        self._num_heads: int = config.num_attention_heads
        self._num_kv_heads: int = config.num_key_value_heads or config.num_attention_heads
        self._head_dim: int = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
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
        num_tokens = batch.num_tokens
        hidden = self._model.embed_tokens(batch.input_ids)  # [T, hidden]
        # The HF rotary module applies rope scaling (e.g. llama3) and its attention_scaling.
        cos, sin = self._model.rotary_emb(hidden, batch.positions[None, :])
        cos, sin = cos[0], sin[0]  # [T, head_dim]

        for i, layer in enumerate(self._model.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(num_tokens, self._num_heads, self._head_dim)
            k = attn.k_proj(x).view(num_tokens, self._num_kv_heads, self._head_dim)
            v = attn.v_proj(x).view(num_tokens, self._num_kv_heads, self._head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
                q = attn.q_norm(q)
                k = attn.k_norm(k)
            q = _apply_rope(q, cos, sin)
            k = _apply_rope(k, cos, sin)
            out = self._attention(q, k, v, kv_pool[i], batch, i)
            hidden = residual + attn.o_proj(out.reshape(num_tokens, -1))

            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))

        # Norm and lm_head are per token: apply them only where logits are wanted.
        hidden = self._model.norm(hidden[batch.logits_indices])
        return self._lm_head(hidden)

    __call__ = forward

    def _attention(
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
