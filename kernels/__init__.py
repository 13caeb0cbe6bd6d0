"""Triton kernels for the paged-KV executor (compiled on CUDA; TRITON_INTERPRET=1 runs them on CPU).

Each module holds a kernel and its launcher; the launchers mirror the torch reference in
``engine.models.attention``.
"""

from kernels.activation import _silu_and_mul_kernel, _silu_and_mul_launch, silu_and_mul
from kernels.decode_inputs import _decode_inputs_kernel, _decode_inputs_launch, decode_inputs
from kernels.kv_write import _kv_write_kernel, _kv_write_launch, write_kv
from kernels.paged_decode import (
    _merge_splits_kernel,
    _merge_splits_launch,
    _paged_decode_kernel,
    _paged_decode_launch,
    paged_decode_attention,
)
from kernels.paged_prefill import (
    _paged_prefill_kernel,
    _paged_prefill_launch,
    paged_prefill_attention,
)
from kernels.rms_norm import _rms_norm_kernel, _rms_norm_launch, rms_norm
from kernels.rotary import _rotary_kernel, _rotary_launch, apply_rotary

# The jitted kernels, for tools that inspect compiled variants (bench/peers.py).
JIT_FUNCTIONS = (
    _decode_inputs_kernel,
    _kv_write_kernel,
    _paged_decode_kernel,
    _merge_splits_kernel,
    _paged_prefill_kernel,
    _rms_norm_kernel,
    _rotary_kernel,
    _silu_and_mul_kernel,
)


# Their launchers (kernels/launch.py), in the same order.
LAUNCHERS = (
    _decode_inputs_launch,
    _kv_write_launch,
    _paged_decode_launch,
    _merge_splits_launch,
    _paged_prefill_launch,
    _rms_norm_launch,
    _rotary_launch,
    _silu_and_mul_launch,
)


def use_fast_launch(enabled: bool) -> None:
    """Turn the compiled-kernel fast path of every launcher on or off (default: the
    ``SCHEDLAB_FAST_LAUNCH`` environment variable), for benchmarks and GPU tests."""
    for launcher in LAUNCHERS:
        launcher.enabled = enabled


def num_fast_launches() -> int:
    return sum(launcher.num_fast_launches for launcher in LAUNCHERS)


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
    "LAUNCHERS",
    "apply_rotary",
    "compiled_variants",
    "decode_inputs",
    "num_fast_launches",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "silu_and_mul",
    "use_fast_launch",
    "write_kv",
]
