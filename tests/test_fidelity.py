"""The fidelity report: sim against real, metric by metric, paired by overrides."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.fidelity import (
    LATENCY_METRICS,
    TARGETS,
    THROUGHPUT_METRICS,
    compare,
    effects,
    main,
    median_summaries,
    plot_distributions,
    request_latencies,
    with_ranks,
    with_real_range,
    with_spread,
)
from tests.test_harness import harness, only_dir


def summary(scale: float) -> dict:
    values = {m: 100.0 * scale for m in LATENCY_METRICS}
    values.update({m: 50.0 / scale for m in THROUGHPUT_METRICS})
    return values


def test_relative_errors_and_targets():
    table = compare({"a": summary(1.0), "b": summary(1.0)}, {"a": summary(1.04), "c": {}})
    assert set(table["variant"]) == {"a"} and len(table) == len(TARGETS)
    rows = table.set_index("metric")
    assert math.isclose(rows.loc["p50_ttft_ms", "relative_error"], 0.04)
    assert bool(rows.loc["p99_e2el_ms", "within_target"])  # 4% <= 5%
    # throughput 50 / 1.04: -3.8%, outside the 3% target
    assert math.isclose(rows.loc["output_throughput", "relative_error"], 1 / 1.04 - 1)
    assert not bool(rows.loc["output_throughput", "within_target"])
    with pytest.raises(ValueError, match="no run in common"):
        compare({"a": summary(1.0)}, {"b": summary(1.0)})


def test_a_simulated_percentile_is_ranked_among_the_real_requests():
    """100 real requests at 1..100 ms: a simulated P50 of 30.5 ms lies above 30 of them (rank
    30: 20 points below), one of exactly 30 ms half counts its tie (29.5). TPOT's missing
    values (one-token requests) are not requests of it; throughputs get no rank."""
    real = pd.DataFrame({"ttft_ms": range(1, 101), "tpot_ms": [math.nan] * 50 + [10.0] * 50,
                         "e2el_ms": range(1, 101)})  # fmt: skip
    sim = summary(1.0) | {"p50_ttft_ms": 30.5, "p90_e2el_ms": 30.0, "p50_tpot_ms": 11.0}
    table = with_ranks(compare({"a": summary(1.0), "b": summary(1.0)}, {"a": sim, "b": sim}),
                       {"a": real})  # fmt: skip
    rows = table.set_index(["variant", "metric"])["rank_error"]
    assert rows[("a", "p50_ttft_ms")] == pytest.approx(-20.0)
    assert rows[("a", "p90_e2el_ms")] == pytest.approx(29.5 - 90)
    assert rows[("a", "p50_tpot_ms")] == pytest.approx(50.0)  # above all 50 TPOTs
    assert math.isnan(rows[("a", "output_throughput")])
    assert table[table["variant"] == "b"]["rank_error"].isna().all()  # no real requests


def test_a_second_real_run_gives_the_spread_beside_the_error():
    real = {"a": summary(1.0), "b": summary(1.0)}
    table = with_spread(compare(real, {"a": summary(1.04), "b": summary(0.9)}), real,
                        {"a": summary(1.02)})  # fmt: skip
    rows = table.set_index(["variant", "metric"])
    assert math.isclose(rows.loc[("a", "p50_ttft_ms"), "real_spread"], 0.02)
    assert math.isclose(rows.loc[("a", "output_throughput"), "real_spread"], 1 / 1.02 - 1)
    assert math.isclose(rows.loc[("b", "p50_ttft_ms"), "relative_error"], -0.1)
    assert table[table["variant"] == "b"]["real_spread"].isna().all()  # no second run of b


def test_several_real_runs_are_compared_by_their_median_with_their_range():
    """Three repeats at 0.9x, 1.0x and 1.2x: the reference is the 1.0x run, metric by metric;
    its range -10%..+20% (latencies); a sim at 1.04x is within target and within the range,
    one at 0.85x neither. A variant that one repeat lacks is left out."""
    runs = [
        {"a": summary(0.9)},
        {"a": summary(1.2), "b": summary(1.0)},
        {"a": summary(1.0), "b": summary(1.0)},
    ]
    medians, spread = median_summaries(runs)
    assert set(medians) == {"a"} and medians["a"] == summary(1.0)
    low, high = spread[("a", "p50_ttft_ms")]
    assert math.isclose(low, -0.1) and math.isclose(high, 0.2)
    low, high = spread[("a", "output_throughput")]  # 50 / scale
    assert math.isclose(low, 1 / 1.2 - 1) and math.isclose(high, 1 / 0.9 - 1)
    for scale, inside in ((1.04, True), (0.85, False)):
        table = with_real_range(compare(medians, {"a": summary(scale)}), spread)
        rows = table.set_index("metric")
        assert bool(rows.loc["p50_ttft_ms", "within_spread"]) is inside
        assert bool(rows.loc["p50_ttft_ms", "within_target"]) is inside
    with pytest.raises(ValueError, match="no run in common"):
        median_summaries([{"a": summary(1.0)}, {"b": summary(1.0)}])


def test_effects_of_a_policy_real_and_simulated():
    """Two real sweeps where b cuts latencies by 20% and 25% (throughput: 50 / scale up by 25%
    and 33%): the real effect is their median, -22.5%, with its range; a sim where b cuts them
    by 22% is 0.5 points off, within target, same direction; one where b adds 2% is 'the same'
    against a real 'lower': outside the target, the direction wrong."""
    reals = [{"a": summary(1.0), "b": summary(0.8)}, {"a": summary(2.0), "b": summary(1.5)}]
    table = effects(reals, {"a": summary(1.0), "b": summary(0.78), "c": summary(1.0)})
    assert set(table["variant"]) == {"b"} and set(table["baseline"]) == {"a"}
    assert len(table) == len(TARGETS)  # c: not in the real sweeps
    rows = table.set_index("metric")
    ttft = rows.loc["p50_ttft_ms"]
    assert math.isclose(ttft.real_effect, -0.225) and math.isclose(ttft.sim_effect, -0.22)
    assert math.isclose(ttft.real_low, -0.25) and math.isclose(ttft.real_high, -0.2)
    assert math.isclose(ttft.difference, 0.005) and ttft.within_target and ttft.same_direction
    throughput = rows.loc["output_throughput"]
    assert math.isclose(throughput.real_effect, (1 / 0.8 + 1 / 0.75) / 2 - 1)
    assert math.isclose(throughput.difference, 1 / 0.78 - 1 - throughput.real_effect)
    assert throughput.within_target  # 28.2% against 29.2%: 1 point, under the 3% target
    wrong = effects(reals, {"a": summary(1.0), "b": summary(1.02)}).set_index("metric")
    assert not wrong.loc["p50_ttft_ms", "within_target"]
    assert not wrong.loc["p50_ttft_ms", "same_direction"]  # "same" (2% < 5%) against "lower"
    # The baseline named: a's effects against b
    flipped = effects(reals, {"a": summary(1.0), "b": summary(0.78)}, baseline="b")
    assert set(flipped["variant"]) == {"a"}
    assert math.isclose(flipped.set_index("metric").loc["p50_ttft_ms", "real_effect"],
                        (1 / 0.8 + 2 / 1.5) / 2 - 1)  # fmt: skip
    with pytest.raises(ValueError, match="must name one run"):
        effects(reals, {"a": summary(1.0), "b": summary(1.0)}, baseline="x")
    assert effects([{"a": summary(1.0)}], {"a": summary(1.0)}).empty  # one run: no effects


def sim_run(tmp_path: Path) -> tuple[Path, Path]:
    """A harness run of 40 requests on the simulated engine: (its directory, its profile)."""
    from tests.test_sim import synthetic_profile

    profile = tmp_path / "llama-1b.json"
    synthetic_profile("llama-1b").save(profile)
    out = tmp_path / "runs"
    harness(
        out,
        "executor.engine=sim",
        f"executor.profile={profile}",
        "model=llama-1b",
        "workload.num_requests=40",
        "progress=false",
    )
    return only_dir(out / "default"), profile


def test_latency_distributions_are_drawn_for_the_variants_both_sides_have(tmp_path: Path):
    rng = np.random.default_rng(0)

    def requests(n: int, tpot: bool = True) -> pd.DataFrame:
        return pd.DataFrame({"ttft_ms": rng.uniform(5, 500, n),
                             "tpot_ms": rng.uniform(1, 9, n) if tpot else np.nan,
                             "e2el_ms": rng.uniform(50, 5000, n)})  # fmt: skip

    path = tmp_path / "cdf.png"
    plot_distributions({"a": requests(50)}, {"b": requests(50)}, path)
    assert not path.exists()  # no variant on both sides: nothing to draw
    # One-token outputs have no TPOT: an empty panel, not an error.
    real, sim = {"a": requests(50), "b": requests(9)}, {"a": requests(40, tpot=False)}
    plot_distributions(real, sim, path)
    assert path.stat().st_size > 0


def test_cli_on_result_directories(tmp_path: Path):
    run, _ = sim_run(tmp_path)
    report = tmp_path / "report"
    assert main([str(run), str(run), "--out", str(report)]) == 0
    table = pd.read_csv(report / "fidelity.csv")
    assert len(table) == len(TARGETS) and (table["relative_error"] == 0).all()
    # A run against itself: each percentile ranks at itself, to one request's share
    ((variant, requests),) = request_latencies([run]).items()
    latency = table[table["metric"].str.endswith("_ms")]
    assert latency["rank_error"].abs().max() <= 100 / requests["ttft_ms"].count()
    assert table[~table["metric"].str.endswith("_ms")]["rank_error"].isna().all()
    assert len(request_latencies([run, run])[variant]) == 2 * len(requests)  # repeats pooled
    assert (report / "fidelity.png").stat().st_size > 0
    assert (report / "latency_cdf.png").stat().st_size > 0
    assert main([str(tmp_path / "missing"), str(run)]) == 2
    assert main([str(run), str(run), "--out", str(report), "--spread", str(run)]) == 0
    assert (pd.read_csv(report / "fidelity.csv")["real_spread"] == 0).all()
    # Several real directories: against their median, with their range
    assert main([str(run), str(run), str(run), str(run), "--out", str(report)]) == 0
    table = pd.read_csv(report / "fidelity.csv")
    assert (table["real_low"] == 0).all() and table["within_spread"].all()
    assert main([str(run), str(run), str(run), "--spread", str(run)]) == 2
    with pytest.raises(SystemExit):  # one directory: nothing to compare
        main([str(run)])


def test_step_check_of_a_sim_run_against_its_own_profile_is_exact(tmp_path: Path, capsys):
    """Each iteration row carries the work the cost model saw (fast-forwarded rows included),
    so predicting a sim run's steps from its own profile gives back their times exactly; a run
    written before those columns existed is refused with a reason."""
    from tests.test_sim import synthetic_profile

    run, profile = sim_run(tmp_path)
    report = tmp_path / "report"
    assert main([str(run), str(run), "--out", str(report), "--profile", str(profile)]) == 0
    steps = pd.read_csv(report / "steps.csv")
    assert {"decode", "mixed"} <= set(steps["kind"])
    assert (
        steps["steps"].sum() == (pd.read_parquet(run / "iterations.parquet").step_latency > 0).sum()
    )
    for column in ("median_error", "p90_abs_error", "bias"):
        assert steps[column].abs().max() < 1e-9, column
    assert "cost model on each real step" in capsys.readouterr().out
    assert (report / "steps.png").stat().st_size > 0

    other = tmp_path / "llama-8b.json"
    synthetic_profile("llama-8b").save(other)
    assert main([str(run), str(run), "--out", str(report), "--profile", str(other)]) == 2
    assert "a run of model 'llama-1b', not 'llama-8b'" in capsys.readouterr().err

    iterations = pd.read_parquet(run / "iterations.parquet")
    iterations.drop(columns="decode_kv_tokens").to_parquet(run / "iterations.parquet")
    assert main([str(run), str(run), "--out", str(report), "--profile", str(profile)]) == 2
    assert "no decode_kv_tokens column" in capsys.readouterr().err


def test_the_profile_check_gives_each_real_runs_host_scale(tmp_path: Path, capsys):
    """With a profile that fits the host apart, ``--profile`` gives each real run's host time
    over the profile's, and names the runs whose host is more than 10% off the simulated one."""
    import dataclasses

    from engine.sim.profile import Profile
    from harness.calibrate import host_time_table, runs_under, serving_steps
    from tests.test_calibrate import cpu_run
    from tests.test_sim import split_profile, synthetic_profile

    run = cpu_run(tmp_path, "executor.overlap_scheduler=true")
    dataclasses.replace(split_profile("llama-tiny"), device="cpu").save(tmp_path / "split.json")
    report = tmp_path / "report"
    args = [str(run), str(run), "--out", str(report), "--profile", str(tmp_path / "split.json")]
    assert main(args) == 0
    hosts = pd.read_csv(report / "host_time.csv")
    steps = serving_steps(runs_under(run)[0], "llama-tiny").assign(run=str(run))
    expected = host_time_table(Profile.load(tmp_path / "split.json"), steps)
    assert hosts.run.tolist() == [str(run)]
    assert hosts.host_time_scale.tolist() == pytest.approx(expected.host_time_scale.tolist())
    printed = capsys.readouterr().out
    assert "executor.sim_host_time_scale=1;" in printed
    off = abs(hosts.host_time_scale[0] - 1) > 0.1
    assert ("more than 10% off the simulated one" in printed) == off
    assert "sm_clock_mhz" not in hosts  # a CPU run samples no GPU
    # A run that sampled its GPU (executor.gpu_telemetry) shows its clock and power beside.
    summary = json.loads((run / "summary.json").read_text())
    gpu = {"gpu_sm_clock_mhz_p50": 1590.4, "gpu_power_w_p50": 689.6}
    (run / "summary.json").write_text(json.dumps(summary | gpu))
    assert main(args) == 0
    hosts = pd.read_csv(report / "host_time.csv")
    assert hosts.sm_clock_mhz.tolist() == [1590] and hosts.power_w.tolist() == [690]
    assert "sm_clock_mhz" in capsys.readouterr().out
    # A profile without the split: no host table.
    synthetic_profile("llama-tiny").save(tmp_path / "plain.json")
    plain = tmp_path / "plain"
    args = [str(run), str(run), "--out", str(plain), "--profile", str(tmp_path / "plain.json")]
    assert main(args) == 0
    assert not (plain / "host_time.csv").exists()
    assert "host time over the profile's" not in capsys.readouterr().out


def test_the_step_check_applies_the_power_cap_the_simulation_used(tmp_path: Path, capsys):
    """A simulation on a flat cap of 2 (every device time doubled; run.json names it), checked
    against its own profile: exact, the cap applied. Checked as the reference of a simulation
    without it, its device-bound steps are twice the prediction."""
    from engine.sim.power import PowerCap
    from tests.test_sim import split_profile, synthetic_profile

    profile = tmp_path / "p.json"
    split_profile().save(profile)
    PowerCap(0.2, 0.0, 2.0, 0.0).save(tmp_path / "p.power.json")

    def simulate(name: str, *overrides: str) -> Path:
        harness(tmp_path / name, "executor.engine=sim", f"executor.profile={profile}",
                "model=llama-1b", "workload.num_requests=20", "workload.rate=50",
                "progress=false", "plots=false", *overrides)  # fmt: skip
        return only_dir(tmp_path / name / "default")

    capped, plain = simulate("capped"), simulate("plain", "executor.sim_power=null")
    report = tmp_path / "report"
    assert main([str(capped), str(capped), "--out", str(report), "--profile", str(profile)]) == 0
    assert pd.read_csv(report / "steps.csv")["bias"].abs().max() < 1e-9
    assert "with the power cap the simulation used" in capsys.readouterr().out
    assert main([str(capped), str(plain), "--out", str(report), "--profile", str(profile)]) == 0
    steps = pd.read_csv(report / "steps.csv")
    assert steps["bias"].min() == pytest.approx(-0.5)  # predicted half the measured time
    assert "power cap" not in capsys.readouterr().out
    # A profile without host and device apart cannot take the simulation's cap.
    plain_profile = tmp_path / "plain.json"
    synthetic_profile("llama-1b").save(plain_profile)
    assert main([str(capped), str(capped), "--profile", str(plain_profile)]) == 2
    assert "a power cap needs a profile with host and device apart" in capsys.readouterr().err
