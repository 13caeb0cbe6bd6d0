"""Triton kernels for the paged-KV executor (compiled on CUDA; TRITON_INTERPRET=1 runs them on CPU).

Each module holds a kernel and its launcher; the launchers mirror the torch reference in
``engine.models.attention``.
"""

from kernels.kv_write import write_kv
from kernels.paged_decode import paged_decode_attention
from kernels.paged_prefill import paged_prefill_attention

__all__ = ["paged_decode_attention", "paged_prefill_attention", "write_kv"]
