"""bench/sim_replay.py: a real run simulated three ways, each against that run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import yaml

from bench.sim_replay import main, replay, targets_met, workload_overrides
from engine.sim import HostTimeline
from tests.test_calibrate import cpu_run
from tests.test_sim import split_profile


def test_a_real_run_is_replayed_on_its_own_host_and_device(tmp_path: Path):
    run = cpu_run(tmp_path, "executor.overlap_scheduler=true")
    assert workload_overrides(run)[-1] == "hydra.mode=RUN"
    assert not any(o.startswith(("output_root", "progress")) for o in workload_overrides(run))
    iterations = pd.read_parquet(run / "iterations.parquet")
    # As a GPU run records it: a device time beside the host's.
    profile = dataclasses.replace(split_profile("llama-tiny"), device="cpu")
    profile.save(tmp_path / "p.json")
    iterations.assign(device_time=0.5 * iterations.host_time).to_parquet(run / "iterations.parquet")
    out = tmp_path / "replay"
    extra = ["executor.sim_host_time_scale=1.5"]  # --set: added to every way
    # The same run twice: the second is replayed as the first, its own host measured again;
    # the default simulation, the same for both, is made once.
    table = replay([str(run), str(run)], out, str(tmp_path / "p.json"), extra)
    assert table.way.tolist() == ["default", "host timeline", "timeline, device"] * 2
    assert table.within.str.fullmatch(r"[0-7]/7").all()
    assert (out / "replay.csv").is_file()
    timeline = HostTimeline.load(out / "0" / "host_timeline.csv")
    assert len(timeline.scales) >= 1
    assert table.sim[0] == table.sim[3] and not (out / "1" / "sim-0").exists()
    assert table.sim[1] != table.sim[4]  # each run's own host timeline
    # Each way's simulation ran with what it names, on the run's workload.
    for i in range(2):
        settings = []
        for j in range(3):
            (requests,) = Path(table.sim[3 * i + j]).parent.rglob("requests.parquet")
            cfg = yaml.safe_load((requests.parent / "config.yaml").read_text())
            assert cfg["model"]["name"] == "llama-tiny" and cfg["executor"]["engine"] == "sim"
            assert cfg["workload"]["max_requests"] == 8
            assert cfg["executor"]["sim_host_time_scale"] == 1.5
            executor = cfg["executor"]
            settings.append((executor["sim_host_timeline"], executor["sim_device_time_scale"]))
        timeline_path = str(out / str(i) / "host_timeline.csv")
        scale = round(float(table.device_scale.iloc[3 * i]), 4)
        assert settings == [(None, 1.0), (timeline_path, 1.0), (timeline_path, scale)]


def test_the_default_way_alone_counts_the_targets_met(tmp_path: Path, capsys):
    """--default-only: one simulation a run, no host measured (a profile without the host apart
    will do), and the targets met over all runs, as the table's rows add up."""
    from tests.test_sim import synthetic_profile

    run = cpu_run(tmp_path, "executor.overlap_scheduler=true")
    dataclasses.replace(synthetic_profile("llama-tiny"), device="cpu").save(tmp_path / "p.json")
    out = tmp_path / "default"
    args = [str(run), str(run), "--out", str(out), "--profile", str(tmp_path / "p.json")]
    assert main([*args, "--default-only"]) == 0
    table = pd.read_csv(out / "replay.csv")
    assert table.way.tolist() == ["default", "default"] and table.device_scale.isna().all()
    assert not (out / "0" / "host_timeline.csv").exists()
    # One simulation for both: a deterministic simulator gives the same workload the same run.
    assert [len(list((out / str(i)).rglob("requests.parquet"))) for i in range(2)] == [1, 0]
    assert table.sim.nunique() == 1 and table.within.nunique() == 1
    (met,) = targets_met(table).values()
    assert met == sum(int(w.split("/")[0]) for w in table.within)
    assert f"default: {met} of 14 targets met" in capsys.readouterr().out
    assert main(args) == 2  # the other ways need the host apart
    assert "does not fit the host apart" in capsys.readouterr().err
