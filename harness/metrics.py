"""Metrics: per-request and per-iteration frames, and the run summary with vLLM's names.

The latency metrics follow vLLM's benchmark definitions (``../shared/reference/anchors.md``), so
numbers compare one to one with ``vllm bench serve``:

- TTFT = first token - arrival; E2EL = finish (last token) - arrival;
- TPOT = (E2EL - TTFT) / (output_len - 1), only for requests with more than one output token;
- ITL = gaps between consecutive output tokens, pooled over every completed request;
- duration = first arrival to last finish, over all requests (rejected ones included, as vLLM's
  wall-clock duration includes failed requests);
- throughputs and goodput are counts over completed requests divided by that duration.

Statistics are vLLM's too: ``np.mean``, ``np.median``, ``np.std`` (population, ddof=0) and
``np.percentile`` (linear interpolation), reported in milliseconds. Where vLLM reports 0 for an
empty set, we report NaN: "no data" must not read as "zero latency".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from engine.request import Request, RequestState
from engine.stats import IterationStats

REQUEST_COLUMNS: tuple[str, ...] = (
    "request_id",
    "status",
    "finish_reason",
    "rejection_reason",
    "num_prompt_tokens",
    "num_output_tokens",
    "arrival_time",
    "first_scheduled_time",
    "first_token_time",
    "finish_time",
    "ttft_ms",
    "tpot_ms",
    "e2el_ms",
    "queue_time_ms",
    "num_preemptions",
    "num_cached_tokens",
    "itl_ms",
)

ITERATION_COLUMNS: tuple[str, ...] = (
    *IterationStats.__dataclass_fields__.keys(),
    "kv_utilization",
)

# The SLO keys goodput understands (vLLM's ``--goodput ttft:.. tpot:.. e2el:..``), in ms.
SLO_KEYS: tuple[str, ...] = ("ttft_ms", "tpot_ms", "e2el_ms")

_NAN = float("nan")


def _ms(seconds: float | None) -> float:
    return _NAN if seconds is None else seconds * 1e3


def _time(t: float | None) -> float:
    return _NAN if t is None else float(t)


def requests_frame(requests: Sequence[Request]) -> pd.DataFrame:
    """One row per request, columns ``REQUEST_COLUMNS``, in the order given.

    Contract:
    - ``status`` is the request's final state: "complete" or "rejected" (a request the run never
      finished, e.g. an aborted run, keeps its state's name, such as "queued").
    - Times are seconds on the run's clock; a time never reached is NaN.
    - ``ttft_ms``, ``tpot_ms``, ``e2el_ms`` and ``itl_ms`` are defined for completed requests only
      (NaN / empty list otherwise), so a rejection time is never mistaken for a latency.
      ``tpot_ms`` is NaN for a one-token request. ``queue_time_ms`` is arrival to first admission
      (NaN if never admitted).
    - ``itl_ms`` is a list column: the gaps between consecutive ``token_times``, in ms. A preempted
      request's gap across its pause is included, as in vLLM's ITL.
    """
    rows = []
    for r in requests:
        complete = r.state is RequestState.COMPLETE
        times = r.token_times
        itl = [(b - a) * 1e3 for a, b in itertools.pairwise(times)] if complete else []
        rows.append(
            {
                "request_id": r.request_id,
                "status": r.state.value,
                "finish_reason": None if r.finish_reason is None else r.finish_reason.value,
                "rejection_reason": r.rejection_reason,
                "num_prompt_tokens": r.num_prompt_tokens,
                "num_output_tokens": r.num_output_tokens,
                "arrival_time": float(r.arrival_time),
                "first_scheduled_time": _time(r.first_scheduled_time),
                "first_token_time": _time(r.first_token_time),
                "finish_time": _time(r.finish_time),
                "ttft_ms": _ms(r.ttft) if complete else _NAN,
                "tpot_ms": _ms(r.tpot) if complete else _NAN,
                "e2el_ms": _ms(r.e2e_latency) if complete else _NAN,
                "queue_time_ms": _ms(r.queue_time),
                "num_preemptions": r.num_preemptions,
                "num_cached_tokens": r.num_cached_tokens,
                "itl_ms": itl,
            }
        )
    frame = pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))
    if not rows:
        # Give an empty frame the dtypes a full one has, so concatenation and parquet agree.
        frame = frame.astype(
            {
                "request_id": "int64",
                "num_prompt_tokens": "int64",
                "num_output_tokens": "int64",
                "num_preemptions": "int64",
                "num_cached_tokens": "int64",
                **{c: "float64" for c in REQUEST_COLUMNS if c.endswith(("_time", "_ms"))},
                "itl_ms": "object",
            }
        )
    return frame


def iterations_frame(stats: Sequence[IterationStats]) -> pd.DataFrame:
    """One row per executor step (``IterationStats.as_row()``), columns ``ITERATION_COLUMNS``."""
    if hasattr(stats, "columns"):  # an IterationLog: its arrays, no row objects
        # Views of the log's float arrays, not copies: a simulated trace has millions of rows (2
        # million for llama-1b on the whole Azure trace, ~16 MB a column). Its int columns are
        # as narrow as their values allow: widened here, as the frame's (and parquet's) are int64.
        columns = {
            name: np.asarray(col, dtype=np.float64 if col.typecode == "d" else np.int64)
            for name, col in stats.columns().items()
        }
        max_blocks, used = columns["kv_max_blocks"], columns["kv_used_blocks"]
        columns["kv_utilization"] = np.divide(
            used, max_blocks, out=np.zeros(len(used)), where=max_blocks > 0
        )
        return pd.DataFrame({name: columns[name] for name in ITERATION_COLUMNS}, copy=False)
    # Column by column: a simulated run has millions of rows, too many for a dict each.
    columns = {}
    for name in ITERATION_COLUMNS:
        if name == "kv_utilization":
            columns[name] = [s.kv_utilization for s in stats]
        else:
            columns[name] = [getattr(s, name) for s in stats]
    return pd.DataFrame(columns, columns=list(ITERATION_COLUMNS))


def _percentile_word(p: float) -> str:
    # vLLM's key spelling: p99, p99.9 (an integral percentile drops its ".0").
    return str(int(p)) if float(p).is_integer() else str(p)


def _distribution(name: str, values_ms: np.ndarray, percentiles: Sequence[float]) -> dict:
    """mean/median/std/pP keys for one metric; NaN everywhere when there are no values."""
    empty = values_ms.size == 0
    out = {
        f"mean_{name}_ms": _NAN if empty else float(np.mean(values_ms)),
        f"median_{name}_ms": _NAN if empty else float(np.median(values_ms)),
        f"std_{name}_ms": _NAN if empty else float(np.std(values_ms)),
    }
    for p in percentiles:
        value = _NAN if empty else float(np.percentile(values_ms, p))
        out[f"p{_percentile_word(p)}_{name}_ms"] = value
    return out


def _per_second(count: float, duration: float) -> float:
    return count / duration if duration > 0 else _NAN


def _meets_slos(completed: pd.DataFrame, slo: Mapping[str, float | None] | None) -> pd.Series:
    """Which completed requests meet every given SLO (metric <= limit, in ms)."""
    ok = pd.Series(True, index=completed.index)
    for key, limit in (slo or {}).items():
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO key {key!r}; expected one of {SLO_KEYS}")
        if limit is None:
            continue
        values = completed[key]
        if key == "tpot_ms":
            # A one-token request has no TPOT; vLLM counts its TPOT as 0, so it passes.
            ok &= values.isna() | (values <= limit)
        else:
            ok &= values <= limit
    return ok


def _time_weights(iterations: pd.DataFrame) -> np.ndarray | None:
    """Step latencies as weights for a time average, or None when they can't serve (absent,
    NaN or all zero): then plain per-step means are used."""
    if "step_latency" not in iterations:
        return None
    w = iterations["step_latency"].to_numpy(dtype=float)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        return None
    return w


def _iteration_summary(iterations: pd.DataFrame) -> dict:
    n = len(iterations)
    out: dict = {"num_iterations": n}
    if n == 0:
        return {
            **out,
            "mean_kv_utilization": _NAN,
            "peak_kv_utilization": _NAN,
            "cache_hit_rate": _NAN,
            "mean_queued_requests": _NAN,
            "max_queued_requests": _NAN,
            "mean_batch_size": _NAN,
            "num_kv_blocks": _NAN,
        }
    # A step holds its state for its whole latency, so a time-weighted mean is the mean a
    # sampler of wall time would see (a long prefill step counts for more than a short decode).
    if "iteration" in iterations:
        iterations = iterations.sort_values("iteration")  # "final" hit rate = last step's
    weights = _time_weights(iterations)
    util = iterations["kv_utilization"].to_numpy(dtype=float)
    queued = iterations["num_queued_requests"].to_numpy(dtype=float)
    batch = (iterations["num_context_requests"] + iterations["num_generation_requests"]).to_numpy(
        dtype=float
    )
    return {
        **out,
        "mean_kv_utilization": float(np.average(util, weights=weights)),
        "peak_kv_utilization": float(util.max()),
        # Cumulative in the executor: the last step's value is the run's hit rate.
        "cache_hit_rate": float(iterations["kv_cache_hit_rate"].iloc[-1]),
        "mean_queued_requests": float(np.average(queued, weights=weights)),
        "max_queued_requests": int(queued.max()),
        # Per-step quantity: averaged over steps, not time.
        "mean_batch_size": float(batch.mean()),
        # The pool the run had (vLLM's num_gpu_blocks): on a GPU sized from the free memory.
        "num_kv_blocks": int(iterations["kv_max_blocks"].max()),
    }


def summarize(
    requests: pd.DataFrame,
    iterations: pd.DataFrame,
    slo: Mapping[str, float | None] | None = None,
    percentiles: Sequence[float] = (50, 90, 99),
) -> dict:
    """The run summary: vLLM's benchmark keys plus scheduler keys; plain JSON-able values.

    ``requests`` is a ``requests_frame``; ``iterations`` an ``iterations_frame``. ``slo`` maps
    any of ``ttft_ms``, ``tpot_ms``, ``e2el_ms`` to a limit in ms; a missing or None limit is not
    applied, and with no limit at all goodput equals request throughput.

    Keys: completed, num_rejected, num_requests, total_input_tokens, total_output_tokens
    (completed requests), duration (s), request_throughput, output_throughput,
    total_token_throughput, request_goodput (req/s, tok/s), {mean,median,std,pP}_{ttft,tpot,itl,
    e2el}_ms, num_preemptions, num_preempted_requests (all requests), and from the iterations:
    num_iterations, mean_kv_utilization (time-weighted by step_latency; a plain mean if step
    latencies are missing or all zero), peak_kv_utilization, cache_hit_rate (final, cumulative),
    mean_queued_requests (time-weighted like KV) and max_queued_requests, mean_batch_size
    (context + generation requests a step, averaged over steps), num_kv_blocks (the KV pool).

    Never raises on empty or all-rejected input: counts are 0, undefined metrics NaN.
    """
    done = requests[requests["status"] == RequestState.COMPLETE.value]
    rejected = requests["status"] == RequestState.REJECTED.value

    duration = _NAN
    if len(requests):
        start = requests["arrival_time"].min()
        end = requests["finish_time"].max()
        if math.isfinite(start) and math.isfinite(end):
            duration = float(end - start)

    n_done = len(done)
    input_tokens = int(done["num_prompt_tokens"].sum())
    output_tokens = int(done["num_output_tokens"].sum())
    good = int(_meets_slos(done, slo).sum())

    # One array, not one a request first: millions of gaps on a whole trace.
    itl_lists = done["itl_ms"]
    itl = np.fromiter(
        itertools.chain.from_iterable(itl_lists), dtype=float, count=sum(map(len, itl_lists))
    )
    summary: dict = {
        "completed": n_done,
        "num_rejected": int(rejected.sum()),
        "num_requests": len(requests),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "duration": duration,
        "request_throughput": _per_second(n_done, duration),
        "output_throughput": _per_second(output_tokens, duration),
        "total_token_throughput": _per_second(input_tokens + output_tokens, duration),
        "request_goodput": _per_second(good, duration),
    }
    for name, values in (
        ("ttft", done["ttft_ms"].to_numpy(dtype=float)),
        ("tpot", done["tpot_ms"].dropna().to_numpy(dtype=float)),
        ("itl", itl),
        ("e2el", done["e2el_ms"].to_numpy(dtype=float)),
    ):
        summary.update(_distribution(name, values, percentiles))

    summary["num_preemptions"] = int(requests["num_preemptions"].sum())
    summary["num_preempted_requests"] = int((requests["num_preemptions"] > 0).sum())
    summary.update(_iteration_summary(iterations))
    return summary
