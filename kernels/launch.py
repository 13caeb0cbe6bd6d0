"""Launching a compiled Triton kernel without ``JITFunction.run``'s per-call work.

``kernel[grid](*args, **constexprs)`` binds and specializes every argument, builds a cache-key
string and looks the compiled kernel up on every call: 66–72 µs of Python a launch on the H100
host (``bench/step_anatomy.py``), about half of an eager layer's host time. ``FastLauncher`` keeps
each compiled kernel after its first launch under a key of what Triton specializes on, computed
cheaply, and then calls the kernel's launcher directly: the same
``kernel.run(grid, stream, function, metadata, ..., *args)`` call that ``JITFunction.run`` ends
with (triton 3.6 to 3.9).

Why the key is safe: Triton picks a compiled variant by each argument's type and, unless told not
to, by whether an int is 1 or a multiple of 16 and whether a tensor's address is 16-byte aligned,
plus the constexpr values and options. Our key holds all of these for every argument, whatever
``do_not_specialize`` says: it never maps two calls that Triton would compile differently to one
kernel; at worst it has more entries than Triton's cache, each found by one ordinary launch.

On by default since the H100 run of 2026-11-28 (``tests/test_cuda_graphs.py``: the same tokens
with it on and off); ``SCHEDLAB_FAST_LAUNCH=0`` turns it off. Under Triton's interpreter, with
launch hooks set (profilers), or on CPU tensors it always takes the ordinary path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from triton import knobs
from triton.runtime.driver import driver

FAST_LAUNCH = os.environ.get("SCHEDLAB_FAST_LAUNCH", "1") == "1"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _spec(value: Any) -> Any:
    """What Triton can specialize a runtime argument on (a refinement of its own key)."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):  # before int: bool is an int
        return ("u1", value)
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            width = "i32"
        elif value >= 2**63:
            width = "u64"
        else:
            width = "i64"
        return (width, value == 1, value % 16 == 0)
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return None
    return (type(value), value)  # anything else: the value itself, as a constexpr would be


class FastLauncher:
    """``launcher[grid](*args, num_warps=..., num_stages=..., **constexprs)``, like the jitted
    function it wraps. Runtime arguments are positional; constexprs and options are keywords."""

    def __init__(self, fn: Any, enabled: bool | None = None):
        self.fn = fn
        self.enabled = FAST_LAUNCH if enabled is None else enabled
        params = getattr(fn, "params", None)
        # Every parameter in declaration order with its default (a constexpr left out).
        self._names: Sequence[str] = tuple(p.name for p in params) if params else ()
        self._defaults = {p.name: p.default for p in params if p.has_default} if params else {}
        self._kernels: dict[tuple, Any] = {}
        self.num_fast_launches = 0  # for tests and reports

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict[str, Any]) -> None:
        if not self.enabled or _INTERPRET or not self._names or not _is_cuda(args):
            self.fn[grid](*args, **kwargs)
            return
        runtime = knobs.runtime
        if _is_hooked(runtime.launch_enter_hook) or _is_hooked(runtime.launch_exit_hook):
            self.fn[grid](*args, **kwargs)  # hooks want JITFunction.run's launch metadata
            return
        # A call site passes its keywords in one order; another order only costs an entry.
        key = (tuple(kwargs.items()), *map(_spec, args))
        kernel = self._kernels.get(key)
        if kernel is None:  # the ordinary path: compiles if needed, returns the kernel
            self._kernels[key] = self.fn[grid](*args, **kwargs)
            return
        bound = list(args)
        for name in self._names[len(args) :]:
            bound.append(kwargs[name] if name in kwargs else self._defaults[name])
        stream = _current_stream()  # each call: under graph capture it is the capture stream
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        kernel.run(
            grid[0], grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
            None, None, None, *bound,
        )  # fmt: skip
        self.num_fast_launches += 1


def _is_hooked(hook: Any) -> bool:
    """A launch hook that does something: triton 3.6+ always sets an (empty) ``HookChain``,
    which ``JITFunction.run`` passes on and the launcher calls; passing None instead skips the
    call and the launch metadata built for it."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _current_stream() -> int:
    return driver.active.get_current_stream(driver.active.get_current_device())


def _is_cuda(args: tuple) -> bool:
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.is_cuda
    return False
