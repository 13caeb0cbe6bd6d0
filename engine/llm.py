"""``LLM``: the user-facing entry point (TensorRT-LLM's and vLLM's name), wiring one executor.

llm = LLM("llama-tiny", device="cpu", dtype="float64",
          capacity_scheduler="max_utilization",
          microbatch_scheduler=dict(max_batch_size=8, max_num_tokens=64, chunking="equal_progress"),
          kv_cache_manager=dict(tokens_per_block=4, num_blocks=24, enable_block_reuse=True))
outputs = llm.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.clock import Clock, VirtualClock, WallClock
from engine.cuda_graphs import DecodeGraphRunner, default_cuda_graph_batch_sizes
from engine.decoder import Decoder
from engine.executor import PyExecutor
from engine.model_engine import TorchModelEngine
from engine.piecewise_graphs import PiecewiseGraphRunner, default_piecewise_token_sizes
from engine.request import Request, SamplingParams
from engine.resource_manager import ResourceManager
from engine.scheduler import Scheduler
from engine.sim.engine import SimDecoder
from engine.sim.fast_forward import fast_forward_decodes, is_steady
from engine.sim.fast_forward_overlap import fast_forward_overlap
from engine.sim.padding import StepPadding
from policies import registry

log = logging.getLogger(__name__)

ENGINES = ("torch", "sim")

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is cuda when a GPU is visible, else cpu; asking for cuda without one is an error
    (a run that silently falls back to the CPU would report meaningless timings)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but no CUDA GPU is visible to torch")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class RequestMetrics:
    """Per-request times in seconds on the executor's clock (vLLM's definitions)."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    ttft: float | None
    tpot: float | None
    e2e_latency: float | None
    queue_time: float | None
    num_preemptions: int
    num_cached_tokens: int

    @classmethod
    def of(cls, request: Request) -> RequestMetrics:
        return cls(
            arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time,
            first_token_time=request.first_token_time,
            finish_time=request.finish_time,
            ttft=request.ttft,
            tpot=request.tpot,
            e2e_latency=request.e2e_latency,
            queue_time=request.queue_time,
            num_preemptions=request.num_preemptions,
            num_cached_tokens=request.num_cached_tokens,
        )


@dataclass(frozen=True)
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None  # "length", "stop" or "rejected"
    rejection_reason: str | None
    metrics: RequestMetrics


class LLM:
    """One model, one executor, interchangeable scheduling parts.

    ``model``: a preset name (``engine.models.PRESETS``), a local checkpoint directory, or a
    transformers model. ``capacity_scheduler`` / ``microbatch_scheduler`` / ``kv_cache_manager``:
    a registered name, a dict of constructor arguments (optionally with ``name`` or
    ``_target_``), or an instance (see ``policies.registry``). ``attention_backend``: ``auto``
    (Triton kernels on CUDA, the torch reference on CPU), ``torch`` or ``triton``.

    On CUDA, decode-only steps replay CUDA graphs captured at start-up for the bucket sizes
    ``cuda_graph_batch_sizes`` (default: ``default_cuda_graph_batch_sizes(max_batch_size)``);
    ``enforce_eager=True`` (vLLM's name) runs every step eagerly. CPU runs are always eager.
    Piecewise CUDA graphs capture the other steps between their attentions, per token bucket
    (``piecewise_token_sizes``, default ``default_piecewise_token_sizes``): see
    ``engine.piecewise_graphs``. ``piecewise_cuda_graphs``: ``None`` (default) uses them where
    they can run (CUDA, Triton attention, not ``enforce_eager``, a token budget or explicit
    sizes), ``True`` insists (an error where they cannot), ``False`` runs those steps eagerly.
    ``full_cuda_graphs=True`` (vLLM's FULL mode) captures those steps whole, attention
    included, per token bucket: one replay a step instead of the pieces and three attention
    launches a layer (CUDA only; off by default: the default simulator profiles are of the
    piecewise engine).

    ``overlap_scheduler=True`` (TensorRT-LLM's overlap scheduler, vLLM's async scheduling):
    the host schedules and prepares step n+1 while the device runs step n (``engine.executor``);
    a request that samples a stop token costs one extra, dropped, token of compute.

    ``engine="sim"``: no weights and no tensors; each step's time comes from ``cost_model`` (a
    ``engine.sim.Profile``, a profile file, or any ``engine.sim.CostModel``) on a
    ``VirtualClock``; the KV pool only counts blocks (sized by the manager's ``num_blocks`` /
    ``max_tokens``, or ``free_gpu_memory_fraction`` of the profile's free memory). Outputs
    are placeholder tokens; lengths follow ``max_new_tokens``. ``sim_fast_forward``: advance runs
    of identical decode steps in one go (exact; only with policies that declare
    ``steady_decode``, see ``engine.sim.fast_forward``). ``sim_host_time_scale``: the simulated
    host's time over the profiled one's (a profile with host and device times apart:
    ``engine.sim.HostDeviceCostModel``); ``sim_host_timeline`` (a ``engine.sim.HostTimeline`` or
    its CSV file) scales it further by the second each step starts in (a real run's host
    replayed), or ``sim_host_speeds`` (a ``engine.sim.HostSpeeds`` or its JSON file) by a host
    that switches between two speeds, drawn with ``seed`` (``engine.sim.host_speeds``); and
    ``sim_device_time_scale`` scales the device's time, and ``sim_power`` (a
    ``engine.sim.PowerCap`` or its JSON file) by how heavy its recent work was (the GPU's power
    cap, ``engine.sim.power``). With
    ``overlap_scheduler`` the simulator runs the overlap loop on a virtual device, or with
    ``sim_fast_forward`` the plain loop with the admission overlap gives it
    (``PyExecutor(lagged_admission=True)``; the same request
    times, tested). Simulate overlap with a profile calibrated on overlap runs: their step
    times are the device's, where plain runs' include the host's. ``sim_host_pipeline``
    (overlap only, a profile with host and device times apart): the host as a second stage
    beside the device, its time on the clock (``engine.sim.engine``), where a step otherwise
    costs the longer of the two, with ``sim_power`` too; it runs the overlap loop, which
    ``sim_fast_forward`` fast-forwards too (``engine.sim.fast_forward_overlap``).
    """

    def __init__(
        self,
        model: Any = "llama-tiny",
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        capacity_scheduler: Any = None,
        microbatch_scheduler: Any = None,
        kv_cache_manager: Any = None,
        seed: int = 0,
        clock: Clock | None = None,
        attention_backend: str = "auto",
        enforce_eager: bool = False,
        cuda_graph_batch_sizes: Sequence[int] | None = None,
        piecewise_cuda_graphs: bool | None = None,
        piecewise_token_sizes: Sequence[int] | None = None,
        full_cuda_graphs: bool = False,
        engine: str = "torch",
        cost_model: Any = None,
        sim_fast_forward: bool = True,
        sim_host_time_scale: float = 1.0,
        sim_host_pipeline: bool = False,
        sim_host_timeline: Any = None,
        sim_host_speeds: Any = None,
        sim_device_time_scale: float = 1.0,
        sim_power: Any = None,
        overlap_scheduler: bool = False,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if engine != "sim" and sim_host_time_scale != 1.0:
            raise ValueError("sim_host_time_scale applies to engine='sim' only")
        if engine != "sim" and sim_host_timeline is not None:
            raise ValueError("sim_host_timeline applies to engine='sim' only")
        if engine != "sim" and sim_host_speeds is not None:
            raise ValueError("sim_host_speeds applies to engine='sim' only")
        if sim_host_timeline is not None and sim_host_speeds is not None:
            raise ValueError(
                "give sim_host_timeline (a real run's host) or sim_host_speeds (a simulated "
                "host of two speeds), not both"
            )
        if engine != "sim" and sim_device_time_scale != 1.0:
            raise ValueError("sim_device_time_scale applies to engine='sim' only")
        if engine != "sim" and sim_power is not None:
            raise ValueError("sim_power applies to engine='sim' only")
        if sim_host_pipeline and not (engine == "sim" and overlap_scheduler):
            raise ValueError(
                "sim_host_pipeline applies to engine='sim' with overlap_scheduler=True (the "
                "host runs beside the device only with overlap scheduling)"
            )
        self.engine = engine
        self._overlap_scheduler = overlap_scheduler
        self.microbatch_scheduler = registry.build("microbatch_scheduler", microbatch_scheduler)
        self.capacity_scheduler = registry.build(
            "capacity_scheduler",
            capacity_scheduler,
            max_num_requests=self.microbatch_scheduler.max_batch_size,
        )
        self.kv_cache_manager = registry.build("kv_cache_manager", kv_cache_manager)
        check_chunk_unit(self.microbatch_scheduler, self.kv_cache_manager.tokens_per_block)
        # Each engine sets model_engine (and device, dtype, tokenizer); both share the loop.
        if engine == "sim":
            padding = StepPadding.of_engine(
                max_batch_size=getattr(self.microbatch_scheduler, "max_batch_size", None),
                max_num_tokens=getattr(self.microbatch_scheduler, "max_num_tokens", None),
                enforce_eager=enforce_eager,
                cuda_graph_batch_sizes=cuda_graph_batch_sizes,
                piecewise_cuda_graphs=piecewise_cuda_graphs,
                piecewise_token_sizes=piecewise_token_sizes,
            )
            decoder, clock = self._init_sim(
                model,
                dtype,
                cost_model,
                clock,
                padding,
                sim_host_time_scale,
                sim_host_pipeline,
                sim_host_timeline,
                sim_device_time_scale,
                sim_host_speeds,
                seed,
                sim_power,
            )
        else:
            self._init_torch(model, device, dtype, seed, attention_backend)
            self._build_graphs(
                enforce_eager,
                cuda_graph_batch_sizes,
                piecewise_cuda_graphs,
                piecewise_token_sizes,
                full_cuda_graphs,
            )
            decoder, clock = Decoder(seed), clock or WallClock()
        # The simulator emulates overlap with the plain loop, where it fast-forwards faster
        # (exactly); the pipeline's clock moves inside a step, so it runs the overlap loop.
        lagged = overlap_scheduler and engine == "sim" and sim_fast_forward
        lagged = lagged and not sim_host_pipeline
        self.executor = PyExecutor(
            self.model_engine,
            decoder,
            Scheduler(self.capacity_scheduler, self.microbatch_scheduler),
            ResourceManager(self.kv_cache_manager),
            clock=clock,
            eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
            overlap=overlap_scheduler and not lagged,
            lagged_admission=lagged,
        )
        if engine == "sim" and sim_fast_forward and is_steady(self.executor):
            overlap_loop = self.executor.overlap
            decode_run = fast_forward_overlap if overlap_loop else fast_forward_decodes
            self.executor.decode_run = decode_run
        self._next_request_id = 0

    def _init_torch(self, model, device, dtype, seed, attention_backend) -> None:
        from engine.models import PagedCausalLM, load_model

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        loaded = load_model(model, device=self.device, dtype=self.dtype, seed=seed)
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        paged = PagedCausalLM(loaded.hf_model, attention_backend=attention_backend)
        # GPU memory (GiB, allocated / reserved by torch) after each start-up phase.
        self.memory_profile: dict[str, tuple[float, float]] = {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # drop weight-init and fusion transients before sizing
        self._memory_checkpoint("weights")
        # The largest step first (max_num_tokens), so its activations are already reserved
        # when the KV pool is sized from the free memory that is left: no out-of-memory error
        # in the run. Without a token budget there is no largest step to profile.
        self.activation_peak_bytes = 0
        max_num_tokens = getattr(self.microbatch_scheduler, "max_num_tokens", None)
        if self.device.type == "cuda" and max_num_tokens:
            self.activation_peak_bytes = paged.profile_run(
                max_num_tokens,
                getattr(self.microbatch_scheduler, "max_batch_size", 1),
                self.kv_cache_manager.tokens_per_block,
            )
        self._memory_checkpoint("profile_run")
        self.kv_cache_manager.allocate_pool(
            paged.num_layers, paged.num_kv_heads, paged.head_dim, self.dtype, self.device
        )
        self._memory_checkpoint("kv_pool")
        paged.compile_kernels(self.kv_cache_manager.kv_pool)
        self.model_engine = TorchModelEngine(paged, self.device)

    def _build_graphs(
        self,
        enforce_eager: bool,
        batch_sizes: Sequence[int] | None,
        piecewise: bool | None,
        token_sizes: Sequence[int] | None,
        full: bool = False,
    ) -> None:
        engine = self.model_engine
        engine.graph_runner = self._graph_runner(engine.model, enforce_eager, batch_sizes)
        if full:
            if enforce_eager or piecewise is False:
                raise ValueError(
                    "full_cuda_graphs=True captures the steps with prompt tokens whole: not with "
                    "enforce_eager=True or piecewise_cuda_graphs=False"
                )
            piecewise = True
        if piecewise is None:  # where they can run
            piecewise = (
                not enforce_eager
                and self.device.type == "cuda"
                and engine.model.attention_backend == "triton"
                and bool(token_sizes or getattr(self.microbatch_scheduler, "max_num_tokens", None))
            )
        if piecewise and not enforce_eager:
            engine.piecewise_runner = self._piecewise_runner(engine.model, token_sizes, full)
        self._memory_checkpoint("cuda_graphs")

    @property
    def device_name(self) -> str:
        """What the steps ran on, as profiles name it: the card ('NVIDIA H200') on CUDA, 'cpu'
        on CPU, the profile's device under ``engine='sim'`` ('sim' with no profile)."""
        if self.engine == "sim":
            return self.profile.device if self.profile is not None else "sim"
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return str(self.device.type)

    def release_gpu_memory(self) -> None:
        """Give back the KV pool and the CUDA graphs' memory; the weights stay (a benchmark
        runs a peer on them next). The LLM cannot step afterwards."""
        if self.engine == "sim":
            return  # nothing was allocated
        self.model_engine.graph_runner = None
        self.model_engine.piecewise_runner = None  # it holds the pool too
        self.kv_cache_manager.kv_pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _init_sim(
        self,
        model,
        dtype,
        cost_model,
        clock,
        padding: StepPadding,
        host_time_scale: float,
        pipeline: bool,
        host_timeline: Any = None,
        device_time_scale: float = 1.0,
        host_speeds: Any = None,
        seed: int = 0,
        power: Any = None,
    ) -> tuple[SimDecoder, VirtualClock]:
        """No weights, no tensors: the model's shape, a cost model and a virtual clock. Steps
        are padded to ``padding``'s graph buckets (this LLM's settings, as on a GPU) where the
        profile's engine ran graphs too: its fitted per-row costs are per padded row then.
        ``host_time_scale`` scales the host's part of each step (``HostDeviceCostModel``), and
        ``host_timeline`` (a ``HostTimeline`` or its CSV file) by the second the step starts in,
        or ``host_speeds`` (``HostSpeeds`` or its JSON file) by a two-speed host drawn with
        ``seed``; ``device_time_scale`` its device's part, and ``power`` (``PowerCap`` or its
        JSON file) that part by the device's recent work."""
        from engine.models import load_tokenizer, model_limits, model_shape
        from engine.sim import (
            CostModel,
            HostDeviceCostModel,
            HostSpeeds,
            HostTimeline,
            PowerCap,
            Profile,
            SimModelEngine,
        )
        from engine.sim.engine import check_host_device

        if not isinstance(model, (str, os.PathLike)):
            raise ValueError("engine='sim' takes a preset name or a checkpoint directory")
        if clock is not None and not isinstance(clock, VirtualClock):
            raise ValueError("engine='sim' runs on a VirtualClock (simulated time)")
        if cost_model is None:
            raise ValueError(
                "engine='sim' needs a cost_model: a Profile, a profile file, or a CostModel"
            )
        profile = None
        if isinstance(cost_model, (str, os.PathLike)):
            cost_model = Profile.load(cost_model)
        if isinstance(cost_model, Profile):
            profile = cost_model
            cost_model = profile.cost_model(host_time_scale, with_launch=pipeline)
            if profile.model != str(model):
                raise ValueError(f"the profile is of model {profile.model!r}, not {str(model)!r}")
        if not isinstance(cost_model, CostModel):
            raise ValueError(f"cost_model must be a Profile, a path or a CostModel: {cost_model!r}")
        if profile is None and host_time_scale != 1.0:
            if not isinstance(cost_model, HostDeviceCostModel):
                raise ValueError(
                    f"sim_host_time_scale={host_time_scale} needs a HostDeviceCostModel (host "
                    f"and device times apart), not a {type(cost_model).__name__}"
                )
            cost_model = dataclasses.replace(cost_model, host_time_scale=host_time_scale)
        if device_time_scale != 1.0:
            if not isinstance(cost_model, HostDeviceCostModel):
                raise ValueError(
                    f"sim_device_time_scale={device_time_scale} needs a HostDeviceCostModel (a "
                    "profile with host and device times apart), not a "
                    f"{type(cost_model).__name__}"
                )
            cost_model = dataclasses.replace(cost_model, device_time_scale=device_time_scale)
        if isinstance(host_timeline, (str, os.PathLike)):
            host_timeline = HostTimeline.load(host_timeline)
        if isinstance(host_speeds, (str, os.PathLike)):
            host_speeds = HostSpeeds.load(host_speeds)
        if host_speeds is not None:
            if not isinstance(host_speeds, HostSpeeds):
                raise ValueError(f"sim_host_speeds must be HostSpeeds or a file: {host_speeds!r}")
            if not isinstance(cost_model, HostDeviceCostModel):
                raise ValueError(
                    "host speeds need a HostDeviceCostModel (a profile with host and device "
                    f"times apart), not a {type(cost_model).__name__}"
                )
            host_timeline = host_speeds.host(seed)  # a timeline drawn as the run goes
        if isinstance(power, (str, os.PathLike)):
            power = PowerCap.load(power)
        if power is not None and not isinstance(power, PowerCap):
            raise ValueError(f"sim_power must be a PowerCap or a file: {power!r}")
        check_host_device(cost_model, host_timeline, power)  # before the pool is counted
        self.profile = profile
        if profile is not None:
            self._warn_beyond_profile(profile)
            self._warn_other_mode(profile)
        self.model_name = str(model)
        self.tokenizer = load_tokenizer(model)
        self.device = torch.device("meta")  # nothing is allocated
        self.dtype = DTYPES.get(profile.dtype if profile else str(dtype), torch.bfloat16)
        shape = model_shape(model)
        self.kv_cache_manager.allocate_pool(
            shape.num_layers,
            shape.num_kv_heads,
            shape.head_dim,
            self.dtype,
            self.device,
            free_bytes=(profile.memory.get("free_bytes_for_kv") if profile else None),
        )
        self.memory_profile = {}
        self.activation_peak_bytes = 0
        clock = clock or VirtualClock()
        vocab_size, max_seq_len = model_limits(model)
        if profile is not None:
            profiled = StepPadding.of_profile(profile.engine)
            padding = StepPadding(
                padding.decode_sizes if profiled.decode_sizes else (),
                padding.token_sizes if profiled.token_sizes else (),
            )
        self.model_engine = SimModelEngine(
            cost_model,
            clock,
            vocab_size,
            max_seq_len,
            padding,
            pipeline=pipeline,
            host_timeline=host_timeline,
            power=power,
        )
        return SimDecoder(clock), clock

    def _warn_other_mode(self, profile) -> None:
        """A profile calibrated with (without) overlap scheduling simulates runs with (without)
        it: a step's time means something else in the other mode (``harness.calibrate``)."""
        mode = profile.overlap_scheduler
        if mode is not None and mode != self._overlap_scheduler:
            log.warning(
                "the profile was calibrated on runs %s overlap scheduling, this run is %s it: "
                "its step times are off (use a profile of this mode)",
                "with" if mode else "without",
                "with" if self._overlap_scheduler else "without",
            )

    def _warn_beyond_profile(self, profile) -> None:
        """A run whose steps can be larger than any profiled one extrapolates its step times:
        say so once, up front, naming the budgets (not an error: the fit may still be good)."""
        samples = profile.samples()
        most_seqs = max(f.num_decode_seqs + f.num_context_seqs for f, _ in samples)
        most_tokens = max(f.num_tokens for f, _ in samples)
        budgets = {
            "max_batch_size": (
                getattr(self.microbatch_scheduler, "max_batch_size", None),
                most_seqs,
            ),
            "max_num_tokens": (
                getattr(self.microbatch_scheduler, "max_num_tokens", None),
                most_tokens,
            ),
        }
        for name, (value, profiled) in budgets.items():
            if value is None or value > profiled:
                log.warning(
                    "microbatch_scheduler.%s=%s is beyond the profile's largest step (%d): step "
                    "times past it are extrapolated from the fit",
                    name,
                    value,
                    profiled,
                )

    def _memory_checkpoint(self, phase: str) -> None:
        if self.device.type == "cuda":
            gib = 2**30
            self.memory_profile[phase] = (
                round(torch.cuda.memory_allocated(self.device) / gib, 3),
                round(torch.cuda.memory_reserved(self.device) / gib, 3),
            )

    def _graph_runner(
        self, paged, enforce_eager: bool, batch_sizes: Sequence[int] | None
    ) -> DecodeGraphRunner | None:
        if enforce_eager or self.device.type != "cuda":
            return None
        return DecodeGraphRunner(
            paged,
            self.kv_cache_manager.kv_pool,
            batch_sizes
            or default_cuda_graph_batch_sizes(
                getattr(self.microbatch_scheduler, "max_batch_size", 256)
            ),
            max_blocks_per_seq=self._max_blocks_per_seq(paged),
            max_pending_rows=getattr(self.microbatch_scheduler, "max_batch_size", None),
        )

    def _piecewise_runner(
        self, paged, token_sizes: Sequence[int] | None, full: bool = False
    ) -> PiecewiseGraphRunner:
        if self.device.type != "cuda":
            name = "full_cuda_graphs" if full else "piecewise_cuda_graphs"
            raise ValueError(f"{name}=True needs a CUDA device")
        mb = self.microbatch_scheduler
        max_num_tokens = getattr(mb, "max_num_tokens", None)
        if token_sizes is None and not max_num_tokens:
            raise ValueError(
                "piecewise_cuda_graphs=True needs piecewise_token_sizes or a micro-batch "
                "scheduler with max_num_tokens (the largest step to capture)"
            )
        return PiecewiseGraphRunner(
            paged,
            self.kv_cache_manager.kv_pool,
            token_sizes or default_piecewise_token_sizes(max_num_tokens),
            max_num_seqs=getattr(mb, "max_batch_size", 256),
            full=full,
            max_blocks_per_seq=self._max_blocks_per_seq(paged),
        )

    def _max_blocks_per_seq(self, paged) -> int:
        """Block-table columns a sequence can need: the model's length or the pool's, if less."""
        kv = self.kv_cache_manager
        max_tokens = min(paged.max_seq_len, kv.num_blocks * kv.tokens_per_block)
        return -(-max_tokens // kv.tokens_per_block)

    def make_requests(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        arrival_times: Sequence[float] | None = None,
    ) -> list[Request]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        params = sampling_params or SamplingParams()
        params_list = (
            [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling_params for {len(prompts)} prompts")
        now = self.executor.clock.now()
        times = [now] * len(prompts) if arrival_times is None else [now + t for t in arrival_times]
        if len(times) != len(prompts):
            raise ValueError(f"{len(times)} arrival_times for {len(prompts)} prompts")
        requests = []
        for prompt, p, t in zip(prompts, params_list, times, strict=True):
            requests.append(
                Request(self._next_request_id, self._tokenize(prompt), p, arrival_time=t)
            )
            self._next_request_id += 1
        return requests

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        arrival_times: Sequence[float] | None = None,
    ) -> list[RequestOutput]:
        """Run the prompts to completion; outputs come back in prompt order. ``arrival_times``
        (seconds from now) replays arrivals inside the step loop."""
        requests = self.make_requests(prompts, sampling_params, arrival_times)
        self.executor.enqueue_requests(requests)
        self.executor.run()
        return [self._output(r) for r in requests]

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a string prompt needs a tokenizer; this model has none")
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def _output(self, request: Request) -> RequestOutput:
        text = None
        if self.tokenizer is not None and request.output_token_ids and self.engine != "sim":
            text = self.tokenizer.decode(request.output_token_ids)
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            token_ids=list(request.output_token_ids),
            text=text,
            finish_reason=request.finish_reason.value if request.finish_reason else None,
            rejection_reason=request.rejection_reason,
            metrics=RequestMetrics.of(request),
        )


def check_chunk_unit(microbatch_scheduler: Any, tokens_per_block: int) -> None:
    """Chunk unit defaults to the KV block size (TensorRT-LLM); a unit larger than the token
    budget would round every truncated chunk down to zero and stall chunked contexts."""
    if getattr(microbatch_scheduler, "chunk_unit_size", 0) is None:
        microbatch_scheduler.chunk_unit_size = tokens_per_block
    unit = getattr(microbatch_scheduler, "chunk_unit_size", None)
    budget = getattr(microbatch_scheduler, "max_num_tokens", None)
    if unit is not None and budget is not None and unit > budget:
        raise ValueError(
            f"microbatch_scheduler.chunk_unit_size={unit} exceeds max_num_tokens={budget}; "
            "set chunk_unit_size <= max_num_tokens "
            "(it defaults to kv_cache_manager.tokens_per_block)"
        )
