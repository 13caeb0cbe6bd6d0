"""Our engine against transformers and the roofline, on the reference workload, in one run.

    PYTHONPATH=. python bench/peers.py --out $OUT                      # H100: llama-1b, llama-8b
    PYTHONPATH=. python bench/peers.py --device cpu --presets llama-tiny \\
        --num-requests 16 --prompt-range 16,128 --output-len 16          # a smoke run on a CPU

Reference workload (../shared/reference/anchors.md): 256 requests, prompt lengths uniform in
[128, 1024) drawn with `torch.Generator().manual_seed(1)`, then each prompt's ids in order, 128
output tokens each with EOS ignored, all arriving at t=0. Measured side by side:
  ours           LLM.generate (GUARANTEED_NO_EVICT, FCFS chunking, max_num_tokens 8192)
  hf_static      transformers generate(), static batches of 64 sorted by length, left-padded
  hf_continuous  transformers generate_batch() (continuous batching), defaults
  floor          prefill FLOPs at the matmul rate + each decode step reading all weights and
                 the batch's KV at the copy bandwidth, both measured in this run
Prints seconds, output tokens/s, our speed-up over each peer and the floor's fraction, the GPU
memory beyond weights and KV pool, then the decode-step table of ``bench/decode_steps.py``
(batch 1 .. 256 at context 1,024 against the memory floor, with the host's share) measured on
the same engine.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
from transformers import GenerationConfig

import kernels
from engine import LLM, SamplingParams

try:  # run as a script (bench/ on sys.path) or as bench.peers
    from decode_steps import decode_table, print_table
except ImportError:
    from bench.decode_steps import decode_table, print_table


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_prompts(vocab: int, num: int, low: int, high: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(low, high, (num,), generator=g)
    return [torch.randint(10, vocab - 10, (int(n),), generator=g).tolist() for n in lengths]


def timed(device: str, fn):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def machine_rates(device: str) -> tuple[float, float]:
    """(copy bytes/s read+written, matmul FLOP/s) measured here."""
    n = 2**30 if device.startswith("cuda") else 2**26
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    seconds, _ = timed(device, lambda: [y.copy_(x) for _ in range(10)])
    bandwidth = 2 * n * 10 / seconds
    size = 8192 if device.startswith("cuda") else 1024
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    seconds, _ = timed(device, lambda: [a @ b for _ in range(10)])
    return bandwidth, 2 * size**3 * 10 / seconds


def roofline(hf_model, prompts, output_len: int, bandwidth: float, flops: float) -> float:
    params = sum(p.numel() for p in hf_model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    config = hf_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_bytes = (
        config.num_hidden_layers
        * 2
        * config.num_key_value_heads
        * head_dim
        * next(hf_model.parameters()).element_size()
    )
    prefill = 2 * params * sum(map(len, prompts)) / flops
    total_prompt = sum(map(len, prompts))
    decode = sum(
        (weight_bytes + (total_prompt + step * len(prompts)) * kv_bytes) / bandwidth
        for step in range(output_len)
    )
    return prefill + decode


def hf_static(hf_model, prompts, output_len: int, batch: int) -> list[list[int]]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: dict[int, list[int]] = {}
    for first in range(0, len(order), batch):
        ids = order[first : first + batch]
        width = max(len(prompts[i]) for i in ids)
        input_ids = torch.zeros((len(ids), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(ids):  # left padding
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        out = hf_model.generate(
            input_ids.to(hf_model.device),
            attention_mask=mask.to(hf_model.device),
            max_new_tokens=output_len,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        for row, i in enumerate(ids):
            outputs[i] = out[row, width:].tolist()
    return [outputs[i] for i in range(len(prompts))]


def hf_continuous(hf_model, prompts, output_len: int) -> list[list[int]]:
    config = GenerationConfig(
        max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    out = hf_model.generate_batch(prompts, generation_config=config)
    by_id = {int(k.removeprefix("req_")): v.generated_tokens for k, v in out.items()}
    return [by_id[i] for i in range(len(prompts))]


def run_preset(preset: str, args, bandwidth: float, flops: float) -> tuple[dict, list[dict]]:
    """The peer row of ``preset`` and its decode-step rows."""
    device = args.device
    is_cuda = device.startswith("cuda")
    dtype = "bfloat16" if is_cuda else "float32"
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
    llm = LLM(
        preset,
        device=device,
        dtype=dtype,
        microbatch_scheduler=dict(
            max_batch_size=256, max_num_tokens=8192, chunking="first_come_first_served"
        ),
        kv_cache_manager=dict(
            tokens_per_block=32,
            free_gpu_memory_fraction=args.kv_fraction,
            max_tokens=None if is_cuda else 65536,
        ),
        enforce_eager=args.enforce_eager,
        piecewise_cuda_graphs=args.piecewise,
        overlap_scheduler=args.overlap,
    )
    if is_cuda:  # the run's own peak, past start-up (profile run, graphs)
        torch.cuda.reset_peak_memory_stats()
    hf_model = llm.model_engine.model.hf_model
    low, high = (int(v) for v in args.prompt_range.split(","))
    prompts = reference_prompts(llm.model_engine.vocab_size, args.num_requests, low, high)
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    seconds = {}
    compiled_before = kernels.compiled_variants()
    keys_before = compiled_keys()
    first_step = len(llm.executor.iteration_stats)
    seconds["ours"], ours = timed(device, partial(llm.generate, prompts, params))
    ours = [o.token_ids for o in ours]
    breakdown = step_breakdown(llm.executor.iteration_stats[first_step:])
    breakdown["kernels_compiled_in_run"] = {
        name: n - compiled_before.get(name, 0)
        for name, n in kernels.compiled_variants().items()
        if n != compiled_before.get(name, 0)
    }
    new_keys = compiled_keys() - keys_before
    if new_keys:  # which specialisation a run met that start-up did not compile
        breakdown["new_variant_keys"] = sorted(new_keys)
    if args.repeat:  # the same workload again: no compilation left, warm allocator
        first_step = len(llm.executor.iteration_stats)
        seconds["ours_again"], _ = timed(device, partial(llm.generate, prompts, params))
        breakdown["again"] = step_breakdown(llm.executor.iteration_stats[first_step:])
    memory = extra_memory(llm) if is_cuda else {}
    is_piecewise = llm.model_engine.piecewise_runner is not None  # before the release below
    decode_rows = []
    if args.decode_batches:
        batches = [int(b) for b in args.decode_batches.split(",")]
        profile = str(Path(args.out, f"host_profile_{preset}.txt"))
        decode_rows = decode_table(llm, preset, batches, bandwidth, args.context, profile)
    # Give the KV pool and the graphs' memory back before transformers allocates its caches,
    # and before the next preset sizes its pool from the free memory.
    llm.release_gpu_memory()
    theirs = {}
    for peer in filter(None, args.peers.split(",")):
        if peer == "hf_static":
            run = partial(hf_static, hf_model, prompts, args.output_len, 64)
        elif peer == "hf_continuous":
            run = partial(hf_continuous, hf_model, prompts, args.output_len)
        else:
            raise SystemExit(f"unknown peer {peer!r}: hf_static, hf_continuous")
        seconds[peer], theirs[peer] = timed(device, run)
    floor = roofline(hf_model, prompts, args.output_len, bandwidth, flops)
    num_out = args.num_requests * args.output_len
    row = {
        "preset": preset,
        "device": torch.cuda.get_device_name() if is_cuda else "cpu",
        "cuda_graphs": not args.enforce_eager and is_cuda,
        "piecewise_cuda_graphs": is_piecewise,
        "overlap_scheduler": args.overlap,
        "prompt_tokens": sum(map(len, prompts)),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "output_tok_s": {k: round(num_out / v, 1) for k, v in seconds.items()},
        "speedup": {
            k: round(v / seconds["ours"], 2) for k, v in seconds.items() if not k.startswith("ours")
        },
        "floor_s": round(floor, 3),
        "fraction_of_floor": round(floor / seconds["ours"], 3),
        "memory_gib": memory,
        "start_up_memory_gib": getattr(llm, "memory_profile", {}),
        "steps": breakdown,
        # Greedy paths of different kernels diverge after near-ties in 16-bit; count agreement.
        "same_tokens_as": {
            k: sum(a == b for a, b in zip(ours, v, strict=True)) for k, v in theirs.items()
        },
    }
    return row, decode_rows


def step_breakdown(stats) -> dict:
    """Where the run's time went: steps with context tokens (eager) vs decode-only steps."""
    context = [s for s in stats if s.num_context_tokens]
    decode = [s for s in stats if not s.num_context_tokens]
    return {
        "num_steps": len(stats),
        "num_context_steps": len(context),
        "context_steps_s": round(sum(s.step_latency for s in context), 3),
        "decode_steps_s": round(sum(s.step_latency for s in decode), 3),
        "scheduling_s": round(sum(s.scheduling_time for s in stats), 3),
        "input_prep_s": round(sum(s.input_prep_time for s in stats), 3),
    }


def compiled_keys() -> set[str]:
    return {
        f"{fn.__name__} {key}"
        for fn in kernels.JIT_FUNCTIONS
        for cache in getattr(fn, "device_caches", {}).values()
        for key in (cache[0] if isinstance(cache, tuple) else cache)
    }


def extra_memory(llm: LLM) -> dict:
    """GPU memory beyond the weights and the KV pool, in GiB: the allocator's peak (activations,
    logits, graph pools, workspaces) and the device's current use (adds the CUDA context and
    library handles, which the allocator does not see)."""
    model = llm.model_engine.model
    weights = sum(p.numel() * p.element_size() for p in model.hf_model.parameters())
    pool = llm.kv_cache_manager.kv_pool
    pool_bytes = pool.numel() * pool.element_size()
    free, total = torch.cuda.mem_get_info(llm.device)
    gib = 2**30
    return {
        "weights": round(weights / gib, 2),
        "kv_pool": round(pool_bytes / gib, 2),
        "peak_allocated_beyond": round(
            (torch.cuda.max_memory_allocated() - weights - pool_bytes) / gib, 2
        ),
        "peak_reserved_beyond": round(
            (torch.cuda.max_memory_reserved() - weights - pool_bytes) / gib, 2
        ),
        "device_used_beyond": round((total - free - weights - pool_bytes) / gib, 2),
        "device_total": round(total / gib, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--presets", default="llama-1b,llama-8b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-range", default="128,1024")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--kv-fraction", type=float, default=0.9)
    parser.add_argument("--repeat", action="store_true", help="time our run a second time")
    parser.add_argument("--peers", default="hf_static,hf_continuous", help="'' for none")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument(
        "--piecewise",
        action=argparse.BooleanOptionalAction,
        help="steps with prompt tokens as piecewise CUDA graphs (default: where they can run)",
    )
    parser.add_argument(
        "--overlap", action="store_true", help="overlap scheduling (schedule n+1 while n runs)"
    )
    parser.add_argument("--decode-batches", default="1,8,32,64,128,256", help="'' to skip")
    parser.add_argument("--context", type=int, default=1024, help="decode-step context")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)  # results go under it
    bandwidth, flops = machine_rates(args.device)
    print(f"copy {bandwidth / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    rows, decode_rows = [], []
    for preset in args.presets.split(","):
        row, decodes = run_preset(preset, args, bandwidth, flops)
        rows.append(row)
        decode_rows += decodes
        print(row, flush=True)
        result = {"bandwidth": bandwidth, "flops": flops, "peers": rows, "decode": decode_rows}
        Path(args.out, "peers.json").write_text(json.dumps(result, indent=1))
    peers = [p for p in ("hf_static", "hf_continuous") if p in rows[0]["seconds"]]
    again = "ours_again" in rows[0]["seconds"]
    print("\npreset     ours s  out tok/s" + ("  again s" if again else ""), end="")
    print("".join(f"{p + ' s':>16s}" for p in peers), end="")
    print("  floor s  " + "".join(f"{'x ' + p:>16s}" for p in peers) + "  of floor  extra GiB")
    for r in rows:
        s = r["seconds"]
        print(
            f"{r['preset']:9s} {s['ours']:7.2f}  {r['output_tok_s']['ours']:9.0f}"
            + (f"  {s['ours_again']:7.2f}" if again else "")
            + "".join(f"{s[p]:16.2f}" for p in peers)
            + f"  {r['floor_s']:7.2f}  "
            + "".join(f"{r['speedup'][p]:16.1f}" for p in peers)
            + f"  {r['fraction_of_floor']:8.1%}"
            + f"  {r['memory_gib'].get('peak_reserved_beyond', float('nan')):9.2f}"
        )
    if decode_rows:
        print_table(decode_rows)


if __name__ == "__main__":
    main()
