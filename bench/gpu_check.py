"""One GPU session's checks and timings for the executor core (torch reference attention).

    PYTHONPATH=. python bench/gpu_check.py [--out DIR] [--presets llama-1b,llama-8b]

1. token-exact greedy output on CUDA (float32) against transformers generate() on the same GPU,
   for the tiny presets, under MAX_UTILIZATION with chunking, reuse and a pool small enough to
   preempt;
2. the reference workload of ../shared/reference/anchors.md (256 requests, prompts 128..1023,
   128 output tokens, all at t=0, seeded) through LLM on llama-1b / llama-8b in bf16: wall time,
   output tokens/s, preemptions, KV pool size, peak GPU memory;
3. bf16 agreement with transformers generate() on a few prompts (informational: bf16 kernels
   differ, so greedy paths may diverge after a near-tie).
Prints a short table last; writes a JSON log under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from engine import LLM, SamplingParams
from engine.models import load_model
from tests.test_generate_equivalence import hf_greedy


def check_tiny_exact(preset: str, attention_backend: str = "auto") -> dict:
    hf = load_model(preset, device="cuda", dtype=torch.float32, seed=0).hf_model
    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, 259, (16,), generator=g).tolist()
    prompts = [
        system + torch.randint(3, 259, (int(n),), generator=g).tolist() for n in (14, 3, 20, 9)
    ]
    prompts += [torch.randint(3, 259, (int(n),), generator=g).tolist() for n in (30, 7)]
    expected = [hf_greedy(hf, p, 24) for p in prompts]
    llm = LLM(
        hf,
        device="cuda",
        dtype="float32",
        capacity_scheduler="max_utilization",
        microbatch_scheduler=dict(max_batch_size=4, max_num_tokens=16, chunking="equal_progress"),
        kv_cache_manager=dict(tokens_per_block=4, num_blocks=24, enable_block_reuse=True),
        attention_backend=attention_backend,
        enforce_eager=attention_backend == "torch",
    )
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
    return {
        "preset": preset,
        "attention": llm.model_engine.model.attention_backend,
        "graph_steps": llm.model_engine.num_graph_steps,
        "exact": sum(o.token_ids == e for o, e in zip(outs, expected, strict=True)),
        "of": len(prompts),
        "preemptions": sum(o.metrics.num_preemptions for o in outs),
        "cached_tokens": sum(o.metrics.num_cached_tokens for o in outs),
    }


def reference_prompts(vocab: int, num: int = 256):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(128, 1024, (num,), generator=g)
    return [torch.randint(10, vocab - 10, (int(n),), generator=g).tolist() for n in lengths]


def reference_workload(
    preset: str, capacity: str, kv_fraction: float, attention_backend: str = "auto"
) -> dict:
    torch.cuda.reset_peak_memory_stats()
    llm = LLM(
        preset,
        device="cuda",
        dtype="bfloat16",
        capacity_scheduler=capacity,
        microbatch_scheduler=dict(
            max_batch_size=256, max_num_tokens=8192, chunking="first_come_first_served"
        ),
        kv_cache_manager=dict(tokens_per_block=32, free_gpu_memory_fraction=kv_fraction),
        attention_backend=attention_backend,
        enforce_eager=attention_backend == "torch",
    )
    prompts = reference_prompts(llm.model_engine.vocab_size)
    params = SamplingParams(max_new_tokens=128, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    num_warmup_steps = len(llm.executor.iteration_stats)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    num_out = sum(len(o.token_ids) for o in outs)
    stats = llm.executor.iteration_stats[num_warmup_steps:]
    steps = len(stats)
    sched = sum(s.scheduling_time for s in stats) / max(len(stats), 1)
    result = {
        "preset": preset,
        "capacity": capacity,
        "attention": llm.model_engine.model.attention_backend,
        "seconds": round(seconds, 2),
        "output_tok_s": round(num_out / seconds, 1),
        "prompt_tokens": sum(map(len, prompts)),
        "completed": sum(o.finish_reason == "length" for o in outs),
        "preemptions": sum(o.metrics.num_preemptions for o in outs),
        "kv_blocks": llm.kv_cache_manager.num_blocks,
        "steps": steps,
        "mean_sched_ms": round(sched * 1e3, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }
    # bf16 agreement with transformers (informational).
    hf = llm.model_engine.model.hf_model
    few = [p[:200] for p in prompts[:4]]
    ours = [
        o.token_ids for o in llm.generate(few, SamplingParams(max_new_tokens=32, ignore_eos=True))
    ]
    theirs = [hf_greedy(hf, p, 32) for p in few]
    agree = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), 32)
        for x, y in zip(ours, theirs, strict=True)
    ]
    result["bf16_tokens_agreeing_before_divergence"] = agree
    del llm, hf
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--presets", default="llama-1b,llama-8b")
    parser.add_argument("--capacities", default="guaranteed_no_evict,max_utilization")
    # Of the memory left after the weights and the profiled largest step.
    parser.add_argument("--kv-fraction", type=float, default=0.9)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)  # results go under it
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    print(env, flush=True)
    log = {"env": env, "tiny": [], "reference": []}
    for preset in (
        () if args.skip_tiny else ("llama-tiny", "qwen2-tiny", "qwen3-tiny", "mistral-tiny")
    ):
        log["tiny"].append(check_tiny_exact(preset, args.attention_backend))
        print(log["tiny"][-1], flush=True)
    for preset in filter(None, args.presets.split(",")):
        for capacity in args.capacities.split(","):
            log["reference"].append(
                reference_workload(preset, capacity, args.kv_fraction, args.attention_backend)
            )
            print(log["reference"][-1], flush=True)
            Path(args.out, "gpu_check.json").write_text(json.dumps(log, indent=1))
    print("\n== tiny presets, CUDA float32 vs transformers generate() ==")
    for row in log["tiny"]:
        print(
            f"{row['preset']:13s} {row['attention']:6s} exact {row['exact']}/{row['of']}  "
            f"preemptions {row['preemptions']}  cached tokens {row['cached_tokens']}"
        )
    print("\n== reference workload (256 req, 128 out), bf16 ==")
    for row in log["reference"]:
        print(
            f"{row['preset']:9s} {row['capacity']:20s} {row['attention']:6s} "
            f"{row['seconds']:7.2f} s  "
            f"{row['output_tok_s']:8.1f} out tok/s  preempt {row['preemptions']:4d}  "
            f"steps {row['steps']}  sched {row['mean_sched_ms']} ms/step  "
            f"peak {row['peak_gib']} GiB"
        )


if __name__ == "__main__":
    main()
