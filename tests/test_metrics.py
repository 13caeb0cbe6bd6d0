"""harness.metrics against hand-computed values on a small fixed set of requests.

The requests (times in seconds; every completed request finishes at its last token):

    id  arrival  scheduled  token_times           out  prompt  notes
    0   0.0      0.1        0.5 0.6 0.8 1.0       4    10
    1   0.2      0.2        0.4                   1    5       one token: no TPOT
    2   0.3      0.4        0.7 0.8 1.5           3    20      preempted once between 0.8 and 1.5
    3   0.5      -          -                     0    100     rejected at 0.5
    4   1.0      1.1        1.3 1.5               2    8

TTFT ms: 500, 200, 400, 300   TPOT ms: 166.67, -, 400, 200   E2EL ms: 1000, 200, 1200, 500
ITL ms (pooled): 100 200 200 | - | 100 700 | 200. Duration: 0.0 -> 1.5 s.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from engine.request import FinishReason, Request, RequestState
from engine.stats import IterationStats
from harness.metrics import (
    ITERATION_COLUMNS,
    REQUEST_COLUMNS,
    iterations_frame,
    requests_frame,
    summarize,
)


def _complete(
    rid: int,
    arrival: float,
    scheduled: float,
    token_times: list[float],
    prompt_len: int,
    *,
    preemptions: int = 0,
    cached: int = 0,
) -> Request:
    r = Request(request_id=rid, prompt_token_ids=list(range(prompt_len)), arrival_time=arrival)
    r.start(scheduled)
    for i, t in enumerate(token_times):
        r.append_token(100 + i, t)
    r.num_preemptions = preemptions
    r.num_cached_tokens = cached
    r.finish(FinishReason.LENGTH, token_times[-1])
    return r


def _rejected(rid: int, arrival: float, prompt_len: int) -> Request:
    r = Request(request_id=rid, prompt_token_ids=list(range(prompt_len)), arrival_time=arrival)
    r.reject("prompt exceeds KV capacity", arrival)
    return r


def make_requests() -> list[Request]:
    return [
        _complete(0, 0.0, 0.1, [0.5, 0.6, 0.8, 1.0], 10),
        _complete(1, 0.2, 0.2, [0.4], 5),
        _complete(2, 0.3, 0.4, [0.7, 0.8, 1.5], 20, preemptions=1, cached=8),
        _rejected(3, 0.5, 100),
        _complete(4, 1.0, 1.1, [1.3, 1.5], 8),
    ]


def _stats(i: int, t: float, latency: float, **kw) -> IterationStats:
    base = dict(
        iteration=i,
        time=t,
        step_latency=latency,
        scheduling_time=0.001,
        forward_time=latency / 2,
        num_new_requests=0,
        num_rejected_requests=0,
        num_context_requests=0,
        num_context_tokens=0,
        num_generation_requests=0,
        num_paused_requests=0,
        num_queued_requests=0,
        num_active_requests=0,
        num_completed_requests=0,
        kv_max_blocks=8,
        kv_used_blocks=0,
        kv_free_blocks=8,
        kv_cache_hit_rate=0.0,
    )
    base.update(kw)
    base["kv_free_blocks"] = base["kv_max_blocks"] - base["kv_used_blocks"]
    return IterationStats(**base)


def make_stats() -> list[IterationStats]:
    # KV utilization 0.5, 1.0, 0.25 held for 0.1, 0.3, 0.6 s: time-weighted mean 0.5 (plain 0.583).
    return [
        _stats(0, 0.0, 0.1, kv_used_blocks=4, num_queued_requests=3, num_context_requests=2,
               num_context_tokens=30),
        _stats(1, 0.1, 0.3, kv_used_blocks=8, num_queued_requests=1, num_context_requests=1,
               num_context_tokens=20, num_generation_requests=2, kv_cache_hit_rate=0.2,
               num_paused_requests=1),
        _stats(2, 0.4, 0.6, kv_used_blocks=2, num_queued_requests=0, num_generation_requests=3,
               kv_cache_hit_rate=0.25),
    ]  # fmt: skip


@pytest.fixture
def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    return requests_frame(make_requests()), iterations_frame(make_stats())


def test_requests_frame_rows(frames):
    req, _ = frames
    assert list(req.columns) == list(REQUEST_COLUMNS)
    assert list(req["status"]) == ["complete"] * 3 + ["rejected", "complete"]
    assert list(req["finish_reason"]) == ["length"] * 3 + ["rejected", "length"]
    assert req.loc[3, "rejection_reason"] == "prompt exceeds KV capacity"
    np.testing.assert_allclose(req["ttft_ms"], [500, 200, 400, np.nan, 300])
    np.testing.assert_allclose(req["tpot_ms"], [500 / 3, np.nan, 400, np.nan, 200])
    np.testing.assert_allclose(req["e2el_ms"], [1000, 200, 1200, np.nan, 500])
    np.testing.assert_allclose(req["queue_time_ms"], [100, 0, 100, np.nan, 100])
    np.testing.assert_allclose(req["finish_time"], [1.0, 0.4, 1.5, 0.5, 1.5])
    assert math.isnan(req.loc[3, "first_token_time"])
    assert list(req["num_output_tokens"]) == [4, 1, 3, 0, 2]
    assert list(req["num_preemptions"]) == [0, 0, 1, 0, 0]
    assert list(req["num_cached_tokens"]) == [0, 0, 8, 0, 0]
    for got, want in zip(req["itl_ms"], [[100, 200, 200], [], [100, 700], [], [200]], strict=True):
        np.testing.assert_allclose(got, want)


def test_iterations_frame(frames):
    _, it = frames
    assert list(it.columns) == list(ITERATION_COLUMNS)
    np.testing.assert_allclose(it["kv_utilization"], [0.5, 1.0, 0.25])


def test_counts_throughputs_duration(frames):
    s = summarize(*frames)
    assert s["completed"] == 4
    assert s["num_rejected"] == 1
    assert s["num_requests"] == 5
    assert s["total_input_tokens"] == 43
    assert s["total_output_tokens"] == 10
    assert s["duration"] == pytest.approx(1.5)
    assert s["request_throughput"] == pytest.approx(4 / 1.5)
    assert s["output_throughput"] == pytest.approx(10 / 1.5)
    assert s["total_token_throughput"] == pytest.approx(53 / 1.5)
    assert s["request_goodput"] == pytest.approx(4 / 1.5)  # no SLO: every completed request
    assert s["num_preemptions"] == 1
    assert s["num_preempted_requests"] == 1


def test_latency_distributions(frames):
    s = summarize(*frames)
    expected = {
        # TTFT 200 300 400 500: p99 at rank 2.97 -> 400 + 0.97 * 100; p90 at 2.7.
        "mean_ttft_ms": 350.0,
        "median_ttft_ms": 350.0,
        "std_ttft_ms": math.sqrt(12500),
        "p50_ttft_ms": 350.0,
        "p90_ttft_ms": 470.0,
        "p99_ttft_ms": 497.0,
        # TPOT 166.67 200 400 (the one-token request has none): p99 at 1.98 -> 200 + 0.98 * 200.
        "mean_tpot_ms": (500 / 3 + 400 + 200) / 3,
        "median_tpot_ms": 200.0,
        "p99_tpot_ms": 396.0,
        # ITL pooled 100 100 200 200 200 700: p99 at 4.95 -> 200 + 0.95 * 500.
        "mean_itl_ms": 250.0,
        "median_itl_ms": 200.0,
        "p99_itl_ms": 675.0,
        # E2EL 200 500 1000 1200: p99 at 2.97 -> 1000 + 0.97 * 200.
        "mean_e2el_ms": 725.0,
        "median_e2el_ms": 750.0,
        "p99_e2el_ms": 1194.0,
    }
    for key, value in expected.items():
        assert s[key] == pytest.approx(value), key


def test_custom_percentiles_key_spelling(frames):
    s = summarize(*frames, percentiles=(25, 99.9))
    assert s["p25_ttft_ms"] == pytest.approx(275.0)
    assert "p99.9_itl_ms" in s
    assert "p99_ttft_ms" not in s


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        # R0 fails TTFT (500); R2 fails TPOT (400); R1 has no TPOT and passes; R4 passes.
        ({"ttft_ms": 450, "tpot_ms": 300}, 2),
        ({"ttft_ms": 450, "tpot_ms": 300, "e2el_ms": None}, 2),  # None: not applied
        ({"e2el_ms": 1100}, 3),  # only R2 (1200) fails
        ({"tpot_ms": 150}, 1),  # only the one-token request passes
        ({"ttft_ms": 100}, 0),
        ({}, 4),
    ],
)
def test_goodput(frames, slo, good):
    assert summarize(*frames, slo=slo)["request_goodput"] == pytest.approx(good / 1.5)


def test_goodput_rejects_unknown_slo_key(frames):
    with pytest.raises(ValueError, match="unknown SLO key"):
        summarize(*frames, slo={"ttft": 100})


def test_iteration_summary(frames):
    s = summarize(*frames)
    assert s["num_iterations"] == 3
    assert s["mean_kv_utilization"] == pytest.approx((0.5 * 0.1 + 1.0 * 0.3 + 0.25 * 0.6) / 1.0)
    assert s["peak_kv_utilization"] == pytest.approx(1.0)
    assert s["cache_hit_rate"] == pytest.approx(0.25)
    assert s["mean_queued_requests"] == pytest.approx(3 * 0.1 + 1 * 0.3)
    assert s["max_queued_requests"] == 3
    assert s["mean_batch_size"] == pytest.approx((2 + 3 + 3) / 3)
    assert s["num_kv_blocks"] == 8  # the pool the steps saw


def test_iteration_summary_without_step_times_uses_plain_mean(frames):
    req, it = frames
    it = it.assign(step_latency=0.0)
    s = summarize(req, it)
    assert s["mean_kv_utilization"] == pytest.approx((0.5 + 1.0 + 0.25) / 3)


def test_empty_input_does_not_crash():
    s = summarize(requests_frame([]), iterations_frame([]))
    assert s["completed"] == 0 and s["num_rejected"] == 0 and s["num_iterations"] == 0
    assert s["total_output_tokens"] == 0
    for key in ("duration", "request_throughput", "mean_ttft_ms", "p99_itl_ms",
                "mean_kv_utilization", "cache_hit_rate", "num_kv_blocks"):  # fmt: skip
        assert math.isnan(s[key]), key


def test_all_rejected_does_not_crash():
    req = requests_frame([_rejected(0, 0.0, 10), _rejected(1, 0.5, 10)])
    s = summarize(req, iterations_frame(make_stats()), slo={"ttft_ms": 100})
    assert s["completed"] == 0 and s["num_rejected"] == 2
    assert s["duration"] == pytest.approx(0.5)
    assert s["request_throughput"] == 0.0 and s["request_goodput"] == 0.0
    assert math.isnan(s["mean_ttft_ms"]) and math.isnan(s["median_tpot_ms"])
    assert math.isnan(s["mean_itl_ms"])


def test_unfinished_request_is_not_counted():
    r = Request(request_id=7, prompt_token_ids=[1, 2, 3], arrival_time=0.0)
    assert r.state is RequestState.QUEUED
    req = requests_frame([*make_requests(), r])
    assert req.iloc[-1]["status"] == "queued"
    s = summarize(req, iterations_frame([]))
    assert s["completed"] == 4 and s["num_rejected"] == 1
    assert s["duration"] == pytest.approx(1.5)
