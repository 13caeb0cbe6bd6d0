"""Triton kernel: rotary position embedding of q and k in place (``apply_rotary``).

HF's rotate_half convention (Llama, Qwen, Mistral)::

    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
    x <- x * cos + rotate_half(x) * sin

with ``cos``/``sin`` already gathered at each token's position (the HF rotary module's output,
rope scaling and attention scaling included). The torch expression rounds three times in the
model dtype (each product, then the sum); the kernel computes in fp32 and rounds once, so it
is within one rounding of it in bf16/fp16 and agrees to ~1e-7 relative in fp32.

Layout of the work::

    grid = (num_tokens, cdiv(num_heads, BLOCK_H) + cdiv(num_kv_heads, BLOCK_H))
    program (t, j): token t, BLOCK_H heads of q (j < q blocks) or of k (the rest)

One launch rotates both tensors. Each program loads the token's cos/sin row once and applies
it to BLOCK_H heads, as [BLOCK_H, head_dim / 2] tiles of the two halves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import FastLauncher

# Elements per half-tile [BLOCK_H, HALF_PAD]: a few KB of q per program.
_TILE_ELEMENTS = 1024


@triton.jit
def _rotate_heads(
    x_ptr,
    token,
    head0,
    stride_t,
    stride_h,
    stride_d,
    cos_lo,
    cos_hi,
    sin_lo,
    sin_hi,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    heads = head0 + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, HALF_PAD)
    mask = (heads[:, None] < NUM_HEADS) & (offs[None, :] < HALF)
    lo_ptrs = x_ptr + token * stride_t + heads[:, None] * stride_h + offs[None, :] * stride_d
    hi_ptrs = lo_ptrs + HALF * stride_d
    x_lo = tl.load(lo_ptrs, mask=mask, other=0.0)
    x_hi = tl.load(hi_ptrs, mask=mask, other=0.0)
    # Both halves are loaded before either is stored: each output half needs the other input.
    lo = x_lo.to(COMPUTE_DTYPE)
    hi = x_hi.to(COMPUTE_DTYPE)
    out_lo = lo * cos_lo[None, :] - hi * sin_lo[None, :]
    out_hi = hi * cos_hi[None, :] + lo * sin_hi[None, :]
    tl.store(lo_ptrs, out_lo.to(x_lo.dtype), mask=mask)
    tl.store(hi_ptrs, out_hi.to(x_hi.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_q_t,
    stride_q_h,
    stride_q_d,
    stride_k_t,
    stride_k_h,
    stride_k_d,
    stride_cos_t,
    stride_cos_d,
    stride_sin_t,
    stride_sin_d,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    Q_BLOCKS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    # int64 token index: token * stride can exceed 2^31 elements in a long prefill.
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)

    # cos and sin are read in full, not as one half repeated: HF builds them as cat(f, f), but
    # nothing here relies on it.
    offs = tl.arange(0, HALF_PAD)
    mask = offs < HALF
    cos_row = cos_ptr + token * stride_cos_t
    sin_row = sin_ptr + token * stride_sin_t
    cos_lo = tl.load(cos_row + offs * stride_cos_d, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    cos_hi = tl.load(cos_row + (offs + HALF) * stride_cos_d, mask=mask, other=0.0)
    sin_lo = tl.load(sin_row + offs * stride_sin_d, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    sin_hi = tl.load(sin_row + (offs + HALF) * stride_sin_d, mask=mask, other=0.0)
    cos_hi = cos_hi.to(COMPUTE_DTYPE)
    sin_hi = sin_hi.to(COMPUTE_DTYPE)

    # Two calls rather than one with selected pointers and strides: a stride of 1 is a
    # constexpr after Triton's specialisation, and the two branches could not merge it with a
    # runtime stride of the other tensor.
    if block < Q_BLOCKS:
        _rotate_heads(
            q_ptr,
            token,
            block * BLOCK_H,
            stride_q_t,
            stride_q_h,
            stride_q_d,
            cos_lo,
            cos_hi,
            sin_lo,
            sin_hi,
            NUM_Q_HEADS,
            HALF,
            HALF_PAD,
            BLOCK_H,
            COMPUTE_DTYPE,
        )
    else:
        _rotate_heads(
            k_ptr,
            token,
            (block - Q_BLOCKS) * BLOCK_H,
            stride_k_t,
            stride_k_h,
            stride_k_d,
            cos_lo,
            cos_hi,
            sin_lo,
            sin_hi,
            NUM_K_HEADS,
            HALF,
            HALF_PAD,
            BLOCK_H,
            COMPUTE_DTYPE,
        )


_rotary_launch = FastLauncher(_rotary_kernel)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q and k in place with HF's rotate_half RoPE, in one launch (Triton).

    q: [num_tokens, num_heads, head_dim], any strides (e.g. a head view of a slice of a fused
        qkv projection), float dtype; overwritten with ``q * cos + rotate_half(q) * sin``.
    k: [num_tokens, num_kv_heads, head_dim], any strides, same dtype as q; rotated likewise.
        q and k must not overlap in memory (as the q and k slices of a qkv output do not).
    cos, sin: [num_tokens, head_dim], any strides, float32 or any float dtype (HF's rotary
        module returns them in the model dtype), already taken at each token's position.

    Computed in float32 (float64 for float64 q) and stored in q's dtype, even where torch's
    expression would promote to cos's wider dtype. head_dim must be even.
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [tokens, heads, dim]")
    num_tokens, num_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if cos.shape != (num_tokens, head_dim) or sin.shape != (num_tokens, head_dim):
        raise ValueError(
            f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} != ({num_tokens}, {head_dim})"
        )
    if k.dtype != q.dtype or not q.is_floating_point():
        raise ValueError(f"q ({q.dtype}) and k ({k.dtype}) must share a float dtype")
    if not cos.is_floating_point() or not sin.is_floating_point():
        raise ValueError(f"cos ({cos.dtype}) and sin ({sin.dtype}) must be floating point")
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError(
            f"q, k, cos, sin on different devices: {q.device}, {k.device}, {cos.device},"
            f" {sin.device}"
        )
    num_kv_heads = k.shape[1]
    if num_tokens == 0 or num_heads + num_kv_heads == 0:
        return

    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    block_h = max(
        1, min(triton.next_power_of_2(max(num_heads, num_kv_heads)), _TILE_ELEMENTS // half_pad)
    )
    q_blocks = triton.cdiv(num_heads, block_h)
    grid = (num_tokens, q_blocks + triton.cdiv(num_kv_heads, block_h))
    _rotary_launch[grid](
        q,
        k,
        cos,
        sin,
        *q.stride(),
        *k.stride(),
        *cos.stride(),
        *sin.stride(),
        NUM_Q_HEADS=num_heads,
        NUM_K_HEADS=num_kv_heads,
        HALF=half,
        HALF_PAD=half_pad,
        BLOCK_H=block_h,
        Q_BLOCKS=q_blocks,
        COMPUTE_DTYPE=tl.float64 if q.dtype == torch.float64 else tl.float32,
    )
