"""The GPU's power cap, simulated (``engine.sim.power``): the scale and the rate it reads,
exactly; the fit on runs made to a known cap; the file; the engine and the harness using it;
``python -m harness.calibrate --power``; the committed files."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.llm import LLM
from engine.sim import LinearCostModel, PowerCap
from engine.sim.power import RunSteps
from tests.test_host_speeds import overlap_and_its_emulation
from tests.test_host_timeline import finish_rows
from tests.test_sim import DECODE, MIXED, sim_llm, split_profile

ROOT = Path(__file__).resolve().parents[1]


def test_the_scale_is_a_hinge_on_the_rate():
    cap = PowerCap(tau_s=0.2, threshold=1000.0, base=0.98, slope=1e-5)
    assert cap.scale(0.0) == cap.scale(1000.0) == 0.98
    assert cap.scale(3000.0) == pytest.approx(0.98 + 0.02)


@pytest.mark.parametrize(
    "field, value", [("tau_s", 0.0), ("base", -1.0), ("slope", -1e-6), ("threshold", math.nan)]
)
def test_a_cap_that_cannot_be_is_refused(field, value):
    values = dict(tau_s=0.2, threshold=1000.0, base=1.0, slope=1e-6) | {field: value}
    with pytest.raises(ValueError, match="power cap"):
        PowerCap(**values)


def test_the_rate_is_the_rows_per_second_smoothed_and_decays_while_idle():
    """tau 1 s: a step of 1,000 rows over 1 s leaves (1 - 1/e) of 1,000 rows/s; a second idle
    keeps 1/e of it; a step starting before the last one ended decays nothing."""
    state = PowerCap(tau_s=1.0, threshold=0.0, base=1.0, slope=1e-3).state()
    assert state.scale_at(0.0) == 1.0
    state.observe(0.0, 1.0, 1000)
    after = 1000 * (1 - math.exp(-1))
    assert state.rate == pytest.approx(after)
    assert state.scale_at(1.0) == pytest.approx(1 + 1e-3 * after)  # no idle time
    assert state.scale_at(2.0) == pytest.approx(1 + 1e-3 * after / math.e)  # a second idle
    state.observe(2.0, 0.5, 0)
    assert state.rate == pytest.approx(after / math.e * math.exp(-0.5))
    assert state.scale_at(2.3) == pytest.approx(1 + 1e-3 * state.rate)  # inside that step


def test_a_timelines_scales_are_what_the_state_reads_step_by_step():
    """The steps of the test above, as a timeline: each step's scale at its start."""
    cap = PowerCap(tau_s=1.0, threshold=0.0, base=1.0, slope=1e-3)
    scales = cap.scales_along([0.0, 2.0, 2.3], [1.0, 0.5, 0.1], [1000, 0, 10])
    after = 1000 * (1 - math.exp(-1)) / math.e
    assert scales.tolist() == pytest.approx(
        [1.0, 1 + 1e-3 * after, 1 + 1e-3 * after * math.exp(-0.5)]  # the last inside a step
    )


def made_run(cap: PowerCap, seed: int = 0, num_steps: int = 3000) -> RunSteps:
    """A run of light and heavy stretches whose device time is its cap's scale times the fit,
    exactly."""
    rng = np.random.default_rng(seed)
    heavy = (np.arange(num_steps) // 100) % 2 == 1
    seconds = np.where(heavy, rng.uniform(0.05, 0.1, num_steps), rng.uniform(0.01, 0.03, num_steps))
    rows = np.where(heavy, rng.integers(2048, 4097, num_steps), rng.integers(16, 257, num_steps))
    start = np.concatenate([[0.0], np.cumsum(seconds + rng.uniform(0, 0.005, num_steps))[:-1]])
    predicted = 0.8 * seconds
    run = RunSteps(
        start, seconds, rows.astype(float), predicted, predicted, np.ones(num_steps, bool)
    )
    scales = np.array([cap.scale(r) for r in run.rates(cap.tau_s)])
    return RunSteps(start, seconds, run.rows, predicted * scales, predicted, run.is_fitted)


def test_a_cap_is_found_again_from_runs_made_with_it():
    cap = PowerCap(tau_s=0.2, threshold=20_000.0, base=0.98, slope=2e-6)
    runs = [made_run(cap, seed) for seed in (0, 1)]
    fitted = PowerCap.fit(runs)
    assert fitted.tau_s == 0.2
    assert fitted.explained(runs) > 0.95
    rates = np.concatenate([r.rates(0.2) for r in runs])
    for rate in np.quantile(rates, [0.1, 0.5, 0.9, 0.99]):
        assert fitted.scale(rate) == pytest.approx(cap.scale(rate), abs=0.005)
    # Device times that do not follow the work: a flat cap at their mean.
    flat = [RunSteps(r.start, r.seconds, r.rows, 1.02 * r.predicted, r.predicted, r.is_fitted)
            for r in runs]  # fmt: skip
    fitted = PowerCap.fit(flat)
    # Zero to rounding: the GPU machine's numpy left 3e-21 (a cap of 1.02 to 20 digits).
    assert fitted.slope == pytest.approx(0.0, abs=1e-12) and fitted.base == pytest.approx(1.02)
    unfitted = [RunSteps(r.start, r.seconds, r.rows, r.measured, r.predicted, ~r.is_fitted)
                for r in runs]  # fmt: skip
    with pytest.raises(ValueError, match="no device-bound step"):
        PowerCap.fit(unfitted)


def test_a_saturating_cap_rises_no_more_and_can_leave_decode_steps_alone():
    """A clipped hinge: flat at base to the threshold, rising to the saturation, flat after;
    with scales_decode False a decode-only step keeps its time at any rate."""
    cap = PowerCap(1.0, threshold=10_000.0, base=0.9, slope=1e-5, saturation=20_000.0)
    assert [cap.scale(r) for r in (0, 10_000, 15_000, 20_000, 40_000)] == pytest.approx(
        [0.9, 0.9, 0.95, 1.0, 1.0]
    )
    prompt_only = PowerCap(1.0, 10_000.0, 0.9, 1e-5, 20_000.0, scales_decode=False)
    assert prompt_only.scale_of_step(40_000, is_decode=True) == 1.0
    assert prompt_only.scale_of_step(40_000, is_decode=False) == pytest.approx(1.0)
    assert prompt_only.scale_of_step(0, is_decode=True) == 1.0
    assert prompt_only.scale_of_step(0, is_decode=False) == pytest.approx(0.9)
    state = prompt_only.state()
    assert state.scale_at(0.0, is_decode=True) == 1.0 and state.scale_at(0.0) == 0.9
    scales = prompt_only.scales_along([0.0, 1.0], [1.0, 1.0], [0, 0], [True, False])
    assert scales.tolist() == pytest.approx([1.0, 0.9])
    with pytest.raises(ValueError, match="saturation > threshold"):
        PowerCap(1.0, 10_000.0, 0.9, 1e-5, saturation=10_000.0)


def test_a_saturating_prompt_only_cap_is_found_again():
    """Runs whose steps with prompt tokens follow a clipped hinge and whose decode steps do
    not: the prompt-only fit finds the hinge (to the rates' 5% grid) and its saturation."""
    plain = made_run(PowerCap(0.2, 0.0, 1.0, 0.0))  # its rates, to put the hinge among them
    low, high = np.quantile(plain.rates(0.2)[plain.rows >= 1000], [0.25, 0.75])
    cap = PowerCap(0.2, threshold=low, base=0.9, slope=0.1 / (high - low), saturation=high)
    runs = []
    for seed in (0, 1):
        run = made_run(cap, seed)
        is_decode = run.rows < 1000  # made_run's light steps: 16-256 rows
        measured = np.where(is_decode, run.predicted, run.measured)
        runs.append(dataclasses.replace(run, measured=measured, is_decode=is_decode))
    fitted = PowerCap.fit(runs, (0.2,), scales_decode=False)
    assert not fitted.scales_decode and math.isfinite(fitted.saturation)
    assert fitted.explained(runs) > 0.9
    rates = np.concatenate([r.rates(0.2)[~r.decode_mask] for r in runs])
    for rate in np.quantile(rates, [0.1, 0.5, 0.9]):
        assert fitted.scale(rate) == pytest.approx(cap.scale(rate), abs=0.02)
    # Fitted on every step, the decode steps' flat times pull it toward 1.
    assert PowerCap.fit(runs, (0.2,)).explained(runs) < fitted.explained(runs)


def test_a_cap_file_round_trips_and_a_bad_one_says_what_is_wrong(tmp_path: Path):
    cap = PowerCap(tau_s=0.1, threshold=7000.0, base=0.99, slope=1.5e-6)
    cap.save(tmp_path / "p.json", {"runs": ["a"]})
    assert PowerCap.load(tmp_path / "p.json") == cap
    assert json.loads((tmp_path / "p.json").read_text())["measured"] == {"runs": ["a"]}
    assert json.loads((tmp_path / "p.json").read_text())["saturation"] is None  # none: null
    clipped = PowerCap(0.1, 7000.0, 0.99, 1.5e-6, saturation=9000.0, scales_decode=False)
    clipped.save(tmp_path / "c.json")
    assert PowerCap.load(tmp_path / "c.json") == clipped
    (tmp_path / "old.json").write_text(cap_json(cap))  # written before the two fields
    assert PowerCap.load(tmp_path / "old.json") == cap
    (tmp_path / "missing.json").write_text(json.dumps({"tau_s": 0.1, "base": 1.0}))
    with pytest.raises(ValueError, match="missing threshold, slope"):
        PowerCap.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({**json.loads(cap_json(cap)), "tau_s": -1}))
    with pytest.raises(ValueError, match=r"bad\.json: power cap"):
        PowerCap.load(tmp_path / "bad.json")


def cap_json(cap: PowerCap) -> str:
    return json.dumps({"tau_s": cap.tau_s, "threshold": cap.threshold, "base": cap.base,
                       "slope": cap.slope})  # fmt: skip


# --- the simulated engine ---------------------------------------------------------------------


def test_a_flat_cap_is_a_device_time_scale_and_a_steep_one_slows_heavy_work():
    profile = split_profile()
    plain = finish_rows(profile)
    assert finish_rows(profile, sim_power=PowerCap(0.2, 0.0, 1.0, 0.0)) == plain
    assert finish_rows(profile, sim_power=PowerCap(0.2, 0.0, 1.5, 0.0)) == finish_rows(
        profile, sim_device_time_scale=1.5
    )
    steep = finish_rows(profile, sim_power=PowerCap(0.2, 0.0, 1.0, 1e-3))
    assert all(s[2] > p[2] for s, p in zip(steep, plain, strict=True))  # every finish later


def test_the_host_pipeline_runs_under_a_power_cap():
    """With the host as a stage of its own, a flat cap is a device time scale too, and a steep
    one delays every finish."""
    profile = split_profile()
    piped = dict(sim_host_pipeline=True)
    plain = finish_rows(profile, **piped)
    assert finish_rows(profile, sim_power=PowerCap(0.2, 0.0, 1.0, 0.0), **piped) == plain
    flat = finish_rows(profile, sim_power=PowerCap(0.2, 0.0, 1.5, 0.0), **piped)
    assert flat == finish_rows(profile, sim_device_time_scale=1.5, **piped) and flat != plain
    steep = finish_rows(profile, sim_power=PowerCap(0.2, 0.0, 1.0, 1e-3), **piped)
    assert all(s[2] > p[2] for s, p in zip(steep, plain, strict=True))
    assert steep != finish_rows(profile, sim_power=PowerCap(0.2, 0.0, 1.0, 1e-3))  # not the max


def test_overlap_and_its_emulation_agree_under_a_power_cap():
    overlap, emulated = overlap_and_its_emulation(sim_power=PowerCap(0.05, 0.0, 1.0, 1e-3))
    assert emulated == overlap
    assert overlap != overlap_and_its_emulation()[0]  # the cap shows


def test_a_power_cap_is_refused_where_it_cannot_apply(tmp_path: Path):
    cap = PowerCap(0.2, 0.0, 1.0, 1e-6)
    with pytest.raises(ValueError, match="sim_power applies to engine='sim' only"):
        LLM("llama-tiny", device="cpu", sim_power=cap)
    with pytest.raises(ValueError, match="a power cap needs a HostDeviceCostModel"):
        LLM("llama-1b", engine="sim", cost_model=LinearCostModel(DECODE, MIXED), sim_power=cap)
    with pytest.raises(FileNotFoundError):
        sim_llm(split_profile(), sim_power=tmp_path / "missing.json")


def test_the_harness_uses_the_cap_beside_its_profile_unless_told_otherwise(tmp_path: Path):
    """``executor.sim_power=auto`` (the default) takes ``<profile>.power.json`` where there is
    one; ``null`` none; a file that one. run.json says which."""
    from tests.test_harness import harness, only_dir

    profile = tmp_path / "p.json"
    split_profile().save(profile)

    def run(name: str, *overrides: str) -> tuple[pd.DataFrame, dict]:
        out = tmp_path / name
        harness(out, "executor.engine=sim", f"executor.profile={profile}", "model=llama-1b",
                "workload.num_requests=10", "workload.rate=20", "progress=false",
                "plots=false", *overrides)  # fmt: skip
        run_dir = only_dir(out / "default")
        info = json.loads((run_dir / "run.json").read_text())
        return pd.read_parquet(run_dir / "requests.parquet")["finish_time"], info

    without, info = run("none")
    assert info["power"] is None  # no file beside the profile
    PowerCap(0.2, 0.0, 2.0, 0.0).save(tmp_path / "p.power.json")
    auto, info = run("auto")
    assert info["power"] == str(tmp_path / "p.power.json")
    scaled, _ = run("scaled", "executor.sim_device_time_scale=2", "executor.sim_power=null")
    pd.testing.assert_series_equal(auto, scaled)
    off, info = run("off", "executor.sim_power=null")
    assert info["power"] is None
    pd.testing.assert_series_equal(off, without)
    piped, info = run("pipeline", "executor.sim_host_pipeline=true")
    assert info["power"] == str(tmp_path / "p.power.json")  # the pipeline simulates it too
    piped_scaled, _ = run(
        "pipeline_scaled",
        "executor.sim_host_pipeline=true",
        "executor.sim_device_time_scale=2",
        "executor.sim_power=null",
    )
    pd.testing.assert_series_equal(piped, piped_scaled)
    assert not piped.equals(auto)


# --- python -m harness.calibrate --power -----------------------------------------------------


def test_cli_fits_the_cap_to_the_runs_device_times(tmp_path: Path, capsys):
    """A CPU run given device times that its recent work sets (a known cap over the profile's
    device fit): the file holds the library's fit of the same steps, and names the run. Runs
    without device times are refused with the reason."""
    import dataclasses

    from harness.calibrate import calibrate, main, power_runs
    from harness.results import load
    from tests.test_calibrate import cpu_run

    run = cpu_run(tmp_path, "executor.overlap_scheduler=true")
    profile = dataclasses.replace(split_profile("llama-tiny"), device="cpu")
    profile.save(tmp_path / "p.json")
    args = [str(run), "--profile", str(tmp_path / "p.json"), "--power", str(tmp_path / "c.json")]
    assert main(args) == 2  # a CPU run has no device times
    assert "--power needs overlap runs on a GPU" in capsys.readouterr().err

    path = run / "iterations.parquet"
    iterations = pd.read_parquet(path)
    iterations["host_time"] = 0.0  # every step device-bound, its time the device's
    iterations["device_time"] = 1.0
    iterations.to_parquet(path)
    _, steps = calibrate(profile, [load(run)])
    (made,) = power_runs(profile, steps)
    # Each step's device time: the fit's, times the scale its predecessors' work leaves.
    cap, device = PowerCap(0.05, 0.0, 1.0, 2e-4), []
    state = cap.state()
    for start, rows, predicted in zip(made.start, made.rows, made.predicted, strict=True):
        device.append(predicted * state.scale_at(start))
        state.observe(start, device[-1], int(rows))
    iterations["device_time"] = iterations.time.map(pd.Series(device, index=made.start))
    iterations.to_parquet(path)
    assert main(args) == 0
    assert "the GPU's power cap" in capsys.readouterr().out
    fitted = PowerCap.load(tmp_path / "c.json")
    _, steps = calibrate(profile, [load(run)])
    runs = power_runs(profile, steps)
    # By default on the steps with prompt tokens alone; --power-steps all on every step.
    assert fitted == PowerCap.fit(runs, scales_decode=False) and not fitted.scales_decode
    assert fitted.tau_s == 0.05 and fitted.slope > 0 and fitted.explained(runs) > 0.9
    assert main([*args, "--power-steps", "all", "--power-tau", "0.2"]) == 0
    assert PowerCap.load(tmp_path / "c.json") == PowerCap.fit(runs, (0.2,))
    assert "steps with prompt tokens only" not in capsys.readouterr().out
    measured = json.loads((tmp_path / "c.json").read_text())["measured"]
    assert measured["runs"] == [str(run)]
    expected = [*args, "--power-steps", "all", "--power-tau", "0.2"]
    assert measured["command"] == "python -m harness.calibrate " + " ".join(expected)


@pytest.mark.parametrize("model", ["llama-8b"])
def test_the_committed_power_cap_names_its_profile(model):
    """engine/sim/profiles/h200/<model>.overlap.power.json: fitted against the committed
    overlap profile of that model, slowing heavy work down, and used by default."""
    from engine.sim.profile import available_profiles, default_profile_path, power_path

    profile = default_profile_path(model, "h200", True)
    path = power_path(profile)
    cap = PowerCap.load(path)
    assert cap.slope > 0
    measured = json.loads(path.read_text())["measured"]
    assert Path(measured["profile"]) == profile.relative_to(ROOT)
    assert f"--power {path.relative_to(ROOT)}" in measured["command"]
    assert f"h200/{model}.overlap.power" not in available_profiles()
