"""What a run prints: a progress bar while it runs, then its summary table and where it wrote."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

# (summary key, column title, format)
COLUMNS = [
    ("completed", "done", "{:.0f}"),
    ("num_rejected", "rej", "{:.0f}"),
    ("request_throughput", "req/s", "{:.2f}"),
    ("output_throughput", "out tok/s", "{:.1f}"),
    ("request_goodput", "goodput", "{:.2f}"),
    ("median_ttft_ms", "TTFT p50", "{:.1f}"),
    ("p99_ttft_ms", "TTFT p99", "{:.1f}"),
    ("median_tpot_ms", "TPOT p50", "{:.1f}"),
    ("p99_tpot_ms", "TPOT p99", "{:.1f}"),
    ("median_e2el_ms", "E2E p50", "{:.1f}"),
    ("num_preemptions", "preempt", "{:.0f}"),
    ("num_kv_blocks", "KV blocks", "{:.0f}"),
    ("peak_kv_utilization", "KV peak", "{:.2f}"),
    ("cache_hit_rate", "hit rate", "{:.2f}"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def format_table(rows: list[dict[str, Any]], label_key: str = "run") -> str:
    """Rows of summary dicts -> an aligned text table (times in ms)."""
    header = [label_key] + [title for _, title, _ in COLUMNS]
    body = [
        [str(row.get(label_key, ""))] + [_cell(row.get(key), fmt) for key, _, fmt in COLUMNS]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *body]]
    return "\n".join(lines)


def print_summary(summary: dict[str, Any], run_dir: Path, title: str = "run") -> None:
    print(format_table([{"run": title, **summary}]))
    print(f"results: {run_dir}")


def print_sweep(sweep, sweep_dir: Path) -> None:
    frame = sweep.summary
    # Label each run by what it changes (the experiment name is common to all).
    keys = [k for k in sweep.override_keys if k != "experiment"]
    varying = [k for k in keys if frame[k].astype(str).nunique() > 1]
    keys = varying or keys
    rows = []
    for record in frame.to_dict("records"):
        label = ",".join(f"{k}={record[k]}" for k in keys) or str(record.get("run", ""))
        if record.get("status") != "ok":
            label = f"{label} (FAILED: {str(record.get('error', ''))[:60]})"
        rows.append({**record, "run": label})
    print(format_table(rows))
    num_failed = sum(1 for r in frame.to_dict("records") if r.get("status") != "ok")
    if num_failed:
        print(f"{num_failed} of {len(frame)} runs failed; see run.json in their directories")
    for warning in pool_warnings(frame, sweep.override_keys):
        print(f"warning: {warning}")
    print(f"sweep results: {sweep_dir} (summary.csv, comparison plots)")


# A run whose KV pool is under this share of the sweep's largest, where nothing swept sets the
# pool, started on a device whose memory something else held.
SMALL_POOL = 0.5
POOL_KEYS = ("kv_cache_manager", "model", "executor")  # overrides that may size the pool


def pool_warnings(summary, override_keys: list[str]) -> list[str]:
    """Runs of a sweep whose KV pool (``num_kv_blocks``) is under ``SMALL_POOL`` of the
    sweep's largest where no swept override sizes it: on a GPU the pool is sized from the
    free memory, so such a run started while memory was held elsewhere (another process, or
    an engine of an earlier run not freed), and its comparison with the others is unfair."""
    if "num_kv_blocks" not in summary or any(k.startswith(POOL_KEYS) for k in override_keys):
        return []
    pools = summary["num_kv_blocks"].astype(float)
    largest = pools.max()
    if not largest > 0:
        return []
    small = summary[pools < SMALL_POOL * largest]
    return [
        f"run {row['run']} had a KV pool of {int(row['num_kv_blocks']):,} blocks, "
        f"{row['num_kv_blocks'] / largest:.0%} of the sweep's largest ({int(largest):,}): GPU "
        "memory was held elsewhere when it started, and it is not comparable with the others"
        for row in small.to_dict("records")
    ]


class Progress:
    """requests done / total and live output throughput; silent when disabled or not a TTY."""

    def __init__(self, total: int, enabled: bool = True, label: str = ""):
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self._bar = None
        self._start = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.label, unit="req", dynamic_ncols=True)
        return self

    def update(self, num_finished: int, num_output_tokens: int) -> None:
        if self._bar is None:
            return
        self._bar.update(num_finished - self._bar.n)
        elapsed = time.perf_counter() - self._start
        self._bar.set_postfix_str(f"{num_output_tokens / max(elapsed, 1e-9):.0f} out tok/s")

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
