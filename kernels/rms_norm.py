"""Triton kernel: RMSNorm, optionally fused with the residual add before it (``rms_norm``).

Same numerics as HF ``LlamaRMSNorm.forward`` (and Qwen3's, which is identical)::

    h = x.to(float32)
    h = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)

i.e. normalise in fp32, round to the input dtype, then multiply by the weight; the product's
dtype is torch's promotion of ``weight.dtype`` and ``x.dtype`` (an fp32 weight on bf16
activations gives an fp32 output). With a residual, the decoder layer's ``residual + x`` is
rounded to ``x.dtype`` first and that rounded sum is what gets normalised, as in the HF model.

Layout of the work::

    grid = (cdiv(num_rows, BLOCK_ROWS),)
    program p: rows p*BLOCK_ROWS .. p*BLOCK_ROWS + BLOCK_ROWS - 1, each a whole [HIDDEN] row

A row is reduced in one tile (BLOCK = next_power_of_2(hidden)), so x is read once. Short rows
(per-head q/k norms, head_dim 128) are batched BLOCK_ROWS to a program so that each program
still moves a few KB.

A 3-d input [num_tokens, num_heads, head_dim] is normalised per (token, head) row through its
two leading strides, so a head view of a fused qkv projection needs no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import FastLauncher

# One tile holds a whole row in registers; past this, a row would spill (a two-pass kernel
# would be needed).
_MAX_HIDDEN = 65536
# Target elements per program: rows of short hidden sizes are batched up to this.
_TILE_ELEMENTS = 2048
_MAX_BLOCK_ROWS = 16


# The row count changes from step to step; specialising on it (== 1, divisibility by 16) would
# compile new variants in the middle of a run.
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    sum_ptr,
    num_rows,
    num_inner,
    eps,
    stride_x_o,
    stride_x_i,
    stride_x_d,
    stride_r_o,
    stride_r_i,
    stride_r_d,
    stride_w,
    stride_out_row,
    stride_out_d,
    stride_sum_row,
    stride_sum_d,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    MUL_DTYPE: tl.constexpr,
    PRECISE_RSQRT: tl.constexpr,
):
    # int64 row indices: num_rows * hidden can exceed 2^31 elements.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    # Row r is (outer, inner) = (r // num_inner, r % num_inner): num_inner is 1 for a 2-d input
    # and num_heads for a [tokens, heads, head_dim] one.
    outer = rows // num_inner
    inner = rows % num_inner
    offs_d = tl.arange(0, BLOCK)
    mask_d = offs_d < HIDDEN
    mask = (rows[:, None] < num_rows) & mask_d[None, :]

    x = tl.load(
        x_ptr + (outer * stride_x_o + inner * stride_x_i)[:, None] + offs_d[None, :] * stride_x_d,
        mask=mask,
        other=0.0,
    )
    x_dtype = x_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        r = tl.load(
            residual_ptr
            + (outer * stride_r_o + inner * stride_r_i)[:, None]
            + offs_d[None, :] * stride_r_d,
            mask=mask,
            other=0.0,
        )
        # The sum is rounded to x's dtype before the norm sees it: that rounded tensor is the
        # next layer's residual in the HF model, and the norm's input.
        x = (x.to(COMPUTE_DTYPE) + r.to(COMPUTE_DTYPE)).to(x_dtype)
        tl.store(
            sum_ptr + rows[:, None] * stride_sum_row + offs_d[None, :] * stride_sum_d,
            x,
            mask=mask,
        )

    xf = x.to(COMPUTE_DTYPE)
    # Padding columns and rows are loaded as 0: they add nothing to the sum of squares.
    variance = tl.sum(xf * xf, axis=1) / HIDDEN
    # tl.rsqrt lowers to the GPU's approximate instruction; float64 inputs (there for tight
    # tests) take the IEEE square root and division instead.
    inv_rms = 1.0 / tl.sqrt(variance + eps) if PRECISE_RSQRT else tl.rsqrt(variance + eps)
    normed = (xf * inv_rms[:, None]).to(x_dtype)
    w = tl.load(weight_ptr + offs_d * stride_w, mask=mask_d, other=0.0)
    # HF rounds the normalised row to x's dtype, then multiplies in the promoted dtype. The
    # product of two 16-bit floats is exact in fp32, so one rounding of it matches torch's.
    out = w.to(MUL_DTYPE)[None, :] * normed.to(MUL_DTYPE)
    tl.store(
        out_ptr + rows[:, None] * stride_out_row + offs_d[None, :] * stride_out_d,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _triton_float(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


_rms_norm_launch = FastLauncher(_rms_norm_kernel)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF-style RMSNorm of each row of ``x``, optionally after adding ``residual`` (Triton).

    x: [num_rows, hidden] or [num_tokens, num_heads, head_dim] (per-head norm, e.g. Qwen3's
        q/k norm on a head view of the projection), any strides, float dtype.
    weight: [hidden], any float dtype.
    eps: added to the mean square before the reciprocal square root.
    residual: optional, same shape and dtype as ``x``, any strides.

    Without ``residual`` returns ``weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)``,
    contiguous, of ``x``'s shape, in ``torch.promote_types(weight.dtype, x.dtype)``. With it,
    returns ``(rms_norm(s), s)`` where ``s = x + residual`` rounded to ``x.dtype`` (contiguous):
    the fused add-then-norm of a decoder layer, ``s`` being the next residual.

    Statistics are computed in float32 (float64 for float64 inputs, where HF would still use
    float32: the wider type lets CPU tests check the kernel to ~1e-12).
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [rows, hidden] or [tokens, heads, dim], got {tuple(x.shape)}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must be floating point")
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} != ({hidden},)")
    if not 1 <= hidden <= _MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} outside [1, {_MAX_HIDDEN}]")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} != x {tuple(x.shape)} {x.dtype}"
            )
        if residual.device != x.device:
            raise ValueError(f"residual on {residual.device}, x on {x.device}")
    if weight.device != x.device:
        raise ValueError(f"weight on {weight.device}, x on {x.device}")

    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    num_rows = out.numel() // hidden
    if num_rows == 0:
        return out if total is None else (out, total)

    # A 2-d input is [num_rows, 1, hidden] to the kernel: one "head" per row, whose index
    # (always 0) never touches the dummy stride.
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    r3 = x3 if residual is None else (residual if residual.dim() == 3 else residual.unsqueeze(1))
    out2 = out.view(num_rows, hidden)
    sum2 = out2 if total is None else total.view(num_rows, hidden)  # unused without residual

    block = triton.next_power_of_2(hidden)
    # Independent of num_rows (a short batch only masks rows off), so the batch size never
    # selects a new compiled variant.
    block_rows = max(1, min(_MAX_BLOCK_ROWS, _TILE_ELEMENTS // block))
    # About 16 row elements per thread for a model's hidden size (64 at the largest rows).
    num_warps = max(4, min(32, block // 512)) if block_rows == 1 else 4
    _rms_norm_launch[(triton.cdiv(num_rows, block_rows),)](
        x3,
        r3,
        weight,
        out2,
        sum2,
        num_rows,
        x3.shape[1],
        float(eps),
        x3.stride(0),
        x3.stride(1),
        x3.stride(2),
        r3.stride(0),
        r3.stride(1),
        r3.stride(2),
        weight.stride(0),
        *out2.stride(),
        *sum2.stride(),
        HIDDEN=hidden,
        BLOCK=block,
        BLOCK_ROWS=block_rows,
        HAS_RESIDUAL=residual is not None,
        COMPUTE_DTYPE=_triton_float(x.dtype),
        MUL_DTYPE=_triton_float(out_dtype),
        PRECISE_RSQRT=x.dtype == torch.float64,
        num_warps=num_warps,
    )
    return out if total is None else (out, total)
