"""Decode step time against the memory floor, and where a step's time goes.

    PYTHONPATH=. python bench/decode_steps.py --out $OUT [--presets llama-8b,llama-1b]
        [--batches 1,8,32,64,128,256] [--overlap] [--enforce-eager] [--profile]

(``bench/peers.py`` prints the same table after its peer comparison.)

For each batch size B, B requests with a 1,024-token context decode together; a step's floor is
reading all weights plus the batch's KV once at the copy bandwidth measured in the same run.
Columns: median step time, floor, ratio, and the host time of the step spent in scheduling
(capacity + micro-batch passes) and in building the model's inputs.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from pathlib import Path

import torch

from engine import LLM, SamplingParams

CONTEXT = 1024
WARMUP_STEPS = 3
TIMED_STEPS = 20


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    synchronize(device)
    seconds = (time.perf_counter() - start) / 20
    del x, y
    return 2 * 2**30 / seconds


def build_llm(
    preset: str,
    device: str,
    context: int,
    enforce_eager: bool = False,
    piecewise: bool | None = None,
    overlap: bool = False,
) -> LLM:
    return LLM(
        preset,
        device=device,
        dtype="bfloat16" if device.startswith("cuda") else "float32",
        capacity_scheduler="guaranteed_no_evict",
        microbatch_scheduler=dict(
            max_batch_size=256, max_num_tokens=16384, chunking="first_come_first_served"
        ),
        kv_cache_manager=dict(
            tokens_per_block=32,
            free_gpu_memory_fraction=0.9,
            max_tokens=None if device.startswith("cuda") else 256 * (context + 32),
        ),
        enforce_eager=enforce_eager,
        piecewise_cuda_graphs=piecewise,
        overlap_scheduler=overlap,
    )


def start_decoding(llm: LLM, prompts: list[list[int]], max_new_tokens: int, label: str) -> list:
    """Admit ``prompts`` and step until every one of them is decoding (the requests)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    requests = llm.make_requests(prompts, params)
    llm.executor.enqueue_requests(requests)
    while not all(r.is_generation for r in requests):
        llm.executor.step()
        done = [r for r in requests if r.is_finished]
        if done:  # else this loop would never end
            reason = done[0].rejection_reason
            raise SystemExit(
                f"{label} cannot decode together: "
                + (reason or f"the KV pool ({llm.kv_cache_manager.num_blocks} blocks) is too small")
            )
    return requests


def timed_steps(llm: LLM, warmup: int = WARMUP_STEPS, num_steps: int = TIMED_STEPS) -> list[float]:
    """Seconds of each of ``num_steps`` steps after ``warmup`` untimed ones, each synchronised
    on both sides. With overlap scheduling a step() call queues one step and waits for the one
    before it, so syncing around each call would serialise what it overlaps: the device is
    synchronised once before, and each step's time is the interval between its call's end and
    the previous one's (in steady state, one device step)."""
    device = str(llm.device)
    for _ in range(warmup):
        llm.executor.step()
    seconds = []
    synchronize(device)
    last = time.perf_counter()
    for _ in range(num_steps):
        if not llm.executor.overlap:
            synchronize(device)
            last = time.perf_counter()
        llm.executor.step()
        if not llm.executor.overlap:
            synchronize(device)
        now = time.perf_counter()
        seconds.append(now - last)
        last = now
    return seconds


def gpu_idle_share(llm: LLM, num_steps: int = 16) -> float | None:
    """Share of ``num_steps`` steps' span (GPU clock) in which the GPU waits for the host between
    one step's last kernel and the next one's first: events recorded around each step's
    forward and sampling. What overlap scheduling hides; None off CUDA."""
    if llm.device.type != "cuda":
        return None
    engine, decoder = llm.model_engine, llm.executor.decoder
    forward, sample = engine.forward, decoder.sample
    marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed_forward(*args, **kwargs):
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        marks.append((begin, torch.cuda.Event(enable_timing=True)))
        return forward(*args, **kwargs)

    def timed_sample(*args, **kwargs):
        tokens = sample(*args, **kwargs)
        marks[-1][1].record()
        return tokens

    engine.forward, decoder.sample = timed_forward, timed_sample
    try:
        for _ in range(num_steps):
            llm.executor.step()
    finally:
        del engine.forward, decoder.sample  # back to the class's methods
    torch.cuda.synchronize()
    gaps = sum(marks[i - 1][1].elapsed_time(marks[i][0]) for i in range(1, len(marks)))
    span = marks[0][0].elapsed_time(marks[-1][1])
    return gaps / span


def decode_table(
    llm: LLM,
    preset: str,
    batch_sizes: list[int],
    bandwidth: float,
    context: int,
    profile_path: str | None = None,
) -> list[dict]:
    """Median decode step of each batch size on ``llm`` (its pool must hold
    ``max(batch_sizes) * (context + 80)`` tokens)."""
    model = llm.model_engine.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.hf_model.parameters())
    kv_bytes_per_token = (
        model.num_layers * 2 * model.num_kv_heads * model.head_dim * model.dtype.itemsize
    )
    executor = llm.executor
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in batch_sizes:
        prompts = torch.randint(10, model.vocab_size - 10, (batch, context - 1), generator=g)
        # Margin: requests that finish prefill early decode while the rest still prefill.
        label = f"{preset}: {batch} requests of context {context}"
        start_decoding(llm, prompts.tolist(), WARMUP_STEPS + TIMED_STEPS + 48, label)
        num_repeated = executor.scheduler.num_repeated_steps
        seconds = timed_steps(llm)
        num_repeated = executor.scheduler.num_repeated_steps - num_repeated
        stats = executor.iteration_stats[-TIMED_STEPS:]
        idle = gpu_idle_share(llm)
        if profile_path and batch == max(batch_sizes):  # where the host time of a step goes
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [executor.step() for _ in range(5)])
            with open(profile_path, "w") as f:
                pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(25)
        assert all(s.num_generation_requests == batch for s in stats)
        executor.run()
        step = statistics.median(seconds)
        floor = (weight_bytes + batch * context * kv_bytes_per_token) / bandwidth
        sched = statistics.median(s.scheduling_time for s in stats)
        prep = statistics.median(s.input_prep_time for s in stats)
        rows.append(
            {
                "preset": preset,
                "graphs": llm.model_engine.graph_runner is not None,
                "overlap": llm.executor.overlap,
                "batch": batch,
                "step_ms": round(step * 1e3, 2),
                "floor_ms": round(floor * 1e3, 2),
                "ratio": round(step / floor, 2),
                "sched_ms": round(sched * 1e3, 3),
                "input_prep_ms": round(prep * 1e3, 3),
                "host_share": round((sched + prep) / step, 3),
                # Steps whose batch the scheduler repeated without asking the policies (of
                # the timed ones and their warm-up; engine.scheduler.Scheduler).
                "steps_repeated": num_repeated,
                "gpu_idle_share": None if idle is None else round(idle, 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--presets", default="llama-8b,llama-1b")
    parser.add_argument("--batches", default="1,8,32,64,128,256")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context", type=int, default=CONTEXT)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--overlap", action="store_true", help="overlap scheduling")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile 5 steps at the largest batch, per preset"
    )
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)  # results go under it
    bandwidth = copy_bandwidth(args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s ({name})")
    rows = []
    for preset in args.presets.split(","):
        batches = [int(b) for b in args.batches.split(",")]
        llm = build_llm(preset, args.device, args.context, args.enforce_eager, overlap=args.overlap)
        profile = str(Path(args.out, f"profile-{preset}.txt")) if args.profile else None
        rows += decode_table(llm, preset, batches, bandwidth, args.context, profile)
        llm.release_gpu_memory()
        del llm
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        Path(args.out, "decode_steps.json").write_text(
            json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=1)
        )
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("\npreset     batch  step ms  floor ms  ratio  sched ms  input ms  host share  gpu idle")
    for r in rows:
        idle = r.get("gpu_idle_share")
        print(
            f"{r['preset']:9s} {r['batch']:6d} {r['step_ms']:8.2f} {r['floor_ms']:9.2f} "
            f"{r['ratio']:6.2f} {r['sched_ms']:9.3f} {r['input_prep_ms']:9.3f} "
            f"{r['host_share']:10.3f} {'-' if idle is None else f'{idle:9.3f}'}"
        )


if __name__ == "__main__":
    main()
