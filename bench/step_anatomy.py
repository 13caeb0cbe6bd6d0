"""Where the time of one eager (prefill / mixed) step goes, on the device.

    PYTHONPATH=. python bench/step_anatomy.py --out $OUT [--preset llama-1b] [--tokens 16,256,2048]
        [--fast-launch | --no-fast-launch] [--piecewise]

For each prompt length T, one request of T tokens is admitted and its prefill step timed
(synchronised on both sides), then the same with 255 decodes resident. The slowest prefill's
step runs under ``torch.profiler`` and ``cProfile``; the top entries of both are written to OUT,
with the figures as ``anatomy_<preset>.json``.
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

import kernels
from bench.decode_steps import build_llm, synchronize
from engine import SamplingParams
from engine.sim.profiler import overridden


def timed_step(llm) -> float:
    synchronize(str(llm.device))
    start = time.perf_counter()
    llm.executor.step()
    synchronize(str(llm.device))
    return time.perf_counter() - start


def prefill_times(llm, length: int, repeats: int, g: torch.Generator) -> list[float]:
    vocab = llm.model_engine.vocab_size
    seconds = []
    for _ in range(repeats):
        prompt = torch.randint(10, vocab - 10, (length,), generator=g).tolist()
        (request,) = llm.make_requests([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
        llm.executor.enqueue_requests([request])
        seconds.append(timed_step(llm))
        llm.executor.run()
    return seconds


def decode_times(llm, resident: int, batch: int, g: torch.Generator) -> list[float]:
    """Decode steps of ``batch`` requests while ``resident`` requests hold the engine."""
    vocab = llm.model_engine.vocab_size
    length = min(511, llm.model_engine.max_seq_len - 80)
    prompts = torch.randint(10, vocab - 10, (resident, length), generator=g).tolist()
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    requests = llm.make_requests(prompts, params)
    llm.executor.enqueue_requests(requests)
    while not all(r.is_generation or r.is_finished for r in requests):
        llm.executor.step()
    with overridden(llm.microbatch_scheduler, max_batch_size=batch):
        seconds = [timed_step(llm) for _ in range(12)][2:]
    llm.executor.run()
    return seconds


def host_phases(llm, length: int, g: torch.Generator) -> dict[str, float]:
    """One prefill step of ``length`` tokens, split as the executor records it: the forward's
    host time until its kernels were queued, and the forward with the wait for the device
    (whatever path ran it: eager, decode graph or piecewise graphs)."""
    vocab = llm.model_engine.vocab_size
    prompt = torch.randint(10, vocab - 10, (length,), generator=g).tolist()
    (request,) = llm.make_requests([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
    llm.executor.enqueue_requests([request])
    step_ms = timed_step(llm) * 1e3
    stats = llm.executor.iteration_stats[-1]
    llm.executor.run()
    return {
        "forward_enqueue_ms": stats.forward_enqueue_time * 1e3,
        "forward_total_ms": stats.forward_time * 1e3,
        "step_ms": step_ms,
    }


def launch_costs(device: str, hidden: int) -> dict[str, float]:
    """Host microseconds per call of a Triton kernel and of a torch GEMM on tiny inputs."""
    x = torch.randn(16, hidden, device=device, dtype=torch.bfloat16)
    w = torch.randn(hidden, device=device, dtype=torch.bfloat16)
    m = torch.randn(hidden, hidden, device=device, dtype=torch.bfloat16)
    out = {}
    for name, fn in (
        ("triton_rms_norm_us", lambda: kernels.rms_norm(x, w, 1e-5)),
        ("torch_linear_us", lambda: torch.nn.functional.linear(x, m)),
        ("torch_add_us", lambda: x + x),
    ):
        for _ in range(10):
            fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(200):
            fn()
        out[name] = (time.perf_counter() - start) / 200 * 1e6
        synchronize(device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--tokens", default="16,256,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--decodes", default="1:1,256:1,16:16,256:16", help="RESIDENT:BATCH decode points"
    )
    parser.add_argument(
        "--fast-launch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch cached compiled Triton kernels directly (kernels/launch.py); default: "
        "the SCHEDLAB_FAST_LAUNCH environment variable",
    )
    parser.add_argument(
        "--piecewise",
        action=argparse.BooleanOptionalAction,
        help="steps with prompt tokens as piecewise CUDA graphs (default: where they can run)",
    )
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)  # results go under it
    out = Path(args.out)
    if args.fast_launch is not None:
        kernels.use_fast_launch(args.fast_launch)
    llm = build_llm(args.preset, args.device, 1024, piecewise=args.piecewise)
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in map(int, args.tokens.split(",")):
        seconds = prefill_times(llm, length, args.repeats, g)
        rows.append((length, statistics.median(seconds) * 1e3, min(seconds) * 1e3))
    decodes = []
    for point in args.decodes.split(","):
        resident, batch = map(int, point.split(":"))
        seconds = decode_times(llm, resident, batch, g)
        decodes.append((resident, batch, statistics.median(seconds) * 1e3))
    phases = [host_phases(llm, n, g) for n in map(int, args.tokens.split(","))]
    costs = launch_costs(args.device, llm.model_engine.model.hf_model.config.hidden_size)
    length = int(args.tokens.split(",")[0])
    vocab = llm.model_engine.vocab_size
    prompt = torch.randint(10, vocab - 10, (length,), generator=g).tolist()
    (request,) = llm.make_requests([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
    llm.executor.enqueue_requests([request])
    acts = [torch.profiler.ProfilerActivity.CPU]
    if llm.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        timed_step(llm)
    llm.executor.run()
    averages = prof.key_averages()
    (out / f"torch_profile_{args.preset}.txt").write_text(
        averages.table(sort_by="self_cpu_time_total", row_limit=30)
        + "\n"
        + averages.table(sort_by="self_device_time_total", row_limit=20)
    )
    (request,) = llm.make_requests([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
    llm.executor.enqueue_requests([request])
    profiler = cProfile.Profile()
    profiler.runcall(lambda: timed_step(llm))
    llm.executor.run()
    with open(out / f"cprofile_{args.preset}.txt", "w") as f:
        pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(30)
    summary = {
        "preset": args.preset,
        "fast_launch": kernels.LAUNCHERS[0].enabled,
        "piecewise": llm.model_engine.piecewise_runner is not None,
        "prefill_ms": {length: median for length, median, _ in rows},
        "phases_ms": dict(zip(args.tokens.split(","), phases, strict=True)),
        "decode_ms": {f"{r}:{b}": median for r, b, median in decodes},
        "launch_us": costs,
    }
    (out / f"anatomy_{args.preset}.json").write_text(json.dumps(summary, indent=1))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12))
    print("\npreset    tokens  median ms  min ms")
    for length, median, low in rows:
        print(f"{args.preset:9s} {length:6d} {median:10.2f} {low:7.2f}")
    print(f"fast launch {kernels.LAUNCHERS[0].enabled}: {kernels.num_fast_launches()} launches")
    piecewise = llm.model_engine.piecewise_runner
    if piecewise is not None:
        print(
            f"piecewise CUDA graphs: {piecewise.num_steps} steps, buckets {piecewise.token_sizes}"
        )
    print("launch costs", {k: round(v, 1) for k, v in costs.items()})
    for length, times in zip(args.tokens.split(","), phases, strict=True):
        print(f"prefill {length}: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()))
    print("\nresident  batch  decode ms")
    for resident, batch, median in decodes:
        print(f"{resident:8d} {batch:6d} {median:10.3f}")


if __name__ == "__main__":
    main()
