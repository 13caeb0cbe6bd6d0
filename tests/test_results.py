"""harness.results and harness.plots: run directories round-trip, sweeps load and summarise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from harness import results
from harness.metrics import iterations_frame, requests_frame, summarize
from harness.results import (
    RunResult,
    SweepResult,
    load,
    write_failed_run,
    write_run,
    write_sweep_summary,
)
from tests.test_metrics import make_requests, make_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_PLOTS = (
    "latency_cdfs.png",
    "kv_utilization.png",
    "request_counts.png",
    "batch_composition.png",
)
SWEEP_PLOTS = (
    "sweep_latency_cdfs.png",
    "sweep_throughput.png",
    "sweep_kv_utilization.png",
    "sweep_request_counts.png",
)


def _frames(scale: float = 1.0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The metrics tests' requests and iterations, latencies stretched by ``scale``."""
    req = requests_frame(make_requests())
    for col in ("ttft_ms", "tpot_ms", "e2el_ms"):
        req[col] = req[col] * scale
    req["itl_ms"] = [[x * scale for x in v] for v in req["itl_ms"]]
    it = iterations_frame(make_stats())
    return req, it, summarize(req, it, slo={"ttft_ms": 450})


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), path


def _summaries_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        both_nan = isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])
        assert both_nan or a[k] == b[k], k


def test_write_run_round_trip(tmp_path):
    req, it, summary = _frames()
    summary["p99_extra_ms"] = float("nan")  # NaN must survive summary.json as NaN
    run_dir = write_run(
        tmp_path / "run",
        requests=req,
        iterations=it,
        summary=summary,
        run_info={"name": "demo", "overrides": ["workload.rate=4"], "seed": 3},
        config_yaml="engine:\n  policy: max_utilization\n  tokens_per_block: 16\n",
    )
    got = load(run_dir)
    assert isinstance(got, RunResult)
    pd.testing.assert_frame_equal(got.requests, req)
    pd.testing.assert_frame_equal(got.iterations, it)
    _summaries_equal(got.summary, summary)
    assert got.config == {"engine": {"policy": "max_utilization", "tokens_per_block": 16}}
    assert got.info == {
        "name": "demo",
        "overrides": ["workload.rate=4"],
        "seed": 3,
        "status": "ok",
        "error": None,
    }
    assert got.overrides == {"workload.rate": 4}
    # Strict JSON on disk: NaN written as null.
    assert json.loads((run_dir / "summary.json").read_text())["p99_extra_ms"] is None
    for name in RUN_PLOTS:
        _assert_png(run_dir / name)
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*"))


def test_write_run_without_plots_and_empty_frames(tmp_path):
    req, it = requests_frame([]), iterations_frame([])
    run_dir = write_run(
        tmp_path / "empty",
        requests=req,
        iterations=it,
        summary=summarize(req, it),
        run_info={"name": "empty"},
        plots=False,
    )
    got = load(run_dir)
    assert got.requests.empty and got.iterations.empty
    assert got.summary["completed"] == 0 and math.isnan(got.summary["mean_ttft_ms"])
    assert not list(run_dir.glob("*.png"))
    assert got.config == {}  # no config.yaml written


def test_run_plots_of_empty_run_are_drawn(tmp_path):
    req, it = requests_frame([]), iterations_frame([])
    run_dir = write_run(
        tmp_path / "empty",
        requests=req,
        iterations=it,
        summary=summarize(req, it),
        run_info={"name": "empty"},
    )
    for name in RUN_PLOTS:
        _assert_png(run_dir / name)


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    req, it, summary = _frames()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_run(tmp_path / "r", requests=req, iterations=it, summary=summary, run_info={})
    assert list((tmp_path / "r").iterdir()) == []  # no temp file, no run.json


def test_rewrite_replaces_stale_run(tmp_path, monkeypatch):
    req, it, summary = _frames()
    write_run(
        tmp_path / "r", requests=req, iterations=it, summary=summary, run_info={}, plots=False
    )
    monkeypatch.setattr(
        pd.DataFrame, "to_parquet", lambda *a, **k: (_ for _ in ()).throw(OSError("boom"))
    )
    with pytest.raises(OSError):
        write_run(tmp_path / "r", requests=req, iterations=it, summary=summary, run_info={})
    # The old run.json is gone: the directory no longer claims a complete run.
    assert not (tmp_path / "r" / "run.json").exists()


def test_failed_run(tmp_path):
    run_dir = write_failed_run(
        tmp_path / "f", run_info={"name": "bad", "overrides": ["a=1"]}, error="CUDA OOM"
    )
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]
    got = load(run_dir)
    assert got.info["status"] == "failed" and got.info["error"] == "CUDA OOM"
    assert got.requests.empty and got.iterations.empty and got.summary == {}


def _make_sweep(root: Path) -> Path:
    """Three runs under root/group/<job>: two ok at different rates, one failed."""
    for job, rate, scale in (("0", 2, 1.0), ("1", 8, 3.0)):
        req, it, summary = _frames(scale)
        summary = {**summary, "output_throughput": summary["output_throughput"] * rate}
        write_run(
            root / "group" / job,
            requests=req,
            iterations=it,
            summary=summary,
            run_info={"name": f"job{job}", "overrides": [f"workload.rate={rate}", "policy=mu"]},
            plots=False,
        )
    write_failed_run(
        root / "group" / "2",
        run_info={"name": "job2", "overrides": ["workload.rate=32.5", "policy=mu"]},
        error="ValueError: bad rate",
    )
    return root


def test_sweep_load(tmp_path):
    sweep = load(_make_sweep(tmp_path / "sweep"))
    assert isinstance(sweep, SweepResult)
    assert [r.info["name"] for r in sweep.runs] == ["job0", "job1", "job2"]
    s = sweep.summary
    assert list(s.columns[:6]) == ["run", "name", "status", "error", "workload.rate", "policy"]
    assert list(s["run"]) == ["group/0", "group/1", "group/2"]
    assert list(s["status"]) == ["ok", "ok", "failed"]
    assert s.loc[2, "error"] == "ValueError: bad rate"
    assert list(s["workload.rate"]) == [2, 8, 32.5]
    assert pd.api.types.is_numeric_dtype(s["workload.rate"])
    assert list(s["completed"][:2]) == [4, 4] and math.isnan(s.loc[2, "completed"])
    # Frames concatenated with run and override columns; the failed run adds no rows.
    assert len(sweep.requests) == 10 and len(sweep.iterations) == 6
    assert list(sweep.requests.columns[:3]) == ["run", "workload.rate", "policy"]
    assert sorted(set(sweep.requests["workload.rate"])) == [2, 8]


def test_write_sweep_summary(tmp_path):
    root = _make_sweep(tmp_path / "sweep")
    csv = write_sweep_summary(root)
    assert csv == root / "summary.csv"
    table = pd.read_csv(csv)
    assert list(table["status"]) == ["ok", "ok", "failed"]
    assert list(table["workload.rate"]) == [2, 8, 32.5]
    for name in (*SWEEP_PLOTS, "latency_vs_throughput.png"):
        _assert_png(root / name)
    assert not list(root.rglob("*.tmp"))


def test_no_latency_vs_throughput_without_varying_load(tmp_path):
    root = tmp_path / "sweep"
    for job, policy in (("a", "gne"), ("b", "mu")):
        req, it, summary = _frames()
        write_run(
            root / job,
            requests=req,
            iterations=it,
            summary=summary,
            run_info={"name": job, "overrides": [f"policy={policy}", "workload.rate=4"]},
            plots=False,
        )
    write_sweep_summary(root)
    for name in SWEEP_PLOTS:
        _assert_png(root / name)
    assert not (root / "latency_vs_throughput.png").exists()


def test_latency_vs_throughput_one_curve_per_policy(tmp_path):
    from harness import plots

    rows = [
        {"run": f"{p}/{r}", "status": "ok", "rate": r, "policy": p, "output_throughput": 10.0 * r,
         "median_ttft_ms": 1.0 * r, "p99_ttft_ms": 2.0 * r, "median_tpot_ms": 0.5 * r,
         "p99_tpot_ms": 0.9 * r}
        for p in ("gne", "mu") for r in (1, 2, 4)
    ]  # fmt: skip
    summary = pd.DataFrame(rows)
    assert plots.load_keys(summary, ["rate", "policy"]) == ["rate"]
    paths = plots.plot_latency_vs_throughput(summary, ["rate", "policy"], tmp_path / "lvt.png")
    assert paths == [tmp_path / "lvt.png"]
    _assert_png(paths[0])
    labels = plots.run_labels(summary, ["rate", "policy"])
    assert labels["mu/4"] == "rate=4, policy=mu"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run or sweep directory"):
        load(tmp_path)
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "run.json").write_text("{}")  # depth 3: out of reach
    with pytest.raises(FileNotFoundError, match="not a run or sweep directory"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such"):
        load(tmp_path / "missing")


def test_write_sweep_summary_refuses_a_run_dir(tmp_path):
    req, it, summary = _frames()
    write_run(
        tmp_path / "r", requests=req, iterations=it, summary=summary, run_info={}, plots=False
    )
    with pytest.raises(ValueError, match="single run"):
        write_sweep_summary(tmp_path / "r")


def test_parse_overrides():
    assert results.parse_overrides(
        ["a.rate=4", "b=0.5", "+c=x", "++d=1e3", "~e", "f=inf", "g=-2", "h=a=b"]
    ) == {"a.rate": 4, "b": 0.5, "c": "x", "d": 1000.0, "f": float("inf"), "g": -2, "h": "a=b"}


def test_long_runs_are_drawn_binned(tmp_path):
    """A million-step (simulated) run draws MAX_STEPS_DRAWN bins at their peaks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from harness.plots import MAX_STEPS_DRAWN, _over_time

    n = 3 * MAX_STEPS_DRAWN
    iterations = pd.DataFrame({"time": np.arange(n) * 0.01, "step_latency": np.full(n, 0.01)})
    values = np.zeros(n)
    values[12345] = 7.0  # one spike survives the binning
    fig, ax = plt.subplots()
    _over_time(ax, iterations, values)
    x, y = ax.lines[0].get_data()
    assert len(x) == MAX_STEPS_DRAWN + 1 and y.max() == 7.0
    assert x[0] == 0.0 and np.isclose(x[-1], n * 0.01)
    plt.close(fig)
