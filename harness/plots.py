"""Plots of one run and comparisons across a sweep, as PNG files.

Figures are built with the object API on the Agg canvas (no pyplot): nothing global is touched,
no display is needed, and figures are freed when they go out of scope. Every function returns
the list of PNG paths it wrote (empty when it had nothing to draw). Files are written to a
temporary name and moved into place, so an interrupted run never leaves a truncated PNG.

Time axes are the run's clock (seconds since the run started); each run of a sweep has its own.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_DPI = 110
# The (column, title) of each latency panel, in the order vLLM reports them.
_LATENCY_PANELS: tuple[tuple[str, str], ...] = (
    ("ttft_ms", "Time to first token (TTFT)"),
    ("tpot_ms", "Time per output token (TPOT)"),
    ("e2el_ms", "End-to-end latency (E2EL)"),
)
_LOAD_MARKERS: tuple[str, ...] = ("rate", "concurrency")


# ---- helpers -------------------------------------------------------------------------------
def _figure(nrows: int = 1, ncols: int = 1, *, width: float = 7.0, height: float = 4.0, **kw):
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (temp file in the same dir, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=_DPI)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _colors(n: int) -> list:
    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["viridis"](x) for x in np.linspace(0, 1, n)]


def _no_data(ax: Axes, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _cdf(ax: Axes, values: np.ndarray, **kw) -> bool:
    """Empirical CDF of the finite values; False when there are none."""
    v = np.sort(values[np.isfinite(values)])
    if v.size == 0:
        return False
    y = np.arange(1, v.size + 1) / v.size
    ax.step(np.concatenate([[v[0]], v]), np.concatenate([[0.0], y]), where="post", **kw)
    return True


# More steps than this are drawn binned (a simulated hour-long trace has over a million).
MAX_STEPS_DRAWN = 20_000


def _over_time(ax: Axes, iterations: pd.DataFrame, values, **kw) -> None:
    """Each step's value held from the step's start to its end (start + step_latency), so the
    last step is drawn with its width rather than as a bare vertical edge. Past
    ``MAX_STEPS_DRAWN`` steps, time is cut into that many equal bins, each drawn at the largest
    value of its steps (peaks stay visible; a bin without a step holds the previous value)."""
    t = iterations["time"].to_numpy(dtype=float)
    y = np.asarray(values, dtype=float)
    last = float(iterations["step_latency"].iloc[-1]) if "step_latency" in iterations else 0.0
    end = t[-1] + last
    if len(t) > MAX_STEPS_DRAWN and end > t[0]:
        edges = np.linspace(t[0], end, MAX_STEPS_DRAWN + 1)
        bins = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, MAX_STEPS_DRAWN - 1)
        peaks = pd.Series(y).groupby(bins).max().reindex(range(MAX_STEPS_DRAWN)).ffill()
        t, y = edges[:-1], peaks.to_numpy()
    ax.step(np.append(t, end), np.append(y, y[-1]), where="post", **kw)


def _log_if_wide(ax: Axes, values: np.ndarray) -> None:
    # Latencies under load span decades (ms to tens of s): a log axis keeps both ends readable.
    v = values[np.isfinite(values) & (values > 0)]
    if v.size and v.max() / v.min() > 100:
        ax.set_xscale("log")


def _latency_cdfs(
    requests_by_label: Sequence[tuple[str | None, pd.DataFrame]],
    title: str,
    colors: Sequence | None = None,
) -> Figure:
    fig, axes = _figure(1, 3, width=5.0, height=4.0)
    colors = list(colors) if colors is not None else _colors(len(requests_by_label))
    for ax, (col, name) in zip(axes[0], _LATENCY_PANELS, strict=True):
        drawn = False
        pooled = []
        for color, (label, frame) in zip(colors, requests_by_label, strict=True):
            done = frame[frame["status"] == "complete"] if "status" in frame else frame
            values = done[col].to_numpy(dtype=float) if col in done else np.empty(0)
            pooled.append(values)
            drawn |= _cdf(ax, values, color=color, label=label)
        if not drawn:
            _no_data(ax)
        else:
            _log_if_wide(ax, np.concatenate(pooled))
        ax.set_title(name)
        ax.set_xlabel(f"{col.removesuffix('_ms').upper()} (ms)")
        ax.set_ylabel("fraction of completed requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    if any(label for label, _ in requests_by_label):
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    fig.suptitle(title)
    return fig


# ---- one run -------------------------------------------------------------------------------
def plot_latency_cdfs(requests: pd.DataFrame, path: Path, title: str = "") -> list[Path]:
    """TTFT, TPOT and E2EL CDFs of completed requests, three panels in one figure."""
    fig = _latency_cdfs([(None, requests)], _title("Latency CDFs", title))
    return [_save(fig, Path(path))]


def plot_kv_utilization(iterations: pd.DataFrame, path: Path, title: str = "") -> list[Path]:
    """KV-cache utilization (used / max blocks) per step, with the cumulative prefix-cache hit
    rate, over time."""
    fig, axes = _figure()
    ax = axes[0][0]
    if len(iterations):
        _over_time(ax, iterations, iterations["kv_utilization"] * 100, label="KV blocks used")
        if "kv_cache_hit_rate" in iterations:
            _over_time(
                ax,
                iterations,
                iterations["kv_cache_hit_rate"] * 100,
                linestyle="--",
                label="prefix-cache hit rate (cumulative)",
            )
        ax.legend(loc="best", fontsize="small")
    else:
        _no_data(ax)
    ax.set_ylim(0, 105)
    ax.set_xlabel("time since run start (s)")
    ax.set_ylabel("% of KV-cache blocks / % of blocks hit")
    ax.set_title(_title("KV-cache utilization", title))
    ax.grid(alpha=0.3)
    return [_save(fig, Path(path))]


def plot_request_counts(iterations: pd.DataFrame, path: Path, title: str = "") -> list[Path]:
    """Running (holding KV), queued (waiting for admission, paused ones included) and paused
    (preempted, waiting to be recomputed) request counts over time."""
    fig, axes = _figure()
    ax = axes[0][0]
    if len(iterations):
        for column, label in (
            ("num_running_requests", "running (holding KV)"),
            ("num_queued_requests", "queued (incl. paused)"),
            ("num_waiting_paused_requests", "paused (preempted, waiting)"),
        ):
            if column in iterations:
                _over_time(ax, iterations, iterations[column], label=label)
        ax.legend(loc="best", fontsize="small")
    else:
        _no_data(ax)
    ax.set_xlabel("time since run start (s)")
    ax.set_ylabel("requests")
    ax.set_title(_title("Running, queued and paused requests", title))
    ax.grid(alpha=0.3)
    return [_save(fig, Path(path))]


def plot_batch_composition(iterations: pd.DataFrame, path: Path, title: str = "") -> list[Path]:
    """Per step: context (prefill) tokens, and context / generation requests, over time."""
    fig, axes = _figure(2, 1, width=8.0, height=3.0, sharex=True)
    top, bottom = axes[0][0], axes[1][0]
    if len(iterations):
        _over_time(top, iterations, iterations["num_context_tokens"], color="tab:orange")
        for col, label in (
            ("num_generation_requests", "generation requests"),
            ("num_context_requests", "context requests"),
        ):
            _over_time(bottom, iterations, iterations[col], label=label)
        bottom.legend(loc="best", fontsize="small")
    else:
        _no_data(top)
        _no_data(bottom)
    return _two_panels_over_time(
        fig, ("context tokens / step", "requests / step"), _title("Batch composition", title), path
    )


def _two_panels_over_time(fig: Figure, ylabels: tuple[str, str], title: str, path) -> list[Path]:
    """Label, grid, title and save a figure of two panels over the run's time."""
    top, bottom = fig.axes
    top.set_ylabel(ylabels[0])
    bottom.set_ylabel(ylabels[1])
    bottom.set_xlabel("time since run start (s)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return [_save(fig, Path(path))]


def plot_gpu_clock(iterations: pd.DataFrame, path: Path, title: str = "") -> list[Path]:
    """The GPU's SM clock and power at each step (``executor.gpu_telemetry``), over time: a
    GPU at its power cap lowers its clock, and the same step takes longer."""
    fig, axes = _figure(2, 1, width=8.0, height=3.0, sharex=True)
    top, bottom = axes[0][0], axes[1][0]
    sampled = iterations.dropna(subset=["sm_clock_mhz"]) if len(iterations) else iterations
    if len(sampled):
        # Dots, not a step line: a dip lasts a step or two, and binning by peaks would hide it.
        top.plot(sampled["time"], sampled["sm_clock_mhz"], ".", ms=2, color="tab:blue")
        bottom.plot(sampled["time"], sampled["power_w"], ".", ms=2, color="tab:red")
    else:
        _no_data(top)
        _no_data(bottom)
    title = _title("GPU clock and power at each step", title)
    return _two_panels_over_time(fig, ("SM clock (MHz)", "power (W)"), title, path)


def run_plots(
    requests: pd.DataFrame, iterations: pd.DataFrame, out_dir: Path, title: str = ""
) -> list[Path]:
    """Every run plot into ``out_dir``: latency_cdfs.png, kv_utilization.png,
    request_counts.png, batch_composition.png, and gpu_clock.png where the run sampled its
    GPU (``executor.gpu_telemetry``)."""
    out = Path(out_dir)
    paths = [
        *plot_latency_cdfs(requests, out / "latency_cdfs.png", title),
        *plot_kv_utilization(iterations, out / "kv_utilization.png", title),
        *plot_request_counts(iterations, out / "request_counts.png", title),
        *plot_batch_composition(iterations, out / "batch_composition.png", title),
    ]
    if "sm_clock_mhz" in iterations:
        paths += plot_gpu_clock(iterations, out / "gpu_clock.png", title)
    return paths


def _title(what: str, run_title: str) -> str:
    return f"{what}: {run_title}" if run_title else what


# ---- sweeps --------------------------------------------------------------------------------
def run_labels(summary: pd.DataFrame, override_keys: Sequence[str]) -> dict[str, str]:
    """A short label per run (``summary['run']``): the overrides that differ between runs, as
    ``key=value`` with the key's last dotted part (the full key where last parts clash); else
    the run's name; else its directory."""
    varying = [k for k in override_keys if k in summary and summary[k].nunique(dropna=False) > 1]
    short = {k: k.rsplit(".", 1)[-1] for k in varying}
    if len(set(short.values())) < len(short):
        short = {k: k for k in varying}
    labels: dict[str, str] = {}
    for _, row in summary.iterrows():
        parts = [f"{short[k]}={_fmt(row[k])}" for k in varying if not _isna(row[k])]
        name = row.get("name")
        labels[row["run"]] = ", ".join(parts) or (name if isinstance(name, str) else row["run"])
    return labels


def _isna(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _fmt(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _split(frame: pd.DataFrame, runs: Sequence[str]) -> list[pd.DataFrame]:
    if "run" not in frame or frame.empty:
        return [frame.iloc[0:0] for _ in runs]
    groups = dict(tuple(frame.groupby("run", sort=False)))
    return [groups.get(r, frame.iloc[0:0]) for r in runs]


def plot_sweep_latency_cdfs(
    requests: pd.DataFrame, labels: Mapping[str, str], path: Path
) -> list[Path]:
    """TTFT/TPOT/E2EL CDFs, one line per run (runs without requests are left out)."""
    runs = list(labels)
    # A run keeps its color in every sweep plot, even when some runs have nothing to draw.
    kept = [
        ((labels[r], f), c)
        for r, f, c in zip(runs, _split(requests, runs), _colors(len(runs)), strict=True)
        if len(f)
    ]
    fig = _latency_cdfs([p for p, _ in kept], "Latency CDFs per run", [c for _, c in kept])
    return [_save(fig, Path(path))]


def plot_sweep_throughput(
    summary: pd.DataFrame, labels: Mapping[str, str], path: Path
) -> list[Path]:
    """Bars per run: request throughput and goodput (req/s), output and total token throughput
    (tok/s). A failed run keeps its slot, marked "failed"."""
    n = len(summary)
    fig, axes = _figure(1, 2, width=max(5.0, 0.6 * n + 2), height=4.5)
    x = np.arange(n)
    names = [labels.get(r, r) for r in summary["run"]]
    panels = (
        (axes[0][0], ("request_throughput", "request_goodput"), "requests / s", "Request"),
        (axes[0][1], ("output_throughput", "total_token_throughput"), "tokens / s", "Token"),
    )
    for ax, keys, unit, what in panels:
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            values = (
                pd.to_numeric(summary[key], errors="coerce").to_numpy(dtype=float)
                if key in summary
                else np.full(n, np.nan)
            )
            offset = (i - (len(keys) - 1) / 2) * width
            ax.bar(x + offset, np.nan_to_num(values), width, label=key.replace("_", " "))
        for xi, status in zip(x, summary.get("status", pd.Series(["ok"] * n)), strict=True):
            if status != "ok":
                ax.text(xi, 0, "failed", rotation=90, ha="center", va="bottom", color="tab:red")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize="small")
        ax.set_ylabel(unit)
        ax.set_title(f"{what} throughput per run")
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3, axis="y")
    return [_save(fig, Path(path))]


def _lines_over_time(
    ax: Axes,
    iterations: pd.DataFrame,
    labels: Mapping[str, str],
    column: str,
    scale: float = 1.0,
) -> bool:
    runs = list(labels)
    drawn = False
    for color, run, frame in zip(_colors(len(runs)), runs, _split(iterations, runs), strict=True):
        if len(frame) and column in frame:
            _over_time(ax, frame, frame[column] * scale, color=color, label=labels[run])
            drawn = True
    if not drawn:
        _no_data(ax)
    ax.set_xlabel("time since run start (s)")
    ax.grid(alpha=0.3)
    return drawn


def plot_sweep_kv_utilization(
    iterations: pd.DataFrame, labels: Mapping[str, str], path: Path
) -> list[Path]:
    """KV-cache utilization over time, one line per run."""
    fig, axes = _figure(width=8.0)
    ax = axes[0][0]
    if _lines_over_time(ax, iterations, labels, "kv_utilization", scale=100):
        fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    ax.set_ylim(0, 105)
    ax.set_ylabel("% of KV-cache blocks used")
    ax.set_title("KV-cache utilization per run")
    return [_save(fig, Path(path))]


def plot_sweep_request_counts(
    iterations: pd.DataFrame, labels: Mapping[str, str], path: Path
) -> list[Path]:
    """Running (holding KV), queued (incl. paused) and paused-waiting requests over time,
    one line per run."""
    fig, axes = _figure(3, 1, width=8.0, height=2.6, sharex=True)
    panels = [
        ("num_running_requests", "running\n(holding KV)"),
        ("num_queued_requests", "queued\n(incl. paused)"),
        ("num_waiting_paused_requests", "paused\n(waiting)"),
    ]
    drawn = False
    for row, (column, ylabel) in zip(axes, panels, strict=True):
        drawn |= _lines_over_time(row[0], iterations, labels, column)
        row[0].set_ylabel(ylabel)
    for row in axes[:-1]:
        row[0].set_xlabel("")
    if drawn:
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=2, fontsize="small")
    fig.suptitle("Running, queued and paused requests per run")
    return [_save(fig, Path(path))]


def plot_sweep_batch_composition(
    iterations: pd.DataFrame, labels: Mapping[str, str], path: Path
) -> list[Path]:
    """Context (prefill) tokens and generation requests per step over time, one line per run."""
    fig, axes = _figure(2, 1, width=8.0, height=3.0, sharex=True)
    drawn = _lines_over_time(axes[0][0], iterations, labels, "num_context_tokens")
    _lines_over_time(axes[1][0], iterations, labels, "num_generation_requests")
    axes[0][0].set_ylabel("context tokens / step")
    axes[0][0].set_xlabel("")
    axes[1][0].set_ylabel("generation requests\n/ step")
    if drawn:
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=2, fontsize="small")
    fig.suptitle("Batch composition per run")
    return [_save(fig, Path(path))]


def load_keys(summary: pd.DataFrame, override_keys: Sequence[str]) -> list[str]:
    """Override keys that set the load (name contains "rate" or "concurrency") and take more
    than one value among the successful runs."""
    ok = summary[summary["status"] == "ok"] if "status" in summary else summary
    return [
        k
        for k in override_keys
        if any(m in k.rsplit(".", 1)[-1].lower() for m in _LOAD_MARKERS)
        and k in ok
        and ok[k].nunique() > 1
    ]


def plot_latency_vs_throughput(
    summary: pd.DataFrame, override_keys: Sequence[str], path: Path
) -> list[Path]:
    """Latency against output throughput, one curve per setting of the non-load overrides
    (the policy), points ordered by load and annotated with it. Nothing is drawn (and [] is
    returned) when no load key varies."""
    loads = load_keys(summary, override_keys)
    if not loads:
        return []
    ok = summary[summary["status"] == "ok"] if "status" in summary else summary
    others = [k for k in override_keys if k not in loads and k in ok and ok[k].nunique() > 1]
    groups = list(ok.groupby(others, sort=True, dropna=False)) if others else [((), ok)]
    metrics = [
        (key, title)
        for key, title in (
            ("median_ttft_ms", "Median TTFT"),
            ("p99_ttft_ms", "P99 TTFT"),
            ("median_tpot_ms", "Median TPOT"),
            ("p99_tpot_ms", "P99 TPOT"),
        )
        if key in ok
    ]
    fig, axes = _figure(2, 2, width=5.5, height=4.0)
    colors = _colors(len(groups))
    for ax, (key, title) in zip(axes.flat, metrics, strict=False):
        for color, (group_key, frame) in zip(colors, groups, strict=True):
            frame = frame.sort_values(loads)
            values = group_key if isinstance(group_key, tuple) else (group_key,)
            label = ", ".join(
                f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in zip(others, values, strict=True)
            )
            x = pd.to_numeric(frame["output_throughput"], errors="coerce")
            y = pd.to_numeric(frame[key], errors="coerce")
            ax.plot(x, y, "o-", color=color, label=label or "all runs")
            for xi, yi, (_, row) in zip(x, y, frame.iterrows(), strict=True):
                load = ", ".join(_fmt(row[k]) for k in loads)
                ax.annotate(
                    load,
                    (xi, yi),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize="x-small",
                    color=color,
                )
        ax.set_title(f"{title} vs output throughput")
        ax.set_xlabel("output throughput (tokens / s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=2, fontsize="small")
    load_names = ", ".join(k.rsplit(".", 1)[-1] for k in loads)
    fig.suptitle(f"Latency vs throughput (points labelled by {load_names})")
    return [_save(fig, Path(path))]


def sweep_plots(
    summary: pd.DataFrame,
    requests: pd.DataFrame,
    iterations: pd.DataFrame,
    override_keys: Sequence[str],
    out_dir: Path,
) -> list[Path]:
    """Every comparison plot into ``out_dir``: sweep_latency_cdfs.png, sweep_throughput.png,
    sweep_kv_utilization.png, sweep_request_counts.png, sweep_batch_composition.png, and
    latency_vs_throughput.png when a
    load override varies. ``summary`` has one row per run (column ``run``, ``status``, the
    override columns); ``requests`` / ``iterations`` carry a ``run`` column."""
    out = Path(out_dir)
    labels = run_labels(summary, override_keys)
    return [
        *plot_sweep_latency_cdfs(requests, labels, out / "sweep_latency_cdfs.png"),
        *plot_sweep_throughput(summary, labels, out / "sweep_throughput.png"),
        *plot_sweep_kv_utilization(iterations, labels, out / "sweep_kv_utilization.png"),
        *plot_sweep_request_counts(iterations, labels, out / "sweep_request_counts.png"),
        *plot_sweep_batch_composition(iterations, labels, out / "sweep_batch_composition.png"),
        *plot_latency_vs_throughput(summary, override_keys, out / "latency_vs_throughput.png"),
    ]
