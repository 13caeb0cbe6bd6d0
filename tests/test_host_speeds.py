"""A simulated host of two speeds (``engine.sim.host_speeds``, ``executor.sim_host_speeds``)
and ``python -m harness.calibrate --host-speeds`` fitting one to real runs' timelines."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest

from engine.llm import LLM
from engine.request import SamplingParams
from engine.sim import HostSpeeds, HostTimeline, LinearCostModel, TwoSpeedHost
from tests.test_host_timeline import finish_rows
from tests.test_sim import DECODE, MIXED, request_rows, sim_llm, split_profile

SPEEDS = HostSpeeds(fast_scale=1.0, slow_scale=1.6, mean_fast_s=3.0, mean_slow_s=1.0)

# --- the speeds and a host drawn from them ---------------------------------------------------


def test_speeds_give_their_slow_share_and_mean_scale():
    assert SPEEDS.slow_share == pytest.approx(0.25)
    assert SPEEDS.mean_scale == pytest.approx(1.0 + 0.25 * 0.6)


@pytest.mark.parametrize("field", ["fast_scale", "slow_scale", "mean_fast_s", "mean_slow_s"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_speeds_refuse_what_cannot_be_a_host(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a number > 0"):
        dataclasses.replace(SPEEDS, **{field: value})


def test_a_host_switches_between_the_two_speeds_as_the_dwell_means_say():
    """Over 20,000 s the host is slow a quarter of the time (1 s against 3 s on average:
    swapped means would give three quarters) and each stay lasts its mean, within 5%."""
    host = SPEEDS.host(seed=7)
    step = 0.05
    scales = [host.scale_at(i * step) for i in range(int(20_000 / step))]
    assert set(scales) == {1.0, 1.6}
    slow = [s == 1.6 for s in scales]
    assert sum(slow) / len(slow) == pytest.approx(0.25, abs=0.02)
    switches = sum(a != b for a, b in itertools.pairwise(slow))
    assert 20_000 / (switches / 2) == pytest.approx(4.0, rel=0.05)  # a fast and a slow stay


def test_the_same_seed_draws_the_same_host_however_it_is_asked():
    """Asked forwards, backwards or at random times, one seed gives one host; another seed
    another; before 0 the host is as at 0."""
    times = [i * 0.37 for i in range(400)]
    forwards = [SPEEDS.host(3).scale_at(t) for t in times]
    host = SPEEDS.host(3)
    backwards = [host.scale_at(t) for t in reversed(times)][::-1]
    shuffled = list(times)
    random.Random(0).shuffle(shuffled)
    host = SPEEDS.host(3)
    at_random = dict(zip(shuffled, map(host.scale_at, shuffled), strict=True))
    assert forwards == backwards == [at_random[t] for t in times]
    assert forwards != [SPEEDS.host(4).scale_at(t) for t in times]
    assert host.scale_at(-5.0) == host.scale_at(0.0)


def test_a_hosts_timeline_is_its_switches():
    host = TwoSpeedHost(SPEEDS, seed=1)
    timeline = host.timeline(until=60.0)
    assert timeline.times[0] == 0.0 and timeline.times[-1] <= 60.0
    assert len(timeline.times) > 10  # about 60 / 2 switches
    for t in [0.0, 0.5, 7.3, 31.0, 59.9]:
        assert timeline.scale_at(t) == host.scale_at(t)
    assert set(timeline.scales) == {1.0, 1.6}
    assert all(a != b for a, b in itertools.pairwise(timeline.scales))  # each a switch


# --- fitting the speeds to real runs' timelines ----------------------------------------------


def test_speeds_are_fitted_to_timelines():
    """Two runs: fast (1.0, 1.1) for 4 s, slow (1.5, 1.7) for 2 s, fast for 3 s; and slow 1.6
    for 3 s. Speeds: the medians of each side of 1.3; dwell: 7 s fast over the 1 time the host
    left it; 5 s slow over the 1 time it left it (the run ending is not a switch)."""
    one = HostTimeline(
        tuple(float(i) for i in range(9)), (1.0, 1.1, 1.0, 1.1, 1.5, 1.7, 1.0, 1.0, 1.0)
    )
    two = HostTimeline((0.0, 1.0, 2.0), (1.6, 1.6, 1.6))
    speeds = HostSpeeds.fit([one, two])
    assert speeds == HostSpeeds(
        fast_scale=1.0, slow_scale=1.6, mean_fast_s=7.0, mean_slow_s=5.0
    )  # fmt: skip
    with pytest.raises(ValueError, match="need fast and slow seconds"):
        HostSpeeds.fit([HostTimeline((0.0, 1.0), (1.0, 1.1))])


def test_a_speeds_file_round_trips_and_a_bad_one_says_what_is_wrong(tmp_path: Path):
    path = tmp_path / "speeds.json"
    SPEEDS.save(path, measured={"runs": ["a", "b"]})
    assert HostSpeeds.load(path) == SPEEDS
    assert json.loads(path.read_text())["measured"] == {"runs": ["a", "b"]}
    path.write_text(json.dumps({"fast_scale": 1.0, "slow_scale": 1.5, "mean_fast_s": 2.0}))
    with pytest.raises(
        ValueError, match=r"speeds.json: needs exactly .* missing \['mean_slow_s'\]"
    ):
        HostSpeeds.load(path)
    path.write_text(json.dumps({**dataclasses.asdict(SPEEDS), "slow_scael": 2.0}))
    with pytest.raises(ValueError, match=r"unknown \['slow_scael'\]"):
        HostSpeeds.load(path)
    path.write_text(json.dumps({**dataclasses.asdict(SPEEDS), "slow_scale": "fast"}))
    with pytest.raises(ValueError, match=r"speeds\.json"):
        HostSpeeds.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="a JSON object"):
        HostSpeeds.load(path)


# --- simulating on such a host ------------------------------------------------------------------


def test_a_simulation_on_two_speeds_is_its_hosts_timeline_replayed():
    """A two-speed host drawn with the LLM's seed gives the requests exactly the times of its
    own switches replayed as a timeline; the same seed the same times, another seed others."""
    profile = split_profile()
    speeds = HostSpeeds(fast_scale=1.0, slow_scale=3.0, mean_fast_s=0.05, mean_slow_s=0.05)
    drawn = finish_rows(profile, sim_host_speeds=speeds, seed=5)
    replayed = finish_rows(profile, sim_host_timeline=speeds.host(5).timeline(until=100.0))
    assert drawn == replayed
    assert finish_rows(profile, sim_host_speeds=speeds, seed=5) == drawn
    assert finish_rows(profile, sim_host_speeds=speeds, seed=6) != drawn
    assert drawn != finish_rows(profile)  # the slow seconds show


def overlap_and_its_emulation(**kwargs) -> list[list[tuple]]:
    """The request rows of one workload simulated with the overlap loop and with its
    fast-forwarded emulation (``sim_llm(split_profile(), **kwargs)``)."""
    runs = []
    for fast_forward in (False, True):
        llm = sim_llm(
            split_profile(), overlap_scheduler=True, sim_fast_forward=fast_forward, **kwargs
        )
        prompts = [[2 + i] * (20 + 7 * i) for i in range(6)]
        params = [SamplingParams(max_new_tokens=10 + 9 * i, ignore_eos=True) for i in range(6)]
        arrivals = [0.0, 0.0, 0.05, 0.12, 0.3, 0.31]
        runs.append(request_rows(llm.generate(prompts, params, arrival_times=arrivals)))
    return runs


def test_overlap_and_its_emulations_agree_on_a_two_speed_host():
    speeds = HostSpeeds(fast_scale=1.0, slow_scale=2.5, mean_fast_s=0.02, mean_slow_s=0.03)
    overlap, emulated = overlap_and_its_emulation(sim_host_speeds=speeds, seed=11)
    assert emulated == overlap


def test_host_speeds_are_refused_where_they_cannot_apply(tmp_path: Path):
    with pytest.raises(ValueError, match="sim_host_speeds applies to engine='sim' only"):
        LLM("llama-tiny", device="cpu", sim_host_speeds=SPEEDS)
    with pytest.raises(ValueError, match="host speeds need a HostDeviceCostModel"):
        LLM("llama-1b", engine="sim", cost_model=LinearCostModel(DECODE, MIXED),
            sim_host_speeds=SPEEDS)  # fmt: skip
    with pytest.raises(ValueError, match="not both"):
        sim_llm(split_profile(), sim_host_speeds=SPEEDS,
                sim_host_timeline=HostTimeline((0.0,), (1.0,)))  # fmt: skip
    with pytest.raises(FileNotFoundError):
        sim_llm(split_profile(), sim_host_speeds=tmp_path / "missing.json")


def test_the_harness_draws_the_host_with_the_runs_seed(tmp_path: Path):
    """``executor.sim_host_speeds`` reaches the engine: a host of two equal speeds, 3x, is
    ``sim_host_time_scale=3``; with two speeds the run's seed draws the host (the workload's
    own seed held)."""
    from tests.test_harness import harness, only_dir

    profile = tmp_path / "p.json"
    split_profile().save(profile)
    columns = ["arrival_time", "first_token_time", "finish_time"]

    def requests(name: str, *overrides: str) -> pd.DataFrame:
        out = tmp_path / name
        harness(out, "executor.engine=sim", f"executor.profile={profile}", "model=llama-1b",
                "workload.num_requests=10", "workload.rate=20", "workload.seed=1",
                "progress=false", "plots=false", *overrides)  # fmt: skip
        return pd.read_parquet(only_dir(out / "default") / "requests.parquet")[columns]

    flat = tmp_path / "flat.json"
    HostSpeeds(3.0, 3.0, 1.0, 1.0).save(flat)
    pd.testing.assert_frame_equal(
        requests("flat", f"executor.sim_host_speeds={flat}"),
        requests("scaled", "executor.sim_host_time_scale=3"),
    )
    two = tmp_path / "two.json"
    HostSpeeds(1.0, 3.0, 0.05, 0.05).save(two)
    seeded = [requests(f"two-{i}", f"executor.sim_host_speeds={two}", f"seed={seed}")
              for i, seed in enumerate((1, 1, 2))]  # fmt: skip
    pd.testing.assert_frame_equal(seeded[0], seeded[1])
    assert (seeded[0].arrival_time == seeded[2].arrival_time).all()
    assert not seeded[0].equals(seeded[2])


# --- python -m harness.calibrate --host-speeds ------------------------------------------------


def test_cli_fits_the_speeds_to_the_runs_timelines(tmp_path: Path, capsys):
    """A CPU run spread over 10 s, its host at the profile's speed for 5 s and 4x as slow
    after: the file holds the fit to its timeline (the one ``--host-timeline`` writes) and
    names the run. A host that never slows down cannot be fitted: a clear error."""
    from harness.calibrate import host_timelines, main, serving_steps
    from harness.results import load
    from tests.test_calibrate import cpu_run

    run = cpu_run(tmp_path, "executor.overlap_scheduler=true")
    profile = dataclasses.replace(split_profile("llama-tiny"), device="cpu")
    profile.save(tmp_path / "p.json")
    path = run / "iterations.parquet"
    iterations = pd.read_parquet(path)
    iterations["time"] *= 10.0 / iterations.time.max()
    iterations["device_time"] = 0.5 * iterations.host_time

    def timeline_of(frame: pd.DataFrame) -> HostTimeline:
        frame.to_parquet(path)
        steps = serving_steps(load(run), "llama-tiny").assign(run="r")
        (timeline,) = host_timelines(profile, steps).values()
        return timeline

    median = float(pd.Series(timeline_of(iterations).scales).median())
    # 4x: a CPU run has a few steps with prompt tokens a second, their ratios noisy (0.7-1.5)
    slower = (iterations.time >= 5.0).map({True: 4.0, False: 1.0})
    timeline = timeline_of(iterations.assign(host_time=iterations.host_time / median * slower))
    out = tmp_path / "speeds.json"
    args = [str(run), "--profile", str(tmp_path / "p.json"), "--host-speeds", str(out)]
    assert main(args) == 0
    assert "two speeds" in capsys.readouterr().out
    speeds = HostSpeeds.load(out)
    assert speeds == HostSpeeds.fit([timeline])
    assert speeds.slow_scale > 1.3 >= speeds.fast_scale  # (a few steps a second: noisy)
    measured = json.loads(out.read_text())["measured"]
    assert measured["runs"] == [str(run)]
    assert measured["command"] == "python -m harness.calibrate " + " ".join(args)

    timeline_of(iterations.assign(host_time=iterations.host_time / median / 4))
    assert main(args) == 2
    assert "need fast and slow seconds" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["llama-1b", "llama-8b"])
def test_the_committed_host_speeds_name_their_profile_and_two_speeds(model):
    """engine/sim/profiles/h200/<model>.overlap.host_speeds.json: fitted against the committed
    overlap profile of that model, a fast speed under the slow threshold and a slow one over."""
    from engine.sim.host_speeds import SLOW_THRESHOLD
    from engine.sim.profile import default_profile_path

    profile = default_profile_path(model, "h200", True)
    path = profile.with_name(f"{model}.overlap.host_speeds.json")
    speeds = HostSpeeds.load(path)
    assert speeds.fast_scale <= SLOW_THRESHOLD < speeds.slow_scale
    measured = json.loads(path.read_text())["measured"]
    assert Path(measured["profile"]) == profile.relative_to(Path(__file__).parents[1])
    assert f"--host-speeds {path.relative_to(Path(__file__).parents[1])}" in measured["command"]
