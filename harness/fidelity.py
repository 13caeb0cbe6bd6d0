"""Fidelity of the simulated engine: the same runs real and simulated, metric by metric.

    python -m harness experiment=fcfs_vs_maxutil output_root=real                    # on the GPU
    python -m harness experiment=fcfs_vs_maxutil output_root=sim executor.engine=sim # anywhere
    python -m harness.fidelity real/fcfs_vs_maxutil/<time> sim/fcfs_vs_maxutil/<time> [--out DIR]

Both paths are run or sweep directories (``harness.results.load``); sweep runs are matched by
their overrides, ignoring ``executor.*`` and ``output_root`` (the keys that pick the engine).
For each matched pair and each metric (P50/P90/P99 of TTFT, TPOT and E2E latency; output and
request throughput) it reports the relative error ``(sim - real) / real`` and whether it is
within the target (5% for latencies, 3% for throughputs), prints the table, and writes
``fidelity.csv`` and ``fidelity.png`` (errors per metric, targets shaded) under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

LATENCY_METRICS = tuple(
    f"p{p}_{name}_ms" for name in ("ttft", "tpot", "e2el") for p in (50, 90, 99)
)
THROUGHPUT_METRICS = ("output_throughput", "request_throughput")
TARGETS = {**dict.fromkeys(LATENCY_METRICS, 0.05), **dict.fromkeys(THROUGHPUT_METRICS, 0.03)}
# Overrides that choose how a run executes, not what it runs: ignored when pairing runs.
ENGINE_KEYS = ("executor.", "output_root", "hydra.", "progress")


def run_summaries(path: Path) -> dict[str, dict]:
    """{variant key: summary} of the ok runs under ``path`` (a run or a sweep directory)."""
    from harness.results import RunResult, load

    result = load(path)
    runs = [result] if isinstance(result, RunResult) else result.runs
    summaries = {}
    for run in runs:
        if run.status != "ok":
            continue
        overrides = {k: v for k, v in run.overrides.items() if not k.startswith(ENGINE_KEYS)}
        key = ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "run"
        summaries[key] = run.summary
    if not summaries:
        raise ValueError(f"{path}: no successful run to compare")
    return summaries


def compare(real: dict[str, dict], sim: dict[str, dict]) -> pd.DataFrame:
    """One row per (variant, metric): real, sim, relative error, target, within target."""
    common = sorted(set(real) & set(sim))
    if not common:
        raise ValueError(
            f"no run in common: real has {sorted(real)}, sim has {sorted(sim)} (runs are paired "
            "by their overrides, ignoring executor.* and output_root)"
        )
    rows = []
    for variant in common:
        for metric, target in TARGETS.items():
            r, s = real[variant].get(metric), sim[variant].get(metric)
            error = (s - r) / r if r and s is not None else float("nan")
            rows.append(
                {
                    "variant": variant,
                    "metric": metric,
                    "real": r,
                    "sim": s,
                    "relative_error": error,
                    "target": target,
                    "within_target": abs(error) <= target,
                }
            )
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(table["variant"]))
    metrics = list(TARGETS)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(metrics) * len(variants) ** 0.5), 4))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        rows = table[table["variant"] == variant].set_index("metric").reindex(metrics)
        xs = [m + (i - (len(variants) - 1) / 2) * width for m in range(len(metrics))]
        ax.bar(xs, 100 * rows["relative_error"], width, label=variant)
    for m, metric in enumerate(metrics):
        target = 100 * TARGETS[metric]
        ax.fill_between([m - 0.45, m + 0.45], -target, target, color="green", alpha=0.12)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(metrics)), [m.removesuffix("_ms") for m in metrics], rotation=45)
    ax.set_ylabel("sim vs real (%)")
    ax.set_title("Simulated engine fidelity (shaded: target)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.fidelity", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("real", type=Path, help="run or sweep directory of the real engine")
    parser.add_argument("sim", type=Path, help="the same runs on executor.engine=sim")
    parser.add_argument("--out", type=Path, default=None, help="default: the sim directory")
    args = parser.parse_args(argv)
    try:
        table = compare(run_summaries(args.real), run_summaries(args.sim))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or args.sim
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "fidelity.csv", index=False)
    plot(table, out / "fidelity.png")
    shown = table.assign(
        relative_error=(100 * table["relative_error"]).round(2).astype(str) + "%",
        target=(100 * table["target"]).round(0).astype(int).astype(str) + "%",
    )
    print(shown.to_string(index=False))
    within = int(table["within_target"].sum())
    print(f"\n{within}/{len(table)} within target; wrote {out / 'fidelity.csv'} and fidelity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
