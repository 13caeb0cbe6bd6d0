"""Why real serving steps are slower than the profiler's points with the same counts.

    PYTHONPATH=. python bench/decode_shapes.py --out $OUT [--preset llama-8b] [--batches 16,64,256]

On the H200 a real Azure run's decode steps took 4-17% longer than the profile predicted for the
same number of sequences and KV tokens (docs/performance.md). The profiler's decode points differ
from serving steps in three ways; each variant below changes one of them, at the same batch size
and the same total KV tokens (B sequences, mean context C):

    uniform    every sequence C tokens, blocks taken in pool order (the profiler's points)
    ragged     contexts spread as a serving run's are (log-normal, mean C, longest 4C): the
               longest sequence bounds a decode program's time
    aged       uniform, but the free list shuffled first, as minutes of serving leave it: each
               sequence's blocks scattered over the whole pool
    sustained  uniform, timed after SUSTAINED_STEPS steps back to back (clocks under load; the
               prompts are shorter by as much, so the timed steps read the same KV)

Prints step time per variant and its ratio to ``uniform``; writes ``decode_shapes.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import OrderedDict
from pathlib import Path

import torch

from bench.decode_steps import TIMED_STEPS, WARMUP_STEPS, build_llm, start_decoding, timed_steps

SUSTAINED_STEPS = 400


def ragged_lengths(batch: int, context: int, seed: int = 0) -> list[int]:
    """``batch`` contexts, log-normal, mean ``context`` (within a token per sequence), none
    longer than ``4 * context`` or shorter than 16."""
    rng = random.Random(seed)
    raw = [min(rng.lognormvariate(0.0, 0.8), 6.0) for _ in range(batch)]
    scale = context / statistics.fmean(raw)
    return [max(16, min(4 * context, round(r * scale))) for r in raw]


def shuffle_free_blocks(llm, seed: int = 0) -> None:
    """Hand out the idle pool's blocks in random order (the pool must be idle)."""
    pool = llm.kv_cache_manager.pool
    if pool.num_used_blocks:
        raise RuntimeError("shuffle the free list of an idle pool only")
    ids = list(pool.free_block_ids)
    random.Random(seed).shuffle(ids)
    pool.free_block_ids = OrderedDict.fromkeys(ids)


def decode_step_ms(llm, lengths: list[int], skip_steps: int = 0) -> float:
    """Median decode step (ms) of requests with prompts of ``lengths`` tokens, all decoding,
    after ``skip_steps`` untimed steps."""
    executor, vocab = llm.executor, llm.model_engine.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab - 10, (n - 1,), generator=g).tolist() for n in lengths]
    new_tokens = WARMUP_STEPS + skip_steps + TIMED_STEPS + 48
    label = f"{len(lengths)} requests of up to {max(lengths)} tokens"
    start_decoding(llm, prompts, new_tokens, label)
    seconds = timed_steps(llm, warmup=WARMUP_STEPS + skip_steps)
    timed = executor.iteration_stats[-TIMED_STEPS:]
    assert all(s.num_generation_requests == len(lengths) for s in timed)
    executor.run()
    return statistics.median(seconds) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--preset", default="llama-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    llm = build_llm(args.preset, args.device, 4 * args.context)
    rows = []
    for batch in map(int, args.batches.split(",")):
        uniform = [args.context] * batch
        times = {"uniform": decode_step_ms(llm, uniform)}
        times["ragged"] = decode_step_ms(llm, ragged_lengths(batch, args.context))
        # Shorter prompts, so that the timed steps read the same KV after the long run.
        shorter = [max(16, args.context - SUSTAINED_STEPS)] * batch
        times["sustained"] = decode_step_ms(llm, shorter, skip_steps=SUSTAINED_STEPS)
        shuffle_free_blocks(llm)  # last: the pool stays shuffled for the next batch size
        times["aged"] = decode_step_ms(llm, uniform)
        for variant, ms in times.items():
            rows.append(
                {
                    "preset": args.preset,
                    "batch": batch,
                    "variant": variant,
                    "step_ms": round(ms, 3),
                    "vs_uniform": round(ms / times["uniform"], 3),
                }
            )
            print(rows[-1], flush=True)
    Path(args.out, "decode_shapes.json").write_text(json.dumps(rows, indent=1))
    print("\npreset     batch  variant     step ms  vs uniform")
    for r in rows:
        print(
            f"{r['preset']:9s} {r['batch']:6d}  {r['variant']:10s} {r['step_ms']:8.2f}"
            f"  {r['vs_uniform']:10.3f}"
        )


if __name__ == "__main__":
    main()
