"""GPU telemetry (``harness.telemetry``): nvidia-smi's samples parsed, matched to steps and
summed up; the sampler's life (a stand-in nvidia-smi on the CPU); the harness's wiring; on a GPU,
a real run's clocks and power."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from harness.config import register_configs, register_resolvers
from harness.plots import run_plots
from harness.telemetry import (
    GpuTelemetry,
    at_steps,
    read_samples,
    telemetry_summary,
)

register_configs()
register_resolvers()


def stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]


T0 = datetime(2026, 11, 29, 8, 30, 45).timestamp()


def test_samples_are_parsed_with_their_reasons(tmp_path: Path):
    path = tmp_path / "t.csv"
    path.write_text(
        f"{stamp(T0)}, 1980, 3201, 124.79, 36, 0x0000000000000000\n"
        f"{stamp(T0 + 0.1)}, 1590, 3201, 689.50, 50, 0x0000000000000004\n"
        f"{stamp(T0 + 0.2)}, 1485, 3201, [N/A], 51, 0x0000000000000024\n"
        f"{stamp(T0 + 0.3)}, 1500, 32"  # cut short when sampling stopped
    )
    samples = read_samples(path)
    assert len(samples) == 3
    assert samples.epoch_s.tolist() == pytest.approx([T0, T0 + 0.1, T0 + 0.2])
    assert samples.sm_clock_mhz.tolist() == [1980, 1590, 1485]
    assert samples.power_w.iloc[1] == 689.5 and math.isnan(samples.power_w.iloc[2])
    assert samples.temperature_c.tolist() == [36, 50, 51]
    assert samples.is_power_capped.tolist() == [False, True, True]
    assert samples.is_thermal.tolist() == [False, False, True]


def samples_every(step: float, clocks: list[float], start: float = 0.0) -> pd.DataFrame:
    n = len(clocks)
    return pd.DataFrame(
        {
            "epoch_s": start + step * np.arange(n),
            "sm_clock_mhz": clocks,
            "power_w": [600.0 + i for i in range(n)],
            "temperature_c": [40.0 + i for i in range(n)],
            "is_power_capped": [i % 2 == 1 for i in range(n)],
            "is_thermal": [i == n - 1 for i in range(n)],
        }
    )


def test_each_step_gets_the_sample_nearest_its_middle():
    samples = samples_every(0.1, [1900.0, 1800.0, 1700.0, 1600.0], start=100.0)
    # Samples at epoch 100.0, 100.1, 100.2, 100.3; the run's clock read 0 at 100.02, so the
    # steps' middles are at 100.04, 100.17, 100.28 and 100.92.
    steps = pd.DataFrame({"time": [0.0, 0.1, 0.2, 0.8], "step_latency": [0.04, 0.1, 0.12, 0.2]})
    got = at_steps(samples, steps, epoch_origin=100.02)
    assert got.sm_clock_mhz.iloc[:3].tolist() == [1900.0, 1700.0, 1600.0]
    assert got.power_w.iloc[:3].tolist() == [600.0, 602.0, 603.0]
    assert got.sm_clock_mhz.isna().iloc[3]  # 0.6 s past the last sample: none near it
    lone = at_steps(samples.iloc[:1], steps, epoch_origin=100.02)
    assert lone.sm_clock_mhz.isna().all()


def test_the_summary_covers_the_runs_window_only():
    samples = samples_every(0.1, [1980.0, 1900.0, 1600.0, 1500.0, 1400.0])
    summary = telemetry_summary(samples, start=0.05, end=0.35)  # samples 1, 2, 3
    assert summary == {
        "gpu_sm_clock_mhz_p50": 1600.0,
        "gpu_power_w_p50": 602.0,
        "gpu_temperature_c_max": 43.0,
        "gpu_power_capped_share": pytest.approx(2 / 3),
        "gpu_thermal_share": 0.0,
    }
    assert telemetry_summary(samples, start=5.0, end=6.0) == {}


FAKE_SMI = """#!{python}
import datetime, sys, time
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
query = next(a for a in args if a.startswith("--query-gpu="))
loop = [a for a in args if a.startswith("--loop-ms=")]
if not loop:  # a probe of one field
    sys.exit({refuse} if "clocks_event_reasons" in query else 0)
period = int(loop[0].split("=")[1]) / 1000
i = 0
while True:
    now = datetime.datetime.now().strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    print(f"{{now}}, {{1500 + i}}, 3201, {{600.5 + i}}, 50, 0x{{4 * (i % 2):016x}}", flush=True)
    i += 1
    time.sleep(period)
"""


def fake_nvidia_smi(directory: Path, refuse_new_field: bool = False) -> tuple[Path, Path]:
    """A stand-in nvidia-smi that logs its arguments and prints a sample every --loop-ms;
    the probe of clocks_event_reasons fails where ``refuse_new_field`` (an old driver)."""
    log = directory / "smi-args.txt"
    binary = directory / "nvidia-smi"
    refuse = 6 if refuse_new_field else 0
    binary.write_text(FAKE_SMI.format(python=sys.executable, log=str(log), refuse=refuse))
    binary.chmod(0o755)
    return binary, log


@pytest.mark.parametrize("old_driver", [False, True])
def test_the_sampler_runs_beside_the_run_and_stops(tmp_path: Path, old_driver: bool):
    binary, log = fake_nvidia_smi(tmp_path, refuse_new_field=old_driver)
    path = tmp_path / "gpu_telemetry.csv"
    with GpuTelemetry(path, device="GPU-abc", interval_ms=20, executable=str(binary)) as sampler:
        process = sampler._process
        deadline = time.monotonic() + 30
        while len(read_samples(path)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert process.poll() is not None and sampler._process is None  # stopped
    samples = read_samples(path)
    assert len(samples) >= 5
    assert samples.sm_clock_mhz.iloc[:5].tolist() == [1500, 1501, 1502, 1503, 1504]
    assert samples.is_power_capped.iloc[:4].tolist() == [False, True, False, True]
    assert (np.diff(samples.epoch_s) >= 0).all()
    loop = [line for line in log.read_text().splitlines() if "--loop-ms=20" in line]
    assert len(loop) == 1 and "--id=GPU-abc" in loop[0]
    reasons = "clocks_throttle_reasons" if old_driver else "clocks_event_reasons"
    assert f"temperature.gpu,{reasons}.active" in loop[0]


def test_no_nvidia_smi_is_an_error_to_the_sampler_and_a_warning_to_the_run(
    tmp_path: Path, monkeypatch, caplog
):
    with pytest.raises(FileNotFoundError, match="no-such-smi not found"):
        GpuTelemetry(tmp_path / "t.csv", executable="no-such-smi").start()

    import harness.app as app

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi on it
    monkeypatch.setattr(app, "nvidia_smi_id", lambda device: "0")
    cuda_llm = type("L", (), {"device": torch.device("cuda", 0)})()
    cfg = compose_run(["executor.device=cpu"])
    with caplog.at_level(logging.WARNING, logger="harness.app"):
        assert app.start_telemetry(cfg, cuda_llm, tmp_path) is None
    assert "executor.gpu_telemetry: nvidia-smi not found" in caplog.text
    off = compose_run(["executor.device=cpu", "executor.gpu_telemetry=false"])
    assert app.start_telemetry(off, cuda_llm, tmp_path) is None
    cpu_llm = type("L", (), {"device": torch.device("cpu")})()
    assert app.start_telemetry(cfg, cpu_llm, tmp_path) is None


def compose_run(overrides: list[str]):
    with initialize_config_module(config_module="harness.conf", version_base="1.3"):
        return compose(
            config_name="config",
            overrides=["model=llama-tiny", "progress=false", "plots=false", *overrides],
        )


INFO = {"name": "t", "overrides": [], "variant": "default", "status": "running"}


def test_a_run_keeps_its_samples_and_gives_its_steps_their_clock(tmp_path: Path, monkeypatch):
    """The harness's wiring, with the stand-in sampler on the CPU: the samples stay in the run
    directory, each step gets the clock of the sample nearest it on the same clock, and the
    summary the run's medians. A CPU run of its own records none."""
    import harness.app as app

    binary, _ = fake_nvidia_smi(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def start(cfg, llm, directory):
        path = directory / "gpu_telemetry.csv"
        telemetry = GpuTelemetry(path, interval_ms=20, executable=str(binary))
        telemetry.start()
        assert read_samples(path).sm_clock_mhz.tolist()[:1] == [1500]  # start waits for it
        return telemetry

    monkeypatch.setattr(app, "start_telemetry", start)
    cfg = compose_run(["executor.device=cpu", "workload.num_requests=4"])
    summary = app.execute(cfg, run_dir, dict(INFO))
    assert (run_dir / "gpu_telemetry.csv").is_file()
    iterations = pd.read_parquet(run_dir / "iterations.parquet")
    samples = read_samples(run_dir / "gpu_telemetry.csv")
    clocks = iterations.sm_clock_mhz.dropna()
    assert len(clocks) >= len(iterations) // 2
    assert clocks.isin(samples.sm_clock_mhz).all()
    assert 600.5 <= summary["gpu_power_w_p50"] <= samples.power_w.max()
    assert 0 < summary["gpu_power_capped_share"] < 1
    requests = pd.read_parquet(run_dir / "requests.parquet")
    drawn = run_plots(requests, iterations, tmp_path / "plots")
    assert tmp_path / "plots" / "gpu_clock.png" in drawn

    monkeypatch.undo()
    own = tmp_path / "own"
    own.mkdir()
    summary = app.execute(cfg, own, dict(INFO))
    assert not (own / "gpu_telemetry.csv").exists()
    assert not [k for k in summary if k.startswith("gpu_")]
    iterations = pd.read_parquet(own / "iterations.parquet")
    assert "sm_clock_mhz" not in iterations
    drawn = run_plots(requests, iterations, tmp_path / "own_plots")
    assert drawn and not (tmp_path / "own_plots" / "gpu_clock.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and nvidia-smi")
def test_a_cuda_run_records_its_gpus_clock_and_power(tmp_path: Path):
    from harness.app import execute

    cfg = compose_run(["executor.device=cuda", "workload.num_requests=16"])
    summary = execute(cfg, tmp_path, dict(INFO))
    iterations = pd.read_parquet(tmp_path / "iterations.parquet")
    clocks = iterations.sm_clock_mhz.dropna()
    assert len(clocks) >= len(iterations) // 2, (len(clocks), len(iterations))
    assert (clocks > 100).all() and (iterations.power_w.dropna() > 10).all()
    assert summary["gpu_sm_clock_mhz_p50"] > 100 and summary["gpu_power_w_p50"] > 10
    assert 0 <= summary["gpu_power_capped_share"] <= 1
    assert os.path.getsize(tmp_path / "gpu_telemetry.csv") > 0
