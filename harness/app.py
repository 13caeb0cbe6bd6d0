"""One harness run: check the config, build the workload, run the executor, write the results.

Everything that can be wrong with the input (a key, a value, a trace file) is checked before the
model is built. In a sweep, a failing job records its error in its own run.json and the sweep
goes on; a single run exits with the error, in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness.config import (
    check_component,
    component_kwargs,
    graph_settings,
    resolve_device_name,
)

log = logging.getLogger(__name__)

POLICY_GROUPS = ("capacity_scheduler", "microbatch_scheduler", "kv_cache_manager")


def run_info(cfg: DictConfig) -> dict[str, Any]:
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    return {
        "name": cfg.name,
        "overrides": overrides,
        "variant": ",".join(o for o in overrides if not o.startswith("experiment=")) or "default",
        "status": "running",
        "error": None,
    }


def is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def main(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra task function."""
    from harness.results import write_failed_run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    info = run_info(cfg)
    try:
        return execute(cfg, run_dir, info)
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        write_failed_run(run_dir, run_info={**info, "status": "failed"}, error=message)
        if is_multirun():
            log.error("run %s failed: %s", info["variant"], message)
            return {"status": "failed", "error": message}
        if isinstance(error, ValueError | FileNotFoundError):
            # Bad input: one clear line, not a traceback.
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed memory that is not at the top of its heap, so what a run frees (a whole
    trace's requests and prompts, its engine) would stay resident while the results are built and
    written; Arrow's parquet writer, with its own allocator, could not even reuse it.
    """
    if sys.platform.startswith("linux"):
        # AttributeError: a C library without malloc_trim (musl)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)


def release_gpu_cache() -> None:
    """Give the CUDA memory torch's allocator keeps cached back to the device, where CUDA was
    used: the next run's pool is sized from the device's free memory."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def sim_power_path(cfg: DictConfig, profile: Path) -> str | None:
    """The power cap a simulated run uses (``executor.sim_power``): ``auto`` is the file beside
    its profile where there is one, with overlap scheduling (which the cap was fitted to)."""
    from engine.sim.profile import power_path

    value = cfg.executor.sim_power
    if value != "auto":
        return value
    path = power_path(profile)
    executor = cfg.executor
    is_used = path.is_file() and executor.overlap_scheduler
    return str(path) if is_used else None


def start_telemetry(cfg: DictConfig, llm, run_dir: Path):
    """Start sampling the GPU's clocks and power for a real run on CUDA
    (``executor.gpu_telemetry``; ``harness.telemetry``); None where off or not on CUDA. Without
    nvidia-smi the run goes on, with a warning that it records none."""
    from harness.telemetry import TELEMETRY_FILE, GpuTelemetry

    if not cfg.executor.gpu_telemetry or llm.device.type != "cuda":
        return None
    telemetry = GpuTelemetry(run_dir / TELEMETRY_FILE, device=nvidia_smi_id(llm.device))
    try:
        telemetry.start()
    except (OSError, subprocess.SubprocessError) as error:
        log.warning(
            "executor.gpu_telemetry: %s; this run records no GPU clock or power "
            "(executor.gpu_telemetry=false turns sampling off)",
            error,
        )
        return None
    return telemetry


def nvidia_smi_id(device) -> str:
    """The GPU ``device`` (a torch CUDA device) as nvidia-smi names it: its UUID, which holds
    under CUDA_VISIBLE_DEVICES (where torch's index need not be nvidia-smi's)."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else str(device.index or 0)


def with_telemetry(iterations, path: Path, epoch_origin: float) -> tuple[Any, dict[str, float]]:
    """``iterations`` with each step's SM clock and power (``harness.telemetry.at_steps``), and
    the run's GPU summary keys (``telemetry_summary``, over its steps' span)."""
    from harness.telemetry import at_steps, read_samples, telemetry_summary

    samples = read_samples(path)
    end = float((iterations["time"] + iterations["step_latency"]).max()) if len(iterations) else 0
    gpu = telemetry_summary(samples, epoch_origin, epoch_origin + end)
    return iterations.join(at_steps(samples, iterations, epoch_origin)), gpu


def build_parts(cfg: DictConfig) -> dict[str, Any]:
    """Check and build the three policy parts (cheap, before the model)."""
    from policies import registry

    parts = {}
    for group in POLICY_GROUPS:
        node = component_kwargs(cfg[group])
        check_component(group, node)
        parts[group] = registry.build(group, node)
    return parts


def model_source(cfg: DictConfig) -> str:
    return cfg.model.path if cfg.model.path else cfg.model.name


def sim_profile_path(cfg: DictConfig) -> Path:
    """The profile a simulated run fits its step times to (``executor.profile``, else the
    committed one for ``executor.sim_device``, the model and the overlap mode)."""
    from engine.sim import available_profiles, default_profile_path

    if cfg.executor.profile:
        return Path(cfg.executor.profile)
    overlap, full = cfg.executor.overlap_scheduler, cfg.executor.get("full_cuda_graphs", False)
    path = default_profile_path(cfg.model.name, cfg.executor.sim_device, overlap, full)
    if not path.is_file():
        mode = "with" if overlap else "without"
        mode += " overlap scheduling" + (" and full CUDA graphs" if full else "")
        flag = " --full-graphs" if full else ""
        raise ValueError(
            f"no profile for model {cfg.model.name!r} on {cfg.executor.sim_device!r} {mode} "
            f"({path}); available: {', '.join(available_profiles()) or 'none'} "
            f"(.overlap: executor.overlap_scheduler=true; .full: executor.full_cuda_graphs=true)."
            f" Make one on that GPU with python -m engine.sim.profiler --model {cfg.model.name}"
            f"{flag} and python -m harness.calibrate (bench/sim_calibration.sh), or pass "
            "executor.profile=FILE"
        )
    return path


def tokenizer_for(cfg: DictConfig):
    if cfg.model.path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(cfg.model.path, local_files_only=True)
    from engine.models import ByteTokenizer

    return ByteTokenizer()


def execute(cfg: DictConfig, run_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    from engine import LLM
    from engine.llm import resolve_device
    from engine.models import model_limits
    from harness.metrics import iterations_frame, requests_frame, summarize
    from harness.replay import replay, reset, warm_up
    from harness.report import Progress, print_summary
    from harness.results import write_run
    from harness.workload import build_workload

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(
            f"no value for {', '.join(missing)}: give it on the command line, e.g. {missing[0]}=..."
        )
    is_sim = cfg.executor.engine.value == "sim"
    # A simulated run allocates nothing: its device only sizes the experiment.
    device = None if is_sim else resolve_device(resolve_device_name(cfg.executor.device))
    parts = build_parts(cfg)
    vocab_size, max_seq_len = model_limits(model_source(cfg))
    workload = build_workload(
        component_kwargs(cfg.workload),
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        tokenizer=tokenizer_for(cfg),
    )
    if len(workload) == 0:
        raise ValueError(f"workload {workload.name!r} has no requests (check its window/filters)")

    started = time.perf_counter()
    if is_sim:
        info["profile"] = str(sim_profile_path(cfg))
        info["power"] = sim_power_path(cfg, Path(info["profile"]))
        llm = LLM(
            model_source(cfg),
            engine="sim",
            cost_model=info["profile"],
            seed=cfg.seed,
            overlap_scheduler=cfg.executor.overlap_scheduler,
            sim_host_time_scale=cfg.executor.sim_host_time_scale,
            sim_host_pipeline=cfg.executor.sim_host_pipeline,
            sim_host_timeline=cfg.executor.sim_host_timeline,
            sim_host_speeds=cfg.executor.sim_host_speeds,
            sim_device_time_scale=cfg.executor.sim_device_time_scale,
            sim_power=info["power"],
            **graph_settings(cfg.executor),  # the buckets its steps are padded to
            **parts,
        )
    else:
        llm = LLM(
            model_source(cfg),
            device=device,
            dtype=cfg.executor.dtype.value,
            seed=cfg.seed,
            attention_backend=cfg.executor.attention_backend.value,
            **graph_settings(cfg.executor),
            overlap_scheduler=cfg.executor.overlap_scheduler,
            sim_host_time_scale=cfg.executor.sim_host_time_scale,  # an error unless 1
            sim_host_pipeline=cfg.executor.sim_host_pipeline,  # an error unless false
            sim_host_timeline=cfg.executor.sim_host_timeline,  # an error unless null
            sim_host_speeds=cfg.executor.sim_host_speeds,  # an error unless null
            sim_device_time_scale=cfg.executor.sim_device_time_scale,  # an error unless 1
            # an error unless null (auto: the simulator's default, nothing here)
            sim_power=None if cfg.executor.sim_power == "auto" else cfg.executor.sim_power,
            **parts,
        )
    if cfg.executor.warmup and not is_sim:
        warm_up(llm)
    else:
        reset(llm)
    log.info(
        "%s: %d requests, model %s on %s (%s)",
        info["variant"],
        len(workload),
        llm.model_name,
        llm.device,
        llm.dtype,
    )
    telemetry = None if is_sim else start_telemetry(cfg, llm, run_dir)
    # The epoch second the run's clock reads 0 at: where the GPU's samples meet its steps.
    epoch_origin = time.time() - llm.executor.clock.now()
    try:
        with Progress(len(workload), enabled=cfg.progress, label=info["variant"]) as progress:
            requests = replay(llm, workload, on_progress=progress.update)
    finally:
        if telemetry is not None:
            telemetry.stop()

    requests_df = requests_frame(requests)
    iteration_log = llm.executor.iteration_stats
    info = {
        **info,
        "status": "ok",
        "model": llm.model_name,
        "engine": llm.engine,
        "device": f"sim ({llm.profile.device})" if is_sim else str(llm.device),
        "dtype": str(llm.dtype).removeprefix("torch."),
        "hardware": llm.device_name,  # the card on CUDA: what harness.calibrate checks
        "workload": workload.name,
        "num_requests": len(workload),
        "wall_time_s": None,  # set below, after the summary
        "workload_metadata": {k: str(v) for k, v in workload.metadata.items()},
    }
    # From here on only the frames are needed. The engine, its requests and the workload hold
    # ~0.3 GB on the whole Azure trace (prompts, token times, KV tables): free them before the
    # iteration frame, the summary and the parquet writers add theirs. On a GPU the next run of
    # a sweep sizes its KV pool from the memory left free: the pool and the CUDA graphs go first,
    # and a collection frees what a reference cycle still holds (a sweep's later runs got a
    # tenth of the pool otherwise: docs/performance.md, "Other experiments").
    if not is_sim:
        llm.release_gpu_memory()
    del llm, parts, requests, workload
    gc.collect()
    release_gpu_cache()
    release_freed_memory()
    iterations_df = iterations_frame(iteration_log)
    del iteration_log  # the frame holds what it needs; the log's narrow int columns can go
    slo = OmegaConf.to_container(cfg.slo, resolve=True)
    summary = summarize(requests_df, iterations_df, slo=slo)
    if telemetry is not None:
        iterations_df, gpu = with_telemetry(iterations_df, telemetry.path, epoch_origin)
        if not gpu:
            log.warning("%s: no GPU sample within the run's steps", telemetry.path)
        summary |= gpu
    info["wall_time_s"] = round(time.perf_counter() - started, 3)
    release_freed_memory()  # the summary's temporaries (copies of the pooled ITLs)
    write_run(
        run_dir,
        requests=requests_df,
        iterations=iterations_df,
        summary=summary,
        run_info=info,
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        plots=cfg.plots,
    )
    print_summary(summary, run_dir, title=info["variant"])
    return {"status": "ok", **summary}
