"""A real run's host replayed in a simulation (``engine.sim.host_timeline``,
``executor.sim_host_timeline``), the device's time scaled (``sim_device_time_scale``), and
``python -m harness.calibrate --host-timeline`` measuring both from a run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.llm import LLM
from engine.request import SamplingParams
from engine.sim import HostDeviceCostModel, HostTimeline, LinearCostModel, StepFeatures
from harness.calibrate import features, host_time_table, host_timelines, main
from tests.test_sim import (
    DECODE,
    MIXED,
    constant_phases,
    law,
    request_rows,
    sim_llm,
    simulate_split_profile,
    split_profile,
    synthetic_profile,
)

# --- the timeline itself ------------------------------------------------------------------


def test_a_timeline_gives_each_time_the_scale_of_its_second():
    timeline = HostTimeline((0.0, 1.0, 2.0), (1.0, 2.0, 1.5))
    at = timeline.scale_at
    assert [at(-1.0), at(0.0), at(0.999), at(1.0), at(1.5), at(2.0), at(99.0)] == [
        1.0, 1.0, 1.0, 2.0, 2.0, 1.5, 1.5,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "times, scales, message",
    [
        ((), (), "at least one"),
        ((0.0, 1.0), (1.0,), "as many times as scales"),
        ((0.0, 1.0, 1.0), (1.0, 1.0, 1.0), "times must increase: 1.0 at row 2"),
        ((0.0, math.nan), (1.0, 1.0), "times must increase"),
        ((0.0, 1.0), (1.0, 0.0), "scales must be > 0: 0.0 at row 1"),
        ((0.0,), (math.inf,), "scales must be > 0"),
    ],
)
def test_a_timeline_refuses_what_cannot_be_a_host(times, scales, message):
    with pytest.raises(ValueError, match=message):
        HostTimeline(times, scales)


def test_a_timeline_of_samples_takes_each_seconds_median_and_carries_empty_ones():
    times = [1.2, 1.4, 1.7, 3.1, 3.5, 3.6, 2.0 + math.nan]
    scales = [1.0, 3.0, 2.0, 4.0, 6.0, 100.0, 5.0]
    timeline = HostTimeline.of_samples(times, scales)
    # second 0 (no samples) takes second 1's; second 2 (none) keeps second 1's; the NaN time
    # is left out.
    assert timeline == HostTimeline((0.0, 1.0, 2.0, 3.0), (2.0, 2.0, 2.0, 6.0))
    half = HostTimeline.of_samples([0.1, 0.6], [1.0, 3.0], bin_seconds=0.5)
    assert half == HostTimeline((0.0, 0.5), (1.0, 3.0))
    with pytest.raises(ValueError, match="no samples"):
        HostTimeline.of_samples([0.0], [math.nan])
    with pytest.raises(ValueError, match="bin_seconds must be > 0"):
        HostTimeline.of_samples([0.0], [1.0], bin_seconds=0)


def test_a_timeline_file_round_trips_and_a_bad_one_names_its_line(tmp_path: Path):
    timeline = HostTimeline((0.0, 1.0, 2.5), (1.04, 1.61234, 0.9))
    timeline.save(tmp_path / "t.csv")
    assert HostTimeline.load(tmp_path / "t.csv") == timeline

    bad = tmp_path / "bad.csv"
    bad.write_text("time_s,host_time_scale\n0,1.0\n1,fast\n")
    with pytest.raises(ValueError, match=r"bad.csv line 3: not a number"):
        HostTimeline.load(bad)
    bad.write_text("time,scale\n0,1.0\n")
    with pytest.raises(ValueError, match=r"bad.csv: a host timeline needs the columns"):
        HostTimeline.load(bad)
    bad.write_text("time_s,host_time_scale\n1,1.0\n0,1.0\n")
    with pytest.raises(ValueError, match=r"bad.csv: host timeline times must increase"):
        HostTimeline.load(bad)


# --- the simulated engine on a timeline ------------------------------------------------------


def finish_rows(profile, **kwargs) -> list[tuple]:
    llm = sim_llm(profile, overlap_scheduler=True, **kwargs)
    prompts = [[1 + i] * (30 + 10 * i) for i in range(5)]
    params = SamplingParams(max_new_tokens=25, ignore_eos=True)
    outputs = llm.generate(prompts, params, arrival_times=[0.0, 0.01, 0.02, 0.2, 0.21])
    llm.kv_cache_manager.check_integrity()
    return request_rows(outputs)


def test_a_constant_timeline_is_that_host_scale_and_multiplies_it():
    """Every step on a timeline of one scale costs what that ``sim_host_time_scale`` costs:
    the same request times (this profile's small steps are host-bound), and the two
    multiply."""
    profile = split_profile()
    base = finish_rows(profile)
    scaled = finish_rows(profile, sim_host_time_scale=3.0)
    assert scaled != base
    assert finish_rows(profile, sim_host_timeline=HostTimeline((0.0,), (3.0,))) == scaled
    both = finish_rows(
        profile, sim_host_time_scale=1.5, sim_host_timeline=HostTimeline((0.0,), (2.0,))
    )
    assert both == scaled


def test_each_step_costs_the_host_of_the_second_it_starts_in():
    """Host-bound steps (host 5 ms, device 3 ms): 5 ms each until the host slows down at
    0.0512 s, 10 ms each from then on, as the iteration rows show."""
    llm = LLM(
        "llama-1b",
        engine="sim",
        cost_model=constant_phases(5, 4, 3),
        overlap_scheduler=True,
        sim_host_timeline=HostTimeline((0.0, 0.0512), (1.0, 2.0)),
        kv_cache_manager=dict(tokens_per_block=16, num_blocks=64),
    )
    llm.generate([[1] * 20], SamplingParams(max_new_tokens=30, ignore_eos=True))
    rows = pd.DataFrame(llm.executor.iteration_stats.columns())
    rows = rows[rows.num_context_tokens + rows.num_generation_requests > 0]
    slow = rows.time >= 0.0512
    assert slow.any() and (~slow).any()
    assert rows[~slow].step_latency.to_numpy() == pytest.approx(0.005)
    assert rows[slow].step_latency.to_numpy() == pytest.approx(0.010)


@pytest.mark.parametrize("mode", ["lagged", "lagged, fast-forwarded"])
def test_a_timeline_changes_nothing_between_the_overlap_loop_and_its_emulations(mode):
    """The overlap loop and the plain loop with lagged admission, stepped or fast-forwarded,
    give every request the same times on a host that changes speed every 20 ms: each step
    takes the scale at its start on the device, which the three agree on."""
    profile = split_profile()
    timeline = HostTimeline(tuple(0.02 * i for i in range(40)), tuple([1.0, 2.5] * 20))
    runs = []
    for loop in ("overlap loop", mode):
        llm = sim_llm(
            profile,
            overlap_scheduler=True,
            sim_fast_forward=loop != "overlap loop",
            sim_host_timeline=timeline,
        )
        if loop == "lagged":
            llm.executor.decode_run = None
        prompts = [[2 + i] * (20 + 7 * i) for i in range(6)]
        params = [SamplingParams(max_new_tokens=10 + 9 * i, ignore_eos=True) for i in range(6)]
        arrivals = [0.0, 0.0, 0.05, 0.12, 0.3, 0.31]
        runs.append(request_rows(llm.generate(prompts, params, arrival_times=arrivals)))
    assert runs[1] == runs[0]


def test_the_host_pipeline_runs_on_a_timeline_too():
    """The pipeline's host stage takes the timeline's scale: one request alone, host-bound
    (5 ms of host a step), on a host twice as slow throughout, ends twice as late."""
    ends = {}
    for scale in (1.0, 2.0):
        llm = LLM(
            "llama-1b",
            engine="sim",
            cost_model=constant_phases(5, 4, 3),
            overlap_scheduler=True,
            sim_host_pipeline=True,
            sim_host_timeline=HostTimeline((0.0,), (scale,)),
            kv_cache_manager=dict(tokens_per_block=16, num_blocks=64),
        )
        (out,) = llm.generate([[1] * 20], SamplingParams(max_new_tokens=10, ignore_eos=True))
        ends[scale] = out.metrics.e2e_latency
    assert ends[2.0] == pytest.approx(2 * ends[1.0])


def test_a_device_scale_stretches_the_devices_time_only():
    model = split_profile().cost_model()
    big = StepFeatures(
        num_context_seqs=1, num_context_tokens=4000, context_attention=8e6, num_decode_seqs=100,
        decode_kv_tokens=100 * 1000, num_padded_tokens=4096,
    )  # fmt: skip
    small = StepFeatures(num_decode_seqs=4, decode_kv_tokens=4 * 300)  # host-bound
    slower = dataclasses.replace(model, device_time_scale=1.4)
    assert slower.predict(big) == pytest.approx(1.4 * model.device.predict(big))
    assert slower.predict(small) == pytest.approx(model.predict(small))  # still the host's
    assert slower.predict_on_host(big, 1.0) == slower.predict(big)
    with pytest.raises(ValueError, match="device_time_scale must be > 0"):
        dataclasses.replace(model, device_time_scale=0.0)
    # Through the LLM: device-bound requests (a long prompt) end later.
    long_prompt = [[1] * 3000]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    times = {}
    for scale in (1.0, 2.0):
        llm = sim_llm(split_profile(), overlap_scheduler=True, sim_device_time_scale=scale)
        (out,) = llm.generate(long_prompt, params)
        times[scale] = out.metrics.ttft
    assert times[2.0] == pytest.approx(2 * times[1.0], rel=0.05)


def test_the_timeline_and_device_scale_are_refused_where_they_cannot_apply(tmp_path: Path):
    timeline = HostTimeline((0.0,), (2.0,))
    with pytest.raises(ValueError, match="sim_host_timeline applies to engine='sim' only"):
        LLM("llama-tiny", device="cpu", sim_host_timeline=timeline)
    with pytest.raises(ValueError, match="sim_device_time_scale applies to engine='sim' only"):
        LLM("llama-tiny", device="cpu", sim_device_time_scale=1.1)
    plain = LinearCostModel(DECODE, MIXED)
    with pytest.raises(ValueError, match="a host timeline needs a HostDeviceCostModel"):
        LLM("llama-1b", engine="sim", cost_model=plain, sim_host_timeline=timeline)
    with pytest.raises(ValueError, match=r"sim_device_time_scale=1\.1 needs a HostDeviceCostModel"):
        LLM("llama-1b", engine="sim", cost_model=plain, sim_device_time_scale=1.1)
    with pytest.raises(FileNotFoundError):
        sim_llm(split_profile(), sim_host_timeline=tmp_path / "missing.csv")


def test_the_harness_replays_the_timeline_its_config_names(tmp_path: Path):
    """``executor.sim_host_timeline`` reaches the simulated engine: a file of one scale, 3,
    gives the requests of ``sim_host_time_scale=3``."""
    path = tmp_path / "host.csv"
    HostTimeline((0.0,), (3.0,)).save(path)
    columns = ["arrival_time", "first_token_time", "finish_time"]
    runs = {}
    for override in (f"executor.sim_host_timeline={path}", "executor.sim_host_time_scale=3"):
        run = simulate_split_profile(tmp_path, override)
        runs[override] = pd.read_parquet(run / "requests.parquet")[columns]
    replayed, scaled = runs.values()
    pd.testing.assert_frame_equal(replayed, scaled)
    base = pd.read_parquet(simulate_split_profile(tmp_path, "seed=0") / "requests.parquet")
    assert (replayed.finish_time > base.finish_time).all()


# --- measuring a run's host and device ---------------------------------------------------------


def serving_frame(host_factor, device_factor: float = 1.0, seconds: float = 10.0) -> pd.DataFrame:
    """``split_profile``'s serving steps as ``calibrate``'s table of one run spread over
    ``seconds``: its host ``host_factor(time)`` times the profile's, its device
    ``device_factor`` times."""
    grid_size = len(synthetic_profile("llama-1b").steps)
    rows = split_profile().steps[grid_size:]
    frame = pd.DataFrame(rows)
    frame["time"] = np.linspace(0.0, seconds, len(frame), endpoint=False)
    frame["host_time"] = [
        h * host_factor(t) for h, t in zip(frame.host_time, frame.time, strict=True)
    ]
    frame["device_time"] *= device_factor
    frame["kind"] = [f.kind for f in features(frame)]
    return frame.assign(run="r")


def test_a_runs_timeline_follows_its_hosts_slow_seconds():
    """A host twice as slow from second 5 on: the timeline of its steps with prompt tokens is
    1 before and 2 from then on (the profile's host fit is exact on these steps)."""
    frame = serving_frame(lambda t: 2.0 if t >= 5.0 else 1.0)
    (timeline,) = host_timelines(split_profile(), frame).values()
    assert timeline.times == tuple(float(i) for i in range(10))
    assert timeline.scales == pytest.approx([1.0] * 5 + [2.0] * 5, rel=1e-6)
    plain = dataclasses.replace(split_profile(), calibration=[{"overlap_scheduler": False}])
    with pytest.raises(ValueError, match="a host timeline needs overlap runs"):
        host_timelines(plain, frame)


def test_a_runs_device_scale_is_measured_where_the_device_did_not_wait_for_the_host():
    """The device 10% slower than the profile's, and where the host took as long as the
    device or longer the device also waits for its launches (a fifth of the host's time
    more): the table's device scale is 1.1, from the steps the host did not hold up; a host
    1.3x as slow is its own."""
    frame = serving_frame(lambda t: 1.3, device_factor=1.1)
    waits = frame.host_time >= frame.device_time
    assert 0 < waits.sum() < len(frame)
    frame.loc[waits, "device_time"] += frame.host_time[waits] / 5
    table = host_time_table(split_profile(), frame)
    (row,) = table.to_dict("records")
    assert row["device_time_scale"] == pytest.approx(1.1, rel=1e-6)
    assert row["host_time_scale"] == pytest.approx(1.3, rel=1e-6)


def test_cli_writes_host_timelines_without_calibrating(tmp_path: Path, capsys):
    from tests.test_calibrate import cpu_run

    run = cpu_run(tmp_path, "executor.overlap_scheduler=true")
    iterations = pd.read_parquet(run / "iterations.parquet")
    iterations.assign(device_time=0.5 * iterations.host_time).to_parquet(run / "iterations.parquet")
    profile = dataclasses.replace(split_profile("llama-tiny"), device="cpu")
    profile.save(tmp_path / "p.json")
    out = tmp_path / "timelines"
    args = [str(run), "--profile", str(tmp_path / "p.json"), "--host-timeline", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "host_timeline-0.csv" in printed and "slow_share" in printed
    assert "wrote" not in printed  # no profile without --out
    timeline = HostTimeline.load(out / "host_timeline-0.csv")
    worked = iterations[iterations.num_context_tokens > 0]
    assert len(timeline.times) == math.floor(worked.time.max()) + 1
    with pytest.raises(SystemExit):
        main([str(run), "--profile", str(tmp_path / "p.json")])
    assert "nothing to write" in capsys.readouterr().err


def test_law_is_what_the_split_profiles_device_fit_predicts():
    """The helpers above lean on it: the split profile's device fit is ``law`` itself."""
    model = split_profile().cost_model()
    assert isinstance(model, HostDeviceCostModel)
    f = StepFeatures(num_decode_seqs=7, decode_kv_tokens=7 * 500)
    assert model.device.predict(f) == pytest.approx(law(f), rel=1e-6)
