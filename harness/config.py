"""Config schemas, resolvers and the checks that run before any work.

Groups without a ``_target_`` (``executor``, ``model``, ``slo``) are structured configs: Hydra
rejects an unknown key or a value outside an enum while composing, naming both. Groups with a
``_target_`` (the three policy groups) may name any class, so their keys are checked against the
class's constructor instead (``check_component``), and their values by the constructor itself;
all three are built before the model is loaded.

``${by_device:DEVICE,CPU_VALUE,CUDA_VALUE}`` picks a value by the device a run will use
(``auto`` = cuda when a GPU is visible), so one experiment file sizes itself for a laptop CPU or
an H100 / H200.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from policies.registry import import_object


class DType(enum.Enum):
    auto = "auto"
    float64 = "float64"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class EngineKind(enum.Enum):
    torch = "torch"  # the real model (cpu or cuda)
    sim = "sim"  # predicted step times from a profile of the real engine (any CPU)


class AttentionBackend(enum.Enum):
    auto = "auto"  # Triton kernels on CUDA, the torch reference on CPU
    torch = "torch"
    triton = "triton"


@dataclass
class ExecutorConfig:
    # auto | cpu | cuda | cuda:N; with engine=sim, the device simulated (default cuda: sizes the
    # experiment for a GPU; nothing runs on it)
    device: str = "auto"
    dtype: DType = DType.auto
    engine: EngineKind = EngineKind.torch
    attention_backend: AttentionBackend = AttentionBackend.auto
    warmup: bool = True  # a few short requests before the replay (CUDA init, allocator)
    # CUDA graphs for decode-only steps (CUDA only; vLLM's enforce_eager turns them off).
    enforce_eager: bool = False
    cuda_graph_batch_sizes: list[int] | None = None  # null: 1, 2, 4, ..., max_batch_size
    # Steps with prompt tokens as CUDA graphs between eager attentions (engine/piecewise_graphs.py):
    # null where they can run, true insists, false never; per token bucket (null: 16, 32, ...,
    # max_num_tokens).
    piecewise_cuda_graphs: bool | None = None
    piecewise_token_sizes: list[int] | None = None
    # Those steps captured whole, attention included (vLLM's FULL mode): one replay a step, so
    # a slow host no longer slows them. Off by default: the default simulator profiles are of
    # the piecewise engine (engine=sim with it takes <model>.full.overlap.json: llama-1b only).
    full_cuda_graphs: bool = False
    # Schedule and prepare step n+1 while the GPU runs step n (TensorRT-LLM's overlap scheduler,
    # vLLM's async scheduling). engine=sim simulates it (with a profile calibrated on overlap
    # runs: <model>.overlap.json).
    overlap_scheduler: bool = True
    # engine=sim: the profile to fit step times to (null: engine/sim/profiles/<sim_device>/
    # <model>.json, or <model>.overlap.json with overlap_scheduler; made by python -m
    # engine.sim.profiler and python -m harness.calibrate)
    profile: str | None = None
    sim_device: str = "h200"  # the GPU our runs use since 2026-11-28 (h100 also committed)
    # engine=sim with overlap: the simulated host's time over the profiled one's (2.0: a host
    # twice as slow; python -m harness.calibrate prints a real run's). Needs a profile with host
    # and device times apart (engine.sim.HostDeviceCostModel).
    sim_host_time_scale: float = 1.0
    # engine=sim with overlap: a real run's host speed over time (a CSV of time_s,
    # host_time_scale, as python -m harness.calibrate --host-timeline writes it), scaling each
    # step's host time by the second it starts in, on top of sim_host_time_scale.
    sim_host_timeline: str | None = None
    # engine=sim with overlap: a host that switches between two speeds (a JSON file of
    # engine.sim.HostSpeeds, as python -m harness.calibrate --host-speeds writes it), drawn
    # with the run's seed: the runs of a sweep share one host. Not with sim_host_timeline.
    sim_host_speeds: str | None = None
    # engine=sim with overlap: the simulated device's time over the profiled one's (a GPU 2%
    # slower: 1.02; python -m harness.calibrate prints a real run's).
    sim_device_time_scale: float = 1.0
    # engine=sim with overlap: the GPU's power cap (engine.sim.PowerCap: its device time after
    # heavy work). auto: the file beside the profile (<profile>.power.json, as python -m
    # harness.calibrate --power writes it) where there is one; null: none; or a file.
    sim_power: str | None = "auto"
    # engine=sim with overlap: the host as a second stage beside the device, its time on the
    # clock (engine.sim.engine), not the longer of the two a step; runs the overlap loop, its
    # repeated decode steps fast-forwarded (engine.sim.fast_forward_overlap): the whole Azure
    # trace 1.1x (llama-8b) to 1.2x (llama-1b) slower than the default.
    sim_host_pipeline: bool = False
    # Real CUDA runs: sample the GPU's SM clock, power and temperature with nvidia-smi every
    # 100 ms (gpu_telemetry.csv; each step's clock and power in iterations.parquet, the run's
    # medians in the summary): a GPU at its power cap runs the same step slower.
    gpu_telemetry: bool = True


@dataclass
class ModelConfig:
    name: str = "llama-tiny"  # a preset, or a label when path is set
    # A local checkpoint directory (real weights, its own tokenizer); every model option sets
    # it (null for presets), so model=local without model.path=... is reported as missing.
    path: str | None = MISSING


@dataclass
class SloConfig:
    """Goodput SLOs in milliseconds (vLLM's --goodput); null leaves a metric unconstrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None


GRAPH_SETTINGS = (  # executor keys that are LLM arguments of the same name
    "enforce_eager",
    "cuda_graph_batch_sizes",
    "piecewise_cuda_graphs",
    "piecewise_token_sizes",
    "full_cuda_graphs",
)


def graph_settings(executor: Mapping[str, Any]) -> dict[str, Any]:
    """The executor's CUDA-graph settings as ``LLM`` arguments: the graphs the real engine
    captures, and the buckets the simulated one pads its steps to (``engine/sim/padding.py``).
    ``executor``: the composed config's node, or a saved run's config (older runs may lack a
    key: the default then)."""
    defaults = ExecutorConfig()
    settings = {key: executor.get(key, getattr(defaults, key)) for key in GRAPH_SETTINGS}
    return {
        k: list(v) if v is not None and k.endswith("_sizes") else v for k, v in settings.items()
    }


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(group="executor", name="schema", node=ExecutorConfig)
    store.store(group="model", name="schema", node=ModelConfig)
    store.store(group="slo", name="schema", node=SloConfig)


def resolve_device_name(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def by_device(device: str, cpu_value: Any, cuda_value: Any) -> Any:
    return cuda_value if resolve_device_name(str(device)).startswith("cuda") else cpu_value


def default_device(engine: str) -> str:
    """``auto`` for a real engine; ``cuda`` for the simulated one, which simulates a GPU."""
    return "cuda" if str(engine) in ("sim", "EngineKind.sim") else "auto"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("by_device"):
        OmegaConf.register_new_resolver("by_device", by_device)
    if not OmegaConf.has_resolver("default_device"):
        OmegaConf.register_new_resolver("default_device", default_device)


def check_component(group: str, node: Mapping[str, Any]) -> type:
    """The class a ``_target_`` group names, after checking the group's keys against its
    constructor (a typo fails here, naming the key and the accepted ones)."""
    target = node.get("_target_")
    if not target:
        raise ValueError(f"{group}: no _target_ given (the class to build)")
    cls = import_object(str(target))
    parameters = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = [name for name in parameters if name not in ("self", "args", "kwargs")]
    for key in node:
        if key != "_target_" and key not in parameters and not takes_any:
            raise ValueError(
                f"{group}.{key} is not an argument of {target}; accepted: {', '.join(accepted)}"
            )
    return cls


def component_kwargs(node: Any) -> dict[str, Any]:
    """A ``_target_`` node as a plain dict (interpolations resolved), for ``policies.registry``."""
    return OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)
