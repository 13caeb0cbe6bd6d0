"""kernels/launch.py: the compiled-kernel cache of FastLauncher, on CPU with a stand-in for a
jitted function (the real launch path runs only on a GPU: tests/test_cuda_graphs.py and
bench/step_anatomy.py exercise it there)."""

from __future__ import annotations

import inspect

import pytest
import torch

import kernels.launch as launch
from kernels.launch import FastLauncher


class FakeCompiled:
    function = "cu_function"
    packed_metadata = "metadata"

    def __init__(self, key):
        self.key = key
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class FakeJit:
    """Like a JITFunction: fn[grid](*args, **kwargs) launches and returns the compiled kernel;
    a new kernel per distinct (args' specialization, kwargs), as Triton would pick."""

    def __init__(self, fn):
        self.params = [_Param(p) for p in inspect.signature(fn).parameters.values()]
        self.jit_launches = []
        self.compiled = {}

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.jit_launches.append((grid, args, kwargs))
            key = (tuple(launch._spec(a) for a in args), tuple(sorted(kwargs.items())))
            return self.compiled.setdefault(key, FakeCompiled(key))

        return call


class _Param:
    def __init__(self, p: inspect.Parameter):
        self.name = p.name
        self.has_default = p.default is not inspect.Parameter.empty
        self.default = p.default


def kernel(x, y, n, scale, BLOCK, HAS_BIAS=False):
    raise AssertionError("never called")


@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.setattr(launch, "_is_cuda", lambda args: True)
    monkeypatch.setattr(launch, "_INTERPRET", False)
    monkeypatch.setattr(launch, "_current_stream", lambda: 7)


def test_second_launch_of_a_variant_skips_the_jit(on_gpu):
    fn = FakeJit(kernel)
    launcher = FastLauncher(fn, enabled=True)
    x, y = torch.zeros(64), torch.zeros(64)
    launcher[(4,)](x, y, 32, 0.5, BLOCK=16)
    assert len(fn.jit_launches) == 1 and launcher.num_fast_launches == 0
    launcher[(8, 2)](x, y, 48, 0.25, BLOCK=16)  # n still a multiple of 16: same variant
    assert len(fn.jit_launches) == 1 and launcher.num_fast_launches == 1
    (compiled,) = fn.compiled.values()
    # The launcher's own call: grid, stream, function, metadata, no hooks, then every
    # argument in declaration order, constexprs and defaults included.
    assert compiled.launches == [
        (8, 2, 1, 7, "cu_function", "metadata", None, None, None, x, y, 48, 0.25, 16, False)
    ]


@pytest.mark.parametrize(
    "change",
    [
        lambda a: {**a, "n": 33},  # no longer a multiple of 16
        lambda a: {**a, "n": 1},  # Triton folds 1 into the kernel
        lambda a: {**a, "n": 2**40},  # int64
        lambda a: {**a, "x": torch.zeros(65)[1:]},  # 4-byte offset: not 16-byte aligned
        lambda a: {**a, "y": torch.zeros(64, dtype=torch.float64)},
        lambda a: {**a, "BLOCK": 32},
        lambda a: {**a, "HAS_BIAS": True},
        lambda a: {**a, "num_warps": 8},
    ],
)
def test_whatever_triton_specializes_on_gets_its_own_kernel(on_gpu, change):
    fn = FakeJit(kernel)
    launcher = FastLauncher(fn, enabled=True)
    base = dict(x=torch.zeros(64), y=torch.zeros(64), n=32, scale=0.5, BLOCK=16)

    def run(a):
        a = dict(a)
        launcher[(1,)](a.pop("x"), a.pop("y"), a.pop("n"), a.pop("scale"), **a)

    run(base)
    run(change(base))
    assert len(fn.jit_launches) == 2 and launcher.num_fast_launches == 0
    run(change(base))  # now cached as well
    assert len(fn.jit_launches) == 2 and launcher.num_fast_launches == 1


def test_disabled_interpreted_or_hooked_launches_take_the_jit_path(on_gpu, monkeypatch):
    x, y = torch.zeros(64), torch.zeros(64)
    fn = FakeJit(kernel)
    off = FastLauncher(fn, enabled=False)
    for _ in range(3):
        off[(1,)](x, y, 32, 0.5, BLOCK=16)
    assert len(fn.jit_launches) == 3 and off.num_fast_launches == 0

    from triton import knobs

    on = FastLauncher(fn, enabled=True)
    chain = knobs.HookChain()
    chain.add(lambda metadata: None)  # a profiler's hook
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", chain)
    for _ in range(2):
        on[(1,)](x, y, 32, 0.5, BLOCK=16)
    assert len(fn.jit_launches) == 5 and on.num_fast_launches == 0


def test_cpu_tensors_take_the_jit_path(monkeypatch):
    monkeypatch.setattr(launch, "_INTERPRET", False)
    fn = FakeJit(kernel)
    launcher = FastLauncher(fn, enabled=True)
    for _ in range(2):
        launcher[(1,)](torch.zeros(4), torch.zeros(4), 32, 0.5, BLOCK=16)
    assert len(fn.jit_launches) == 2 and launcher.num_fast_launches == 0
