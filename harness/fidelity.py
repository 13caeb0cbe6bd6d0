"""Fidelity of the simulated engine: the same runs real and simulated, metric by metric.

    python -m harness experiment=fcfs_vs_maxutil output_root=real                    # on the GPU
    python -m harness experiment=fcfs_vs_maxutil output_root=sim executor.engine=sim # anywhere
    python -m harness.fidelity real/fcfs_vs_maxutil/<time> sim/fcfs_vs_maxutil/<time> [--out DIR]

Both paths are run or sweep directories (``harness.results.load``); sweep runs are matched by
their overrides, ignoring ``executor.*`` and ``output_root`` (the keys that pick the engine).
For each matched pair and each metric (P50/P90/P99 of TTFT, TPOT and E2E latency; output and
request throughput) it reports the relative error ``(sim - real) / real`` and whether it is
within the target (5% for latencies, 3% for throughputs), prints the table, and writes
``fidelity.csv`` and ``fidelity.png`` (errors per metric, targets shaded) under ``--out``, with
``latency_cdf.png``: each variant's TTFT, TPOT and E2E latency over its requests, real and
simulated (``plot_distributions``: which requests a percentile's error comes from).

``--profile PROFILE`` also checks the cost model step by step: every step of the real runs
(``iterations.parquet`` holds each step's work as the cost model sees it) is predicted from the
profile and compared with its measured time, per kind of step and size (``steps.csv``), and
plotted predicted against measured (``steps.png``). Where the
end metrics are off, this says which steps the profile mispredicts, with no simulation between.
With a profile that fits the host's time apart, it also gives each real run's host time over the
profile's (``host_time.csv``): a real run on a host more than 10% off the simulated one
(``executor.sim_host_time_scale``) is named, with the scale that simulates it. Its
``device_time_scale`` column is the run's GPU against the profile's
(``executor.sim_device_time_scale``). A host that changes speed within a run is replayed with
``executor.sim_host_timeline`` (``python -m harness.calibrate --host-timeline``). Where the
simulation ran with a power cap (``executor.sim_power``), each real step's device time is
predicted with it too, read on the real run's own timeline.

The second directory may also be another real run of the same workload: the table is then the
real engine's own spread, the floor under any simulator's error on that workload
(docs/performance.md measures it for the Azure window). ``--spread REAL2`` puts that beside
the simulator's error: a ``real_spread`` column, ``(real2 - real) / real``, and a black mark
per metric in the plot.

Several real directories (repeats of the same runs: ``REAL1 REAL2 REAL3 SIM``) make the
reference their median, metric by metric, which one noisy run cannot move; ``real_low`` and
``real_high`` give the lowest and highest of the real runs against that median (their spread,
a black bar per metric in the plot), and ``within_spread`` whether the simulator's error lies
inside it. On a load that queues the real engine's TTFT P50 moves by 20% from run to run
(docs/performance.md): a 5% target there means something only against such a median.

A latency percentile's ``rank_error`` says where the simulated value falls among the real
requests, in percentile points against its own. On a load that queues, few requests may wait
for a time between "hardly" and "a long while", and the percentiles there lie far apart (one
Azure window: P40 657 ms, P50 1,502 ms). A simulated P50 of 1,203 ms is then 20% off in value
but 2.3 points in rank: a few more requests served before the queue, not a slower queue. The
run names the misses within ``RANK_CLOSE`` points.

Sweeps are run to compare their runs, so for two or more paired runs it also reports each
run's effect against a baseline run (``--baseline TEXT``: the run whose overrides contain
TEXT; by default the first, e.g. ``guaranteed_no_evict`` before ``max_utilization``), real and
simulated, on every metric: ``effects.csv`` (``harness.fidelity.effects``) and
``effects.png``. The machine of the day moves a sweep's absolute numbers by more than it moves
the difference a policy makes (docs/performance.md, "Effects").
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from engine.sim.cost_model import STEP_KINDS, HostDeviceCostModel

if TYPE_CHECKING:
    from harness.results import RunResult

LATENCY_METRICS = tuple(
    f"p{p}_{name}_ms" for name in ("ttft", "tpot", "e2el") for p in (50, 90, 99)
)
THROUGHPUT_METRICS = ("output_throughput", "request_throughput")
TARGETS = {**dict.fromkeys(LATENCY_METRICS, 0.05), **dict.fromkeys(THROUGHPUT_METRICS, 0.03)}
# The per-request latency each percentile metric is taken over (``with_ranks``).
RANKED = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2el_ms"}
RANK_CLOSE = 2.0  # percentile points: a miss in value this close in rank is named (main)
MAX_DISTRIBUTIONS = 8  # variants drawn in latency_cdf.png (plot_distributions)
# Overrides that choose how a run executes, not what it runs: ignored when pairing runs.
ENGINE_KEYS = ("executor.", "output_root", "hydra.", "progress", "plots")


def run_summaries(path: Path) -> dict[str, dict]:
    """{variant key: summary} of the ok runs under ``path`` (a run or a sweep directory)."""
    from harness.results import RunResult, load

    result = load(path)
    runs = [result] if isinstance(result, RunResult) else result.runs
    summaries = {}
    for run in runs:
        if run.status != "ok":
            continue
        summaries[variant_key(run)] = run.summary
    if not summaries:
        raise ValueError(f"{path}: no successful run to compare")
    return summaries


def request_latencies(paths: list[Path]) -> dict[str, pd.DataFrame]:
    """{variant key: the completed requests' ``ttft_ms``, ``tpot_ms`` and ``e2el_ms``} of the ok
    runs under ``paths``, repeats of a variant pooled: the real distributions a simulated
    percentile is ranked in (``with_ranks``), and either side of ``plot_distributions``."""
    from engine.request import RequestState
    from harness.results import RunResult, load

    frames: dict[str, list[pd.DataFrame]] = {}
    for path in paths:
        result = load(path)
        for run in [result] if isinstance(result, RunResult) else result.runs:
            if run.status != "ok":
                continue
            done = run.requests[run.requests["status"] == RequestState.COMPLETE.value]
            frames.setdefault(variant_key(run), []).append(done[list(RANKED.values())])
    return {variant: pd.concat(parts, ignore_index=True) for variant, parts in frames.items()}


def with_ranks(table: pd.DataFrame, latencies: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """``table`` (``compare``) with ``rank_error``: where each simulated latency percentile
    falls among the real requests (``request_latencies``), in percentile points against its own
    (TTFT P50 simulated at the real runs' 46th percentile: -4). Where few real requests lie
    between two percentiles, a large relative error is a small rank error::

        real TTFT   P40 657 ms ..... (10% of requests) ..... P50 1,502 ms
        sim P50     1,203 ms: -20% in value, the real run's P47.7 (rank error -2.3)

    NaN for throughputs and variants without real requests."""
    ranks = []
    for variant, metric, sim in zip(table["variant"], table["metric"], table["sim"], strict=True):
        match = re.fullmatch(r"p([\d.]+)_(\w+)_ms", metric)
        real = latencies.get(variant)
        column = RANKED.get(match.group(2)) if match else None
        if column is None or real is None or sim is None or sim != sim:
            ranks.append(float("nan"))
            continue
        values = real[column].dropna().to_numpy(dtype=float)
        # the mean of "below" and "at or below": ties count half (scipy's percentileofscore)
        share = 0.5 * (np.mean(values < sim) + np.mean(values <= sim)) if len(values) else np.nan
        ranks.append(100 * share - float(match.group(1)))
    return table.assign(rank_error=ranks)


def variant_key(run) -> str:
    """A run's overrides, less those that pick the engine: the same for its real and sim run."""
    overrides = {k: v for k, v in run.overrides.items() if not k.startswith(ENGINE_KEYS)}
    return ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "run"


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


def with_spread(
    table: pd.DataFrame, real: dict[str, dict], real_again: dict[str, dict]
) -> pd.DataFrame:
    """``table`` (``compare(real, sim)``) with ``real_spread``: how far a second real run of
    each variant lies from the first, per metric (NaN where the second has no such run)."""
    errors = compare(real, real_again).set_index(["variant", "metric"])["relative_error"]
    keys = pd.MultiIndex.from_frame(table[["variant", "metric"]])
    return table.assign(real_spread=errors.reindex(keys).to_numpy())


def median_summaries(
    runs: list[dict[str, dict]],
) -> tuple[dict[str, dict], dict[tuple[str, str], tuple[float, float]]]:
    """Repeats of the same runs (``run_summaries`` of each): per variant that every one has,
    the median of each metric, and per (variant, metric) the lowest and highest relative
    deviation of a run from that median."""
    common = sorted(set.intersection(*(set(r) for r in runs)))
    if not common:
        raise ValueError("the real directories have no run in common (paired by overrides)")
    medians: dict[str, dict] = {}
    spread: dict[tuple[str, str], tuple[float, float]] = {}
    for variant in common:
        medians[variant] = {}
        for metric in TARGETS:
            values = [r[variant].get(metric) for r in runs]
            if any(v is None for v in values):
                continue
            middle = float(pd.Series(values).median())
            medians[variant][metric] = middle
            deviations = [(v - middle) / middle if middle else float("nan") for v in values]
            spread[(variant, metric)] = (min(deviations), max(deviations))
    return medians, spread


def with_real_range(
    table: pd.DataFrame, spread: dict[tuple[str, str], tuple[float, float]]
) -> pd.DataFrame:
    """``table`` (``compare(median, sim)``) with ``real_low`` / ``real_high`` (the real runs'
    range around their median) and ``within_spread`` (the simulator's error inside it)."""
    keys = list(zip(table["variant"], table["metric"], strict=True))
    low = [spread.get(k, (float("nan"),) * 2)[0] for k in keys]
    high = [spread.get(k, (float("nan"),) * 2)[1] for k in keys]
    table = table.assign(real_low=low, real_high=high)
    return table.assign(
        within_spread=(table.real_low <= table.relative_error)
        & (table.relative_error <= table.real_high)
    )


def baseline_of(variants: list[str], baseline: str | None) -> str:
    """The variant the others are compared with: the one whose key contains ``baseline``, or
    the first (runs sort by their overrides: ``guaranteed_no_evict`` before
    ``max_utilization``)."""
    if baseline is None:
        return variants[0]
    found = [v for v in variants if baseline in v]
    if len(found) != 1:
        raise ValueError(
            f"--baseline {baseline!r} must name one run of {variants}: it matches {found}"
        )
    return found[0]


def direction(effect: float, target: float) -> str:
    """``higher``, ``lower`` or ``same`` (within ``target`` of no change)."""
    if abs(effect) <= target:
        return "same"
    return "higher" if effect > 0 else "lower"


def effects(
    reals: list[dict[str, dict]], sim: dict[str, dict], baseline: str | None = None
) -> pd.DataFrame:
    """What a sweep is run for: each variant against a baseline variant, real and simulated.

    A variant's effect on a metric is ``value / baseline's value - 1`` in the same sweep (a
    policy that cuts TTFT P50 from 20 to 15 ms: -25%). ``real_effect`` is the median over the
    real sweeps ``reals`` (repeats), each sweep's variant against that sweep's own baseline
    (the same machine, minutes apart); ``real_low``/``real_high`` their range.
    ``difference`` is ``sim_effect - real_effect`` (points), ``within_target`` whether it is
    inside the metric's target, and ``same_direction`` whether both say higher, lower or the
    same (within the target of no change). One row per (variant, metric), baseline
    excluded; empty with fewer than two variants in common."""
    common = sorted(set(sim).intersection(*(set(r) for r in reals)))
    if len(common) < 2:
        return pd.DataFrame()
    base = baseline_of(common, baseline)
    rows = []
    for variant in (v for v in common if v != base):
        for metric, target in TARGETS.items():
            real = [
                r[variant][metric] / r[base][metric] - 1
                for r in reals
                if r[variant].get(metric) is not None and r[base].get(metric)
            ]
            s, b = sim[variant].get(metric), sim[base].get(metric)
            if not real or s is None or not b:
                continue
            real_effect, sim_effect = float(pd.Series(real).median()), s / b - 1
            rows.append(
                {
                    "variant": variant,
                    "baseline": base,
                    "metric": metric,
                    "real_effect": real_effect,
                    "real_low": min(real),
                    "real_high": max(real),
                    "sim_effect": sim_effect,
                    "difference": sim_effect - real_effect,
                    "target": target,
                    "within_target": abs(sim_effect - real_effect) <= target,
                    "same_direction": direction(sim_effect, target)
                    == direction(real_effect, target),
                }
            )
    return pd.DataFrame(rows)


GPU_COLUMNS = {"gpu_sm_clock_mhz_p50": "sm_clock_mhz", "gpu_power_w_p50": "power_w"}


def ok_runs(reals: list[Path]) -> Iterator[RunResult]:
    """The successful runs with steps under the run or sweep directories ``reals``."""
    from harness.calibrate import runs_under

    for path in reals:
        for run in runs_under(path):
            if run.status == "ok" and not run.iterations.empty:
                yield run


def step_predictions(
    reals: list[Path], profile_path: Path, power_path: str | None = None
) -> pd.DataFrame:
    """Every step of the real runs under the directories ``reals`` that ran a batch: its
    variant, kind (decode / prefill / mixed), size (decode rows, or context tokens), measured
    seconds and the seconds the profile's cost model predicts for its work. ``power_path``: a
    power cap (``engine.sim.PowerCap``) that scales each step's device time as a simulation
    with it would, read on the real run's own timeline (``simulated_power``)."""
    from engine.sim.power import PowerCap
    from engine.sim.profile import Profile
    from harness.calibrate import features, serving_steps

    profile = Profile.load(profile_path)
    model = profile.cost_model()
    power = None if power_path is None else PowerCap.load(power_path)
    if power is not None and not isinstance(model, HostDeviceCostModel):
        raise ValueError(f"{power_path}: a power cap needs a profile with host and device apart")
    tables = []
    for run in ok_runs(reals):
        try:
            steps = serving_steps(run, profile.model)
        except ValueError as error:
            raise ValueError(f"{error} (profile {profile_path})") from error
        if power is None:
            predicted = [model.predict(f) for f in features(steps)]
        else:  # serving_steps are in time order, as the cap reads them
            scales = power.scales_along(
                steps.time, steps.seconds, steps.num_padded_tokens, steps.kind == "decode"
            )
            predicted = [
                model.predict_on_host(f, 1.0, scale)
                for f, scale in zip(features(steps), scales, strict=True)
            ]
        tables.append(
            pd.DataFrame(
                {
                    "variant": variant_key(run),
                    "kind": steps.kind,
                    # the size that moves a step's time most: decode rows, or context tokens
                    "size": np.where(
                        steps.kind == "decode", steps.num_decode_seqs, steps.num_context_tokens
                    ),
                    "measured": steps.seconds,
                    "predicted": predicted,
                }
            )
        )
    if not tables:
        raise ValueError(f"{', '.join(map(str, reals))}: no successful run with steps to check")
    return pd.concat(tables, ignore_index=True)


def host_time_scales(reals: list[Path], profile_path: Path) -> pd.DataFrame | None:
    """Per real run under ``reals``: its host time over the profile's host model
    (``harness.calibrate.host_time_table``: the ``executor.sim_host_time_scale`` that simulates
    its host), with the median SM clock and power of the runs that sampled them. None where the
    profile does not fit the host apart."""
    from engine.sim.profile import Profile
    from harness.calibrate import host_time_table, serving_steps

    profile = Profile.load(profile_path)
    if not profile.has_host_device_split:
        return None
    runs = list(ok_runs(reals))
    tables = [serving_steps(run, profile.model).assign(run=str(run.path)) for run in runs]
    table = host_time_table(profile, pd.concat(tables, ignore_index=True)) if tables else None
    if table is None:
        return None
    # The GPU's clock and power where the runs sampled them (executor.gpu_telemetry): a GPU at
    # its power cap is what moves device_time_scale from one workload to another.
    summaries = {str(run.path): run.summary for run in runs}
    for key, column in GPU_COLUMNS.items():
        values = [summaries.get(r, {}).get(key) for r in table.run]
        if any(v is not None for v in values):
            table[column] = pd.array([None if v is None else round(v) for v in values], "Int64")
    return table


def simulated_host_scale(sim: Path) -> float:
    """The ``executor.sim_host_time_scale`` the simulated runs under ``sim`` used (1 if unset)."""
    from harness.calibrate import runs_under

    scales = {
        float((run.config.get("executor") or {}).get("sim_host_time_scale", 1.0))
        for run in runs_under(sim)
    }
    return scales.pop() if len(scales) == 1 else 1.0


def simulated_power(sim: Path) -> str | None:
    """The power cap file the simulated runs under ``sim`` used (``executor.sim_power``, as
    resolved: run.json's ``power``); None where they used none or not all the same one."""
    from harness.calibrate import runs_under

    caps = {run.info.get("power") for run in runs_under(sim)}
    return caps.pop() if len(caps) == 1 else None


def step_table(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, kind of step, size bucket) of ``step_predictions``: the steps'
    count, measured and predicted total seconds, their ratio - 1 (``bias``) and the median and
    P90 of the per-step relative error ``(predicted - measured) / measured``."""
    frame = steps.assign(error=(steps.predicted - steps.measured) / steps.measured)
    edges = [0, 16, 64, 256, 1024, 4096, float("inf")]
    labels = ["1-15", "16-63", "64-255", "256-1023", "1024-4095", "4096+"]
    frame["size"] = pd.cut(frame["size"], edges, right=False, labels=labels)  # ordered
    grouped = frame.groupby(["variant", "kind", "size"], sort=True, observed=True)
    table = grouped.agg(
        steps=("error", "size"),
        measured_s=("measured", "sum"),
        predicted_s=("predicted", "sum"),
        median_error=("error", "median"),
        p90_abs_error=("error", lambda e: e.abs().quantile(0.9)),
    ).reset_index()
    table["bias"] = table.predicted_s / table.measured_s - 1
    return table


def short_names(variants: list[str]) -> list[str]:
    """Each variant named by the overrides that differ between them ("sim" if only one)."""
    if len(variants) == 1:
        return ["sim"]
    overrides = [dict(o.split("=", 1) for o in v.split(",") if "=" in o) for v in variants]
    keys = [k for k in overrides[0] if len({o.get(k) for o in overrides}) > 1]
    return [
        ",".join(f"{k}={o.get(k)}" for k in keys) or v
        for o, v in zip(overrides, variants, strict=True)
    ]


def plot_steps(frame: pd.DataFrame, path: Path) -> None:
    """Predicted against measured time of every real step, one panel per kind (log axes; the
    diagonal is a perfect prediction, the band +-5%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    kinds = [k for k in STEP_KINDS if (frame["kind"] == k).any()]
    variants = list(dict.fromkeys(frame["variant"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        rows = frame[frame["kind"] == kind]
        for variant in variants:
            group = rows[rows["variant"] == variant]
            ax.scatter(1e3 * group["measured"], 1e3 * group["predicted"], s=4, alpha=0.4,
                       label=variant)  # fmt: skip
        low = 1e3 * min(rows["measured"].min(), rows["predicted"].min())
        high = 1e3 * max(rows["measured"].max(), rows["predicted"].max())
        line = [low, high]
        ax.plot(line, line, color="black", linewidth=0.8)
        ax.fill_between(line, [0.95 * v for v in line], [1.05 * v for v in line], color="green",
                        alpha=0.15)  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="measured (ms)", ylabel="predicted (ms)",
               title=f"{kind} steps ({len(rows)})")  # fmt: skip
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers, a few a decade
            axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(plt.NullFormatter())
    if len(variants) > 1:
        names = short_names(variants)
        handles = axes[0][0].collections[: len(variants)]
        fig.legend(handles, names, loc="lower center", ncol=2, fontsize="small", markerscale=3)
    fig.suptitle("Cost model on each real step (green: within 5%)", fontsize="medium")
    fig.tight_layout(rect=(0, 0.1 if len(variants) > 1 else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(table["variant"]))
    metrics = list(TARGETS)
    has_ranks = "rank_error" in table and bool(table["rank_error"].notna().any())
    size = (max(6, 0.8 * len(metrics) * len(variants) ** 0.5), 6.5 if has_ranks else 4)
    fig, axes = plt.subplots(2 if has_ranks else 1, 1, figsize=size, squeeze=False, sharex=True)
    ax = axes[0, 0]
    width = 0.8 / len(variants)
    for i, (variant, name) in enumerate(zip(variants, short_names(variants), strict=True)):
        rows = table[table["variant"] == variant].set_index("metric").reindex(metrics)
        xs = [m + (i - (len(variants) - 1) / 2) * width for m in range(len(metrics))]
        ax.bar(xs, 100 * rows["relative_error"], width, label=name)
        if has_ranks:
            axes[1, 0].bar(xs, rows["rank_error"], width)
        if "real_spread" in rows:
            ax.scatter(xs, 100 * rows["real_spread"], marker="_", s=160, color="black",
                       label="real run again" if i == 0 else None, zorder=3)  # fmt: skip
        if "real_low" in rows:
            label = "real runs' range" if i == 0 else None
            ax.vlines(xs, 100 * rows["real_low"], 100 * rows["real_high"], color="black",
                      linewidth=2, label=label, zorder=3)  # fmt: skip
    for m, metric in enumerate(metrics):
        target = 100 * TARGETS[metric]
        ax.fill_between([m - 0.45, m + 0.45], -target, target, color="green", alpha=0.12)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("sim vs real (%)")
    if has_ranks:  # below: the same bars as ranks among the real requests (with_ranks)
        ranks = axes[1, 0]
        ranks.axhspan(-RANK_CLOSE, RANK_CLOSE, color="grey", alpha=0.15)
        ranks.axhline(0, color="black", linewidth=0.8)
        ranks.set_ylabel("rank among real requests\n(percentile points; shaded: close)")
    labels = [m.removesuffix("_ms") for m in metrics]
    axes[-1, 0].set_xticks(range(len(metrics)), labels, rotation=45)
    title = "Simulated engine fidelity (shaded: target"
    if "real_low" in table:
        title += "; against the real runs' median, black: their range"
    ax.set_title(title + ("; black: a second real run)" if "real_spread" in table else ")"))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_distributions(
    real: dict[str, pd.DataFrame], sim: dict[str, pd.DataFrame], path: Path
) -> None:
    """Each variant's TTFT, TPOT and E2E latency over its requests, real and simulated, as
    cumulative shares (``request_latencies`` of each side; a row per variant both have, at most
    ``MAX_DISTRIBUTIONS``). Where the percentiles differ, this says which requests do: a curve
    moved as a whole is a step time, a knee moved is the queue."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in real if v in sim][:MAX_DISTRIBUTIONS]
    if not variants:
        return
    fig, axes = plt.subplots(
        len(variants), len(RANKED), figsize=(4 * len(RANKED), 2.6 * len(variants)), squeeze=False
    )
    names = short_names(variants) if len(variants) > 1 else [""]  # one: nothing to tell apart
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    for row, variant in enumerate(variants):
        for col, (name, column) in enumerate(RANKED.items()):
            ax = axes[row, col]
            for side, frames, style in (("real", real, "-"), ("sim", sim, "--")):
                values = np.sort(frames[variant][column].dropna().to_numpy(dtype=float))
                if len(values):
                    shares = np.arange(1, len(values) + 1) / len(values)
                    ax.step(values, shares, style, where="post", label=side)
            if ax.has_data():
                ax.set_xscale("log")  # latencies span decades (a TTFT from ms to a queue's s)
                low, high = ax.get_xlim()
                ax.xaxis.set_major_formatter(plain)  # 20, not 2x10^1
                ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
                is_wide = high > 100 * low  # 2 and 5 of each decade would crowd it
                ax.xaxis.set_minor_formatter(
                    matplotlib.ticker.NullFormatter() if is_wide else plain
                )
            ax.set_xlabel(f"{name} (ms)")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"{names[row]}\nshare of requests".strip(), fontsize="small")
    axes[0, -1].legend(fontsize="small", loc="lower right")
    fig.suptitle("Latency distributions, real (solid) and simulated (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def effect_names(table: pd.DataFrame) -> dict[str, str]:
    """``effects``' variants and baseline, each named by the overrides that set it apart."""
    variants = list(dict.fromkeys([table["baseline"].iloc[0], *table["variant"]]))
    return dict(zip(variants, short_names(variants), strict=True))


def plot_effects(table: pd.DataFrame, path: Path) -> None:
    """Per variant, each metric's effect against the baseline: real (grey, with the repeats'
    range) beside simulated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(table["variant"]))
    names = effect_names(table)
    fig, axes = plt.subplots(len(variants), 1, figsize=(8, 3.2 * len(variants)), squeeze=False)
    for ax, variant in zip(axes[:, 0], variants, strict=True):
        rows = table[table["variant"] == variant]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], 100 * rows["real_effect"], 0.4, color="grey", label="real")
        ax.vlines([x - 0.2 for x in xs], 100 * rows["real_low"], 100 * rows["real_high"],
                  color="black", linewidth=2, label="real repeats' range")  # fmt: skip
        ax.bar([x + 0.2 for x in xs], 100 * rows["sim_effect"], 0.4, label="sim")
        ax.axhline(0, color="black", linewidth=0.8)
        labels = [m.removesuffix("_ms") for m in rows["metric"]]
        ax.set_xticks(list(xs), labels, rotation=45, ha="right")
        ax.set_ylabel("against the baseline (%)")
        baseline = names[rows["baseline"].iloc[0]]
        ax.set_title(f"{names[variant]} against {baseline}", fontsize="medium")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.fidelity", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "runs",
        type=Path,
        nargs="+",
        metavar="REAL [REAL ...] SIM",
        help="run or sweep directories of the real engine (several: repeats, compared by "
        "their median), then the same runs on executor.engine=sim (or real again: the spread)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: the sim directory")
    parser.add_argument(
        "--profile", type=Path, default=None, help="also check its cost model on each real step"
    )
    parser.add_argument(
        "--spread", type=Path, default=None, help="a second real run: the real engine's spread"
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="TEXT",
        help="sweeps: the run the others' effects are measured against (the one whose "
        "overrides contain TEXT; default: the first)",
    )
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give a real directory and a sim one (REAL [REAL ...] SIM)")
    *reals, sim = args.runs
    try:
        if len(reals) > 1 and args.spread is not None:
            raise ValueError("--spread takes one real run; with several, their range is shown")
        summaries = [run_summaries(path) for path in reals]
        real, spread = summaries[0], None
        if len(reals) > 1:
            real, spread = median_summaries(summaries)
        simulated = run_summaries(sim)
        latencies = request_latencies(reals)
        table = with_ranks(compare(real, simulated), latencies)
        simulated_latencies = request_latencies([sim])
        comparison = effects(summaries, simulated, args.baseline)
        if spread is not None:
            table = with_real_range(table, spread)
        if args.spread is not None:
            table = with_spread(table, real, run_summaries(args.spread))
        steps = hosts = None
        if args.profile is not None:
            power = simulated_power(sim)
            steps = step_predictions(reals, args.profile, power)
            hosts = host_time_scales(reals, args.profile)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or sim
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "fidelity.csv", index=False)
    plot(table, out / "fidelity.png")
    plot_distributions(latencies, simulated_latencies, out / "latency_cdf.png")
    percent = ("relative_error", "real_spread", "real_low", "real_high")
    shown = table.assign(
        **{c: (100 * table[c]).round(2).astype(str) + "%" for c in percent if c in table},
        target=(100 * table["target"]).round(0).astype(int).astype(str) + "%",
        rank_error=table["rank_error"].round(1),
    )
    print(shown.to_string(index=False))
    within = int(table["within_target"].sum())
    print(
        f"\n{within}/{len(table)} within target; wrote {out / 'fidelity.csv'}, fidelity.png and "
        "latency_cdf.png (each variant's latencies, real and simulated)"
    )
    steep = table[~table["within_target"] & (table["rank_error"].abs() <= RANK_CLOSE)]
    if len(steep):
        names = ", ".join(m.removesuffix("_ms") for m in dict.fromkeys(steep["metric"]))
        print(
            f"{len(steep)} of those off target lie within {RANK_CLOSE:g} percentile points of "
            f"their rank among the real requests ({names}): few real requests lie between the two "
            "values, so a small shift in which requests wait moves the value a lot (rank_error)"
        )
    if "real_spread" in table:
        moved = int((table["real_spread"].abs() > table["target"]).sum())
        print(f"the second real run moved more than the target on {moved}/{len(table)}")
    if "within_spread" in table:
        inside = int(table["within_spread"].sum())
        print(
            f"against the median of {len(reals)} real runs; the error lies within their range "
            f"on {inside}/{len(table)}"
        )
    if len(comparison):
        comparison.to_csv(out / "effects.csv", index=False)
        plot_effects(comparison, out / "effects.png")
        percent = ("real_effect", "real_low", "real_high", "sim_effect", "difference")
        shown = comparison.assign(
            **{c: (100 * comparison[c]).round(1) for c in percent},
        ).drop(columns=["baseline", "target"])
        names = effect_names(comparison)
        shown["variant"] = shown["variant"].map(names)
        print(
            f"\neach run against {names[comparison['baseline'].iloc[0]]}, real and simulated "
            "(in %; difference in points):"
        )
        print(shown.to_string(index=False))
        print(
            f"{int(comparison['within_target'].sum())}/{len(comparison)} effects within target, "
            f"direction agreed on {int(comparison['same_direction'].sum())}/{len(comparison)}; "
            f"wrote {out / 'effects.csv'} and effects.png"
        )
    if steps is not None:
        summary = step_table(steps)
        summary.to_csv(out / "steps.csv", index=False)
        plot_steps(steps, out / "steps.png")
        print(
            "\nthe profile's cost model on each real step (errors in %; wrote steps.csv, .png)"
            + (f", with the power cap the simulation used ({power})" if power else "")
        )
        percent = {
            c: (100 * summary[c]).round(1) for c in ("median_error", "p90_abs_error", "bias")
        }
        shown = summary.assign(**percent).round(3)
        for variant, rows in shown.groupby("variant", sort=False):
            print(f"{variant}\n{rows.drop(columns='variant').to_string(index=False)}")
    if hosts is not None:
        hosts.to_csv(out / "host_time.csv", index=False)
        simulated = simulated_host_scale(sim)
        print(
            f"\neach real run's host time over the profile's (the simulation used "
            f"executor.sim_host_time_scale={simulated:g}; wrote host_time.csv)"
        )
        print(hosts.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        # A host more than 10% off the simulated one moves the host-bound steps by as much.
        off = hosts[(hosts.host_time_scale / simulated - 1).abs() > 0.1]
        if len(off):
            scale = float(off.host_time_scale.median())
            print(
                f"{len(off)} of {len(hosts)} real runs ran on a host more than 10% off the "
                f"simulated one: simulate theirs with executor.sim_host_time_scale={scale:.3g}, "
                "or replay each one's host second by second (python -m harness.calibrate REAL "
                "--profile P --host-timeline DIR, then executor.sim_host_timeline=FILE)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
