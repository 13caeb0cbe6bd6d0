"""Triton kernel: scatter the step's new K/V into the paged pool (``write_kv``).

Same semantics as the torch reference ``engine.models.attention.write_kv``: token ``t``'s key
and value go to flat slot ``slot_mapping[t] = block_id * tokens_per_block + offset`` of one
layer's pool ``[2, num_blocks, tokens_per_block, num_kv_heads, head_dim]`` (0 = K, 1 = V), cast
to the pool's dtype. One program per token writes all its heads: a token's ``num_kv_heads *
head_dim`` values are contiguous in the pool row, so each program issues one wide store for K
and one for V.

Padding convention: a negative slot means "no token here" and is skipped (nothing is read or
written). CUDA-graph batches padded to a captured size use it for their dummy tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import FastLauncher


# The slot mapping is a view into the step's flat metadata buffer (its offset moves with the
# batch): no specialisation on its alignment, or a run would compile new variants.
@triton.jit(
    do_not_specialize_on_alignment=["slot_ptr"], do_not_specialize=["stride_k_t", "stride_v_t"]
)
def _kv_write_kernel(
    key_ptr,
    value_ptr,
    kv_ptr,
    slot_ptr,
    stride_k_t,
    stride_k_h,
    stride_k_d,
    stride_v_t,
    stride_v_h,
    stride_v_d,
    stride_kv_kv,
    stride_kv_b,
    stride_kv_t,
    stride_kv_h,
    stride_kv_d,
    stride_slot,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
):
    # int64 offsets: a pool can hold more than 2^31 elements.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token * stride_slot).to(tl.int64)
    # A negative slot (padding token) only masks everything off: the pointers computed from it
    # below are never dereferenced.
    block = slot // TOKENS_PER_BLOCK
    offset = slot % TOKENS_PER_BLOCK

    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    # Power-of-two tiles (tl.arange's requirement) padded with masks for odd head counts/dims.
    # (The slot test is broadcast to a tile before the `&`: Triton 3.9's interpreter turns
    # `bool tile & bool scalar` into an int32 mask, which its loads reject.)
    is_real = (offs_h[:, None] * 0 + slot) >= 0
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM) & is_real

    k = tl.load(
        key_ptr + token * stride_k_t + offs_h[:, None] * stride_k_h + offs_d[None, :] * stride_k_d,
        mask=mask,
    )
    v = tl.load(
        value_ptr
        + token * stride_v_t
        + offs_h[:, None] * stride_v_h
        + offs_d[None, :] * stride_v_d,
        mask=mask,
    )
    dst = (
        kv_ptr
        + block * stride_kv_b
        + offset * stride_kv_t
        + offs_h[:, None] * stride_kv_h
        + offs_d[None, :] * stride_kv_d
    )
    kv_dtype = kv_ptr.dtype.element_ty
    tl.store(dst, k.to(kv_dtype), mask=mask)
    tl.store(dst + stride_kv_kv, v.to(kv_dtype), mask=mask)


_kv_write_launch = FastLauncher(_kv_write_kernel)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_pool_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write each new token's K/V into its pool slot, in place (Triton).

    key, value: [num_tokens, num_kv_heads, head_dim], any strides, any float dtype (cast to
        the pool's dtype on store).
    kv_pool_layer: [2, num_blocks, tokens_per_block, num_kv_heads, head_dim], any strides (e.g.
        ``kv_pool[layer]`` or a permuted view); written in place.
    slot_mapping: [num_tokens] int32/int64 flat slots ``block_id * tokens_per_block + offset``;
        a negative slot skips its token (padding).
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    if kv_pool_layer.dim() != 5 or kv_pool_layer.shape[0] != 2:
        raise ValueError(
            f"kv_pool_layer must be [2, blocks, tpb, heads, dim], got {kv_pool_layer.shape}"
        )
    if tuple(kv_pool_layer.shape[3:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"pool heads/dim {tuple(kv_pool_layer.shape[3:])} != key's {(num_kv_heads, head_dim)}"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} != ({num_tokens},)")
    if num_tokens == 0:
        return
    tokens_per_block = kv_pool_layer.shape[2]
    _kv_write_launch[(num_tokens,)](
        key,
        value,
        kv_pool_layer,
        slot_mapping,
        *key.stride(),
        *value.stride(),
        *kv_pool_layer.stride(),
        slot_mapping.stride(0),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        TOKENS_PER_BLOCK=tokens_per_block,
    )
