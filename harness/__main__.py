"""``python -m harness``: until the Hydra harness lands, a short generation on the default setup.

Runs 16 requests with staggered arrivals through the real executor (tiny preset, device auto),
under GUARANTEED_NO_EVICT and MAX_UTILIZATION on a deliberately small KV pool, and prints a
per-policy summary with vLLM's metric names.
"""

from __future__ import annotations

import statistics
import sys

import torch

from engine import LLM, SamplingParams


def summarize(name: str, llm: LLM, outputs) -> dict[str, str]:
    done = [o for o in outputs if o.finish_reason != "rejected"]
    ttft = [o.metrics.ttft * 1e3 for o in done]
    tpot = [o.metrics.tpot * 1e3 for o in done if o.metrics.tpot is not None]
    start = min(o.metrics.arrival_time for o in outputs)
    end = max(o.metrics.finish_time for o in outputs)
    stats = llm.executor.iteration_stats
    return {
        "policy": name,
        "completed": str(len(done)),
        "mean_ttft_ms": f"{statistics.fmean(ttft):.1f}",
        "mean_tpot_ms": f"{statistics.fmean(tpot):.1f}" if tpot else "-",
        "output_throughput": f"{sum(len(o.token_ids) for o in done) / (end - start):.0f}",
        "preemptions": str(sum(o.metrics.num_preemptions for o in outputs)),
        "peak_kv_util": f"{max(s.kv_utilization for s in stats):.2f}",
        "iterations": str(len(stats)),
    }


def main() -> int:
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, 259, (int(n),), generator=g).tolist()
        for n in torch.randint(8, 64, (16,), generator=g)
    ]
    arrivals = [0.002 * i for i in range(len(prompts))]
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    rows = []
    for policy in ("guaranteed_no_evict", "max_utilization"):
        llm = LLM(
            "llama-tiny",
            capacity_scheduler=policy,
            microbatch_scheduler=dict(
                max_batch_size=16, max_num_tokens=128, chunking="first_come_first_served"
            ),
            kv_cache_manager=dict(tokens_per_block=8, num_blocks=48),
        )
        outputs = llm.generate(prompts, params, arrival_times=arrivals)
        rows.append(summarize(policy, llm, outputs))
    print(f"model llama-tiny on {llm.device} ({llm.dtype}); 16 requests, 32 output tokens each")
    keys = list(rows[0])
    widths = [max(len(k), *(len(r[k]) for r in rows)) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True)))
    for row in rows:
        print("  ".join(row[k].rjust(w) for k, w in zip(keys, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
