"""Triton kernel: SwiGLU activation of a fused gate/up projection (``silu_and_mul``).

Computes ``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension, the
output of a fused gate_up projection (Llama, Qwen, Mistral MLPs). HF's ``act_fn(gate_proj(x))
* up_proj(x)`` rounds twice in the model dtype (the silu, then the product); the kernel
computes in fp32 and rounds once, so it is within one rounding of it in bf16/fp16. silu is
written as torch writes it, ``g / (1 + exp(-g))``, so fp32 results agree to an ulp or so.

Layout of the work::

    grid = (num_tokens, cdiv(intermediate, BLOCK))
    program (t, j): columns j*BLOCK .. j*BLOCK + BLOCK - 1 of token t's output
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import FastLauncher

# Output columns per program: 1024 elements of gate and of up (4 KB in bf16) per program;
# llama-8b's intermediate size 14336 is 14 programs per token.
_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_in_t,
    stride_in_d,
    stride_out_t,
    stride_out_d,
    INTERMEDIATE: tl.constexpr,
    BLOCK: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    # int64 token index: token * stride can exceed 2^31 elements in a long prefill.
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTERMEDIATE
    gate_ptrs = gate_up_ptr + token * stride_in_t + offs * stride_in_d
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    up = tl.load(gate_ptrs + INTERMEDIATE * stride_in_d, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    # exp(-g) overflows to inf for g < -88 (fp32): g / inf = -0, silu's limit; no NaN.
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(
        out_ptr + token * stride_out_t + offs * stride_out_d,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


_silu_and_mul_launch = FastLauncher(_silu_and_mul_kernel)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up projection output (Triton).

    gate_up: [num_tokens, 2 * intermediate], any strides, float dtype; columns
        ``0 .. intermediate - 1`` are the gate, the rest the up projection.

    Returns a new contiguous [num_tokens, intermediate] tensor in ``gate_up``'s dtype, computed
    in float32 (float64 for float64 inputs) and rounded once.
    """
    if gate_up.dim() != 2:
        raise ValueError(f"gate_up must be [tokens, 2 * intermediate], got {tuple(gate_up.shape)}")
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up's last dimension must be even, got {gate_up.shape[1]}")
    if not gate_up.is_floating_point():
        raise ValueError(f"gate_up must be floating point, got {gate_up.dtype}")
    num_tokens, width = gate_up.shape
    intermediate = width // 2
    out = torch.empty((num_tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0 or intermediate == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(intermediate))
    _silu_and_mul_launch[(num_tokens, triton.cdiv(intermediate, block))](
        gate_up,
        out,
        *gate_up.stride(),
        *out.stride(),
        INTERMEDIATE=intermediate,
        BLOCK=block,
        COMPUTE_DTYPE=tl.float64 if gate_up.dtype == torch.float64 else tl.float32,
    )
    return out
