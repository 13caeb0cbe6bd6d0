"""Triton kernels for the paged-KV executor (compiled on CUDA; TRITON_INTERPRET=1 runs them on CPU).

Each module holds a kernel and its launcher; the launchers mirror the torch reference in
``engine.models.attention``.
"""

from kernels.activation import _silu_and_mul_kernel, silu_and_mul
from kernels.kv_write import _kv_write_kernel, write_kv
from kernels.paged_decode import _merge_splits_kernel, _paged_decode_kernel, paged_decode_attention
from kernels.paged_prefill import _paged_prefill_kernel, paged_prefill_attention
from kernels.rms_norm import _rms_norm_kernel, rms_norm
from kernels.rotary import _rotary_kernel, apply_rotary

# The jitted kernels, for tools that inspect compiled variants (bench/peers.py).
JIT_FUNCTIONS = (
    _kv_write_kernel,
    _paged_decode_kernel,
    _merge_splits_kernel,
    _paged_prefill_kernel,
    _rms_norm_kernel,
    _rotary_kernel,
    _silu_and_mul_kernel,
)


def compiled_variants() -> dict[str, int]:
    """Compiled variants of each kernel above, over all devices (none under the interpreter).

    A run should compile nothing after start-up (``PagedCausalLM.compile_kernels``): a compile
    inside a timed step costs about a second."""
    counts = {}
    for fn in JIT_FUNCTIONS:
        total = 0
        for cache in getattr(fn, "device_caches", {}).values():
            # triton 3.x: device -> (kernel cache, ...); the first entry maps keys to kernels.
            total += len(cache[0] if isinstance(cache, tuple) else cache)
        counts[fn.__name__] = total
    return counts


__all__ = [
    "JIT_FUNCTIONS",
    "apply_rotary",
    "compiled_variants",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "silu_and_mul",
    "write_kv",
]
