"""The Hydra harness end to end: every experiment composes and runs shrunk, sweeps (one job
failing), config errors before any work, a user's policy by ``_target_``, the notebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from harness.config import check_component, register_configs, register_resolvers
from harness.results import RunResult, SweepResult, load
from harness.workload import build_workload

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "harness" / "conf" / "experiment").glob("*.yaml"))
# Shrink any workload: a few requests, short outputs, on the CPU.
SHRINK = [
    "executor.device=cpu",
    "workload.max_requests=6",
    "workload.max_output_len=6",
    "workload.max_input_len=96",
    "progress=false",
]

register_configs()
register_resolvers()


def harness(tmp_path: Path, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    # The repo first, then what the caller had (a machine may carry Hydra in a --target dir).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        # flags (-m) must come before the overrides
        [
            sys.executable,
            "-m",
            "harness",
            *sorted(args, key=lambda a: not a.startswith("-")),
            f"output_root={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def only_dir(path: Path) -> Path:
    [child] = [p for p in path.iterdir() if p.is_dir()]
    return child


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_workload(experiment):
    with initialize_config_module(config_module="harness.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}"])
    assert cfg.name == experiment
    for group in ("capacity_scheduler", "microbatch_scheduler", "kv_cache_manager"):
        check_component(group, OmegaConf.to_container(cfg[group], resolve=True))
    workload = build_workload(
        OmegaConf.to_container(cfg.workload, resolve=True), vocab_size=320, max_seq_len=512
    )
    assert len(workload) > 0


def test_at_least_three_experiments():
    assert {"fcfs_vs_maxutil", "chunked_prefill", "prefix_reuse"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_shrunk(tmp_path, experiment):
    proc = harness(tmp_path, f"experiment={experiment}", *SHRINK)
    sweep_dir = only_dir(tmp_path / experiment)
    result = load(sweep_dir)
    assert isinstance(result, SweepResult)
    assert len(result.runs) >= 2 and all(run.status == "ok" for run in result.runs)
    assert (sweep_dir / "summary.csv").is_file()
    assert (result.summary["completed"] == 6).all()
    assert "sweep results:" in proc.stdout


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_simulated_at_gpu_size(tmp_path, experiment):
    """executor.engine=sim model=llama-8b: each experiment at its GPU sizing, on this CPU."""
    from tests.test_sim import synthetic_profile

    profile = tmp_path / "llama-8b.json"
    synthetic_profile("llama-8b", free_bytes_for_kv=40 * 2**30).save(profile)
    out = tmp_path / "out"
    harness(
        out,
        f"experiment={experiment}",
        "executor.engine=sim",
        "model=llama-8b",
        f"executor.profile={profile}",
        "workload.max_requests=80",
        "progress=false",
        "plots=false",
    )
    result = load(only_dir(out / experiment))
    assert all(run.status == "ok" for run in result.runs) and len(result.runs) >= 2
    assert (result.summary["completed"] == 80).all()
    assert {run.info["model"] for run in result.runs} == {"llama-8b"}


def test_fcfs_vs_maxutil_really_differs(tmp_path):
    """The experiment's point: on the same arrivals, MAX_UTILIZATION preempts and
    GUARANTEED_NO_EVICT does not (it queues instead). Everything arrives at t=0 so that the
    outcome does not depend on how fast this machine steps."""
    harness(
        tmp_path,
        "experiment=fcfs_vs_maxutil",
        "executor.device=cpu",
        "progress=false",
        "plots=false",
        "workload.max_requests=24",
        "workload.arrival.process=all_at_once",
    )
    summary = load(only_dir(tmp_path / "fcfs_vs_maxutil")).summary.set_index("capacity_scheduler")
    assert summary.loc["max_utilization", "num_preemptions"] > 0
    assert summary.loc["guaranteed_no_evict", "num_preemptions"] == 0
    assert summary.loc["guaranteed_no_evict", "max_queued_requests"] > 0


def test_single_run_writes_its_results_and_the_notebook_reads_them(tmp_path):
    proc = harness(tmp_path, *SHRINK, "name=single")
    run_dir = only_dir(tmp_path / "single")
    assert f"results: {run_dir}" in proc.stdout
    for name in (
        "config.yaml",
        "run.json",
        "requests.parquet",
        "iterations.parquet",
        "summary.json",
        "latency_cdfs.png",
    ):
        assert (run_dir / name).is_file(), name
    result = load(run_dir)
    assert isinstance(result, RunResult)
    assert len(result.requests) == 6 and result.summary["completed"] == 6
    assert result.info["device"] == "cpu"

    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "experiments" / "analysis.ipynb", as_version=4)
    os.environ["SCHEDLAB_RESULTS"] = str(run_dir)
    try:
        NotebookClient(
            notebook,
            timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(ROOT)}},
        ).execute()
    finally:
        del os.environ["SCHEDLAB_RESULTS"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("output_throughput" in str(o.get("data", {}).get("text/plain", "")) for o in outputs)


AZURE_EXCERPT = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,74,4
2023-11-16 18:15:46.9951690,96,9
2023-11-16 18:15:47.1000000,40,5
"""


def test_a_failing_job_leaves_the_others_and_the_summary(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text(AZURE_EXCERPT)
    bad = tmp_path / "bad.csv"
    bad.write_text(AZURE_EXCERPT.replace(",96,", ",lots,"))
    proc = harness(
        tmp_path,
        "-m",
        "workload=azure",
        f"workload.path={good},{bad}",
        "name=sw",
        "executor.device=cpu",
        "progress=false",
        expect_ok=False,
    )
    assert proc.returncode == 1
    sweep_dir = only_dir(tmp_path / "sw")
    result = load(sweep_dir)
    statuses = dict(
        zip(result.summary["workload.path"].astype(str), result.summary["status"], strict=True)
    )
    assert statuses == {str(good): "ok", str(bad): "failed"}
    error = result.summary.set_index("status").loc["failed", "error"]
    assert "bad.csv:3" in error and "lots" in error
    assert (sweep_dir / "summary.csv").is_file() and "1 of 2 runs failed" in proc.stdout


def test_a_malformed_trace_fails_before_any_work_and_writes_no_results(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,74\n")
    proc = harness(
        tmp_path,
        "workload=azure",
        f"workload.path={bad}",
        "name=bad",
        "executor.device=cpu",
        expect_ok=False,
    )
    assert proc.returncode == 2
    assert "GeneratedTokens" in proc.stderr and "bad.csv" in proc.stderr
    assert "Traceback" not in proc.stderr
    run_dir = only_dir(tmp_path / "bad")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert not (run_dir / "requests.parquet").exists() and not (run_dir / "summary.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("executor.dtype=float8", "float8"),
        ("executor.dvice=cpu", "dvice"),
        ("capacity_scheduler=shortest_first", "max_utilization"),
        ("capacity_scheduler.max_num_request=3", "max_num_request"),
        ("workload=nonexistent", "synthetic"),
    ],
)
def test_wrong_keys_and_values_fail_at_composition(override, message):
    with (
        initialize_config_module(config_module="harness.conf", version_base="1.3"),
        pytest.raises(Exception, match=message),
    ):
        cfg = compose(config_name="config", overrides=[override])
        OmegaConf.to_container(cfg, resolve=True)


def test_wrong_policy_values_fail_before_the_model_is_built(tmp_path):
    proc = harness(tmp_path, "microbatch_scheduler.chunking=lifo", *SHRINK, expect_ok=False)
    assert proc.returncode == 2
    assert "chunking must be one of" in proc.stderr and "Traceback" not in proc.stderr


def test_a_users_policy_plugs_in_by_target(tmp_path):
    harness(
        tmp_path,
        "capacity_scheduler._target_=tests.test_executor.AdmitAllOneStep",
        "~capacity_scheduler.max_num_requests",
        *SHRINK,
        "name=mine",
        "plots=false",
    )
    config = (only_dir(tmp_path / "mine") / "config.yaml").read_text()
    assert "tests.test_executor.AdmitAllOneStep" in config


def test_sweeps_run_in_parallel_with_the_joblib_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    harness(
        tmp_path,
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "workload.rate=2,8",
        *SHRINK,
        "name=par",
        "plots=false",
    )
    result = load(only_dir(tmp_path / "par"))
    assert sorted(result.summary["workload.rate"]) == [2, 8]
    assert (result.summary["status"] == "ok").all()


@pytest.mark.parametrize(
    ("overrides", "key"), [(["workload=azure"], "workload.path"), (["model=local"], "model.path")]
)
def test_a_missing_mandatory_value_is_named(tmp_path, overrides, key):
    proc = harness(tmp_path, *overrides, "executor.device=cpu", expect_ok=False)
    assert proc.returncode == 2
    assert f"no value for {key}" in proc.stderr and "Traceback" not in proc.stderr


def test_sim_engine_runs_an_experiment_from_a_profile(tmp_path: Path):
    """executor.engine=sim sizes the experiment for a GPU (llama-1b, GPU load) and runs it on a
    CPU from a profile; the results have the same layout, and the policies differ as on a GPU."""
    from tests.test_sim import synthetic_profile

    profile = tmp_path / "llama-1b.json"
    synthetic_profile("llama-1b").save(profile)
    out = tmp_path / "out"
    harness(
        out,
        "experiment=fcfs_vs_maxutil",
        "executor.engine=sim",
        f"executor.profile={profile}",
        "workload.max_requests=120",
        "progress=false",
    )
    sweep = load(only_dir(out / "fcfs_vs_maxutil"))
    assert isinstance(sweep, SweepResult)
    summary = sweep.summary.set_index("capacity_scheduler")
    assert set(summary["status"]) == {"ok"}
    assert summary.loc["max_utilization", "num_preemptions"] > 0
    assert summary.loc["guaranteed_no_evict", "num_preemptions"] == 0
    run = next(r for r in sweep.runs if r.info["status"] == "ok")
    assert run.info["engine"] == "sim" and run.info["device"] == "sim (Synthetic GPU)"
    assert run.info["model"] == "llama-1b" and run.info["num_requests"] == 120
    # The fidelity report on the sweep against itself: max_utilization's effect against
    # guaranteed_no_evict (the first), the same on both sides.
    from harness.fidelity import main as fidelity

    report = tmp_path / "report"
    assert fidelity([str(sweep.path), str(sweep.path), "--out", str(report)]) == 0
    table = pd.read_csv(report / "effects.csv")
    assert set(table["variant"].str.extract(r"capacity_scheduler=(\w+)")[0]) == {"max_utilization"}
    assert (table["difference"] == 0).all() and table["same_direction"].all()
    assert (report / "effects.png").stat().st_size > 0
    args = [str(sweep.path), str(sweep.path), "--out", str(report), "--baseline", "max_util"]
    assert fidelity(args) == 0
    assert pd.read_csv(report / "effects.csv")["baseline"].str.contains("max_util").all()


def test_sim_of_full_cuda_graphs_takes_their_profile(tmp_path: Path):
    """executor.full_cuda_graphs=true simulates with the profile of that engine (llama-1b's is
    committed), never quietly with the piecewise engine's (llama-8b has none)."""
    proc = harness(
        tmp_path, "executor.engine=sim", "executor.full_cuda_graphs=true", "model=llama-8b",
        expect_ok=False,
    )  # fmt: skip
    assert proc.returncode == 2
    out = proc.stderr + proc.stdout
    assert "no profile for model 'llama-8b' on 'h200' with overlap scheduling and full CUDA" in out
    assert "--full-graphs" in out
    ok = tmp_path / "llama-1b"
    run = harness(
        ok, "executor.engine=sim", "executor.full_cuda_graphs=true", "model=llama-1b",
        "workload.max_requests=4",
    )  # fmt: skip
    assert run.returncode == 0
    (info,) = ok.rglob("run.json")
    assert "llama-1b.full.overlap.json" in info.read_text()


def test_sim_engine_without_a_profile_says_how_to_make_one(tmp_path: Path):
    proc = harness(
        tmp_path,
        "executor.engine=sim",
        "model=llama-8b",
        "executor.sim_device=a100",
        expect_ok=False,
    )
    assert proc.returncode == 2
    assert "no profile for model 'llama-8b' on 'a100'" in proc.stderr + proc.stdout
    available = (
        "available: h100/llama-1b, h100/llama-8b, h200/llama-1b, h200/llama-1b.full.overlap, "
        "h200/llama-1b.overlap, h200/llama-8b, h200/llama-8b.overlap"
    )
    assert available in proc.stderr + proc.stdout
    assert "python -m engine.sim.profiler" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("overlap", [True, False])
def test_sim_engine_runs_on_the_committed_h200_profile(tmp_path: Path, overlap: bool):
    """No executor.profile: engine/sim/profiles/h200/llama-8b.json, measured on the H200, or
    llama-8b.overlap.json with overlap scheduling (the default)."""
    out = tmp_path / "out"
    harness(
        out,
        "executor.engine=sim",
        "model=llama-8b",
        "workload.num_requests=40",
        f"executor.overlap_scheduler={str(overlap).lower()}",
        "progress=false",
    )
    run = load(only_dir(out / "default"))
    assert run.info["status"] == "ok" and run.info["engine"] == "sim"
    assert run.info["device"] == "sim (NVIDIA H200)"
    name = "llama-8b.overlap.json" if overlap else "llama-8b.json"
    assert run.info["profile"].endswith(f"engine/sim/profiles/h200/{name}")
    assert len(run.requests) == 40 and (run.requests["e2el_ms"] > 0).all()


def test_overlap_scheduling_can_be_turned_off(tmp_path: Path):
    out = tmp_path / "out"
    harness(out, "executor.overlap_scheduler=false", *SHRINK, "progress=false")
    run = load(only_dir(out / "default"))
    assert run.info["status"] == "ok" and run.config["executor"]["overlap_scheduler"] is False
    assert len(run.requests) == 6 and (run.requests["status"] == "complete").all()
    assert run.iterations["num_context_tokens"].sum() > 0


def test_overlap_scheduling_is_the_default(tmp_path: Path):
    from harness.config import ExecutorConfig

    assert ExecutorConfig().overlap_scheduler is True
    out = tmp_path / "out"
    harness(out, *SHRINK, "progress=false")
    run = load(only_dir(out / "default"))
    assert run.config["executor"]["overlap_scheduler"] is True


def test_a_run_frees_its_engine_even_where_a_cycle_holds_it(tmp_path: Path, monkeypatch):
    """A sweep's next run on a GPU sizes its KV pool from the free memory: the last run's
    engine must be gone by then. Here a reference cycle holds the engine (as CUDA graph runners
    can) and automatic collection is off: the run still leaves no engine alive, and gives back
    a real engine's GPU memory first."""
    import gc
    import weakref

    from engine.llm import LLM
    from harness.app import execute

    alive, released = [], []
    init = LLM.__init__

    def held_by_a_cycle(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.myself = self  # the cycle
        alive.append(weakref.ref(self))

    monkeypatch.setattr(LLM, "__init__", held_by_a_cycle)
    monkeypatch.setattr(LLM, "release_gpu_memory", lambda self: released.append(self.engine))
    with initialize_config_module(config_module="harness.conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "model=llama-tiny",
                "executor.device=cpu",
                "workload.max_requests=4",
                "progress=false",
                "plots=false",
            ],
        )
    info = {"name": "t", "overrides": [], "variant": "default", "status": "running"}
    gc.disable()
    try:
        execute(cfg, tmp_path, info)
        assert len(alive) == 1 and alive[0]() is None
    finally:
        gc.enable()
    assert released == ["torch"]


def test_a_sweep_names_a_run_whose_pool_was_cut_short():
    """A sweep's run with an eighth of the others' KV pool, where nothing swept sizes the pool
    (a GPU whose memory an earlier run still held): named, with its share. Where the sweep
    varies the pool's settings, or every pool is alike, nothing is said."""
    from harness.report import pool_warnings

    summary = pd.DataFrame({"run": ["0", "1", "2"], "num_kv_blocks": [28449, 3445, 28000]})
    (warning,) = pool_warnings(summary, ["microbatch_scheduler"])
    assert warning.startswith("run 1 had a KV pool of 3,445 blocks, 12% of the sweep's largest")
    assert pool_warnings(summary, ["kv_cache_manager.max_tokens"]) == []
    assert pool_warnings(summary.assign(num_kv_blocks=28449), ["microbatch_scheduler"]) == []
