"""Calibrating a profile with real serving steps: which samples the cost model fits, and
``python -m harness.calibrate`` on real (CPU) and simulated runs."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from engine.sim.cost_model import PREFILL_TERMS, StepFeatures
from engine.sim.padding import StepPadding
from engine.sim.profile import MIN_SERVING_STEPS, SERVING, Profile
from harness.calibrate import features, main
from tests.test_harness import harness, only_dir
from tests.test_sim import law, synthetic_profile

SLOWER = 1.25  # the serving steps below take this much longer than the profile's law


def serving_rows(num: int, kind: str = "decode") -> list[dict]:
    """``num`` steps of ``kind`` with independent counts (seeded), ``SLOWER`` than ``law``."""
    rng = random.Random(0)
    rows = []
    for _ in range(num):
        seqs = rng.randint(1, 64)
        kv = seqs * rng.randint(100, 2000)
        if kind == "decode":
            f = StepFeatures(num_decode_seqs=seqs, decode_kv_tokens=kv)
        else:
            tokens = rng.randint(64, 4096)
            f = StepFeatures(
                num_context_seqs=rng.randint(1, 4),
                num_context_tokens=tokens,
                context_attention=tokens * rng.randint(tokens // 2, 4 * tokens),
                num_decode_seqs=seqs,
                decode_kv_tokens=kv,
            )
        rows.append({**f.as_dict(), "seconds": SLOWER * law(f)})
    return rows


def test_a_kind_with_enough_serving_steps_is_fitted_to_them_alone():
    grid = synthetic_profile("llama-1b")
    calibrated = grid.with_serving_steps(serving_rows(MIN_SERVING_STEPS), {"run": "a"})
    assert len(grid.steps) + MIN_SERVING_STEPS == len(calibrated.steps)  # the grid is kept
    assert grid.calibration == [] and calibrated.calibration == [{"run": "a"}]
    assert sum(row.get("kind") == SERVING for row in calibrated.steps) == MIN_SERVING_STEPS
    decode = StepFeatures(num_decode_seqs=20, decode_kv_tokens=20 * 500)
    prefill = StepFeatures(num_context_seqs=2, num_context_tokens=600, context_attention=9e4)
    model = calibrated.cost_model()
    assert model.predict(decode) == pytest.approx(SLOWER * law(decode), rel=1e-6)
    assert model.predict(prefill) == pytest.approx(law(prefill), rel=1e-6)  # no serving prefill
    # One serving step short of the threshold: the kind keeps the profiler's steps.
    few = grid.with_serving_steps(serving_rows(MIN_SERVING_STEPS - 1), {"run": "b"})
    assert few.cost_model().predict(decode) == pytest.approx(law(decode), rel=1e-6)
    # One source per kind: the decode fit sees only serving steps, the others only the grid's.
    serving = {StepFeatures(**{k: r[k] for k in StepFeatures.__dataclass_fields__})
               for r in serving_rows(MIN_SERVING_STEPS)}  # fmt: skip
    fitted = calibrated.fit_samples()
    assert {f for f, _ in fitted if f.kind == "decode"} == serving
    assert not serving & {f for f, _ in fitted if f.kind != "decode"}
    assert len(fitted) == len(calibrated.steps) - sum(f.kind == "decode" for f, _ in grid.samples())


def test_ragged_serving_steps_teach_the_decode_fit_their_longest_sequence():
    """Serving decode steps whose time also grows with the longest sequence (one decode
    program walks one sequence): the calibrated fit learns that term, and a step with the same
    totals but one long sequence is predicted slower. Rows without the column (older profiles
    and runs) load with 0 there, a term that then gets no coefficient."""
    tail = 2e-6  # seconds per token of the longest sequence
    rng = random.Random(1)
    rows = []
    for _ in range(60):
        seqs = rng.randint(8, 128)
        longest = rng.randint(200, 8000)
        kv = seqs * rng.randint(100, 1500) + longest
        f = StepFeatures(num_decode_seqs=seqs, decode_kv_tokens=kv, max_decode_kv=longest)
        rows.append({**f.as_dict(), "seconds": law(f) + tail * longest})
    full = synthetic_profile("llama-1b")
    older = [{k: v for k, v in row.items() if k != "max_decode_kv"} for row in full.steps]
    grid = dataclasses.replace(full, steps=older)  # as profiles made before the column
    model = grid.with_serving_steps(rows, {"run": "ragged"}).cost_model()
    # A GPU without a split rule (engine.sim.decode_splits): the span is the longest sequence
    assert model.decode_splits is None
    assert model.decode["decode_span"] == pytest.approx(tail, rel=1e-3)
    even = StepFeatures(num_decode_seqs=64, decode_kv_tokens=64 * 1000, max_decode_kv=1000)
    ragged = dataclasses.replace(even, max_decode_kv=6000)
    assert model.predict(ragged) - model.predict(even) == pytest.approx(tail * 5000, rel=1e-3)
    assert grid.cost_model().decode["decode_span"] == 0.0  # every grid row lacks it


def test_prefill_steps_follow_serving_mixed_steps():
    """Serving runs have few pure prefill steps: with enough serving mixed steps, prefills are
    fitted with them (a free fit to serving steps) rather than to the grid's prefill points."""
    calibrated = synthetic_profile("llama-1b").with_serving_steps(
        serving_rows(MIN_SERVING_STEPS, "mixed"), {"run": "m"}
    )
    assert {f.kind for f, _ in calibrated.fit_samples()} == {"decode", "mixed"}
    prefill = StepFeatures(num_context_seqs=2, num_context_tokens=600, context_attention=9e4)
    mixed = StepFeatures(3, 900, 3e5, num_decode_seqs=10, decode_kv_tokens=5000)
    model = calibrated.cost_model()
    assert model.predict(mixed) == pytest.approx(SLOWER * law(mixed), rel=1e-3)
    assert model.predict(prefill) == pytest.approx(SLOWER * law(prefill), rel=1e-3)
    # A few serving prefill steps (enough for a fit of their own): still one free fit of
    # every context step, not a mixed model composed from a prefill fit to those few
    prefills = [
        StepFeatures(num_context_seqs=s, num_context_tokens=t, context_attention=t * t / s)
        for s, t in ((1, 40), (2, 300), (1, 900), (4, 1200), (1, 2000), (2, 3000), (3, 64),
                     (1, 5000), (2, 700), (1, 150))
    ]  # fmt: skip
    rows = [{**f.as_dict(), "seconds": SLOWER * law(f)} for f in prefills]
    with_prefills = calibrated.with_serving_steps(rows, {"run": "p"})
    model = with_prefills.cost_model()
    assert len(prefills) >= 2 * len(PREFILL_TERMS) and model.prefill is None
    assert model.predict(mixed) == pytest.approx(SLOWER * law(mixed), rel=1e-3)


def test_a_calibrated_profile_round_trips(tmp_path: Path):
    calibrated = synthetic_profile("llama-1b").with_serving_steps(
        serving_rows(40, "mixed"), {"run": "r", "num_steps": 40, "num_used": 40}
    )
    path = tmp_path / "p.json"
    calibrated.save(path)
    loaded = Profile.load(path)
    assert loaded == calibrated
    assert loaded.cost_model() == calibrated.cost_model()
    absolute = dataclasses.replace(calibrated, fit_error="absolute")
    absolute.save(path)
    assert Profile.load(path).cost_model() == absolute.cost_model() != calibrated.cost_model()
    path.write_text(path.read_text().replace('"fit_error": "absolute"', '"fit_error": "l1"'))
    with pytest.raises(ValueError, match="fit_error must be one of"):
        Profile.load(path)


def test_an_absolute_fit_keeps_the_serving_steps_total_time():
    """Serving steps with noise (seeded, +-20%): the relative fit has the lower relative error,
    the absolute fit the lower absolute error and a total time closer to the measured one,
    which is what a queue of those steps integrates."""
    rng = random.Random(1)
    rows = serving_rows(200, "mixed") + serving_rows(200, "decode")
    for row in rows:
        row["seconds"] *= rng.uniform(0.8, 1.2)
    profile = synthetic_profile("llama-1b").with_serving_steps(rows, {"run": "r"})
    samples = profile.fit_samples()
    seconds = [s for _, s in samples]
    errors = {}
    for fit_error in ("relative", "absolute"):
        model = dataclasses.replace(profile, fit_error=fit_error).cost_model()
        predicted = [model.predict(f) for f, _ in samples]
        pairs = list(zip(predicted, seconds, strict=True))
        errors[fit_error] = (
            sum(((p - s) / s) ** 2 for p, s in pairs),
            sum((p - s) ** 2 for p, s in pairs),
            abs(sum(predicted) / sum(seconds) - 1),
        )
    assert errors["relative"][0] < errors["absolute"][0]
    assert errors["absolute"][1] < errors["relative"][1]
    assert errors["absolute"][2] < errors["relative"][2]


def cpu_run(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "runs"
    # Outputs long enough for MIN_SERVING_STEPS decode steps, on the CPU.
    harness(
        out,
        "model=llama-tiny",
        "executor.device=cpu",
        "workload.max_requests=8",
        "workload.max_output_len=48",
        "workload.max_input_len=64",
        "progress=false",
        *args,
    )
    return only_dir(out / "default")


def test_cli_calibrates_with_a_real_run_and_refuses_the_wrong_runs(tmp_path: Path, capsys):
    """A real run on the CPU: its steps become serving steps (capped by --max-steps), the table
    shows the bias before and after, and the decode fit then uses them alone. A profile of
    another device or model, or a missing directory, is refused with the reason."""
    run = cpu_run(tmp_path, "executor.overlap_scheduler=false")
    assert json.loads((run / "run.json").read_text())["hardware"] == "cpu"  # what is checked
    iterations = pd.read_parquet(run / "iterations.parquet")
    has_work = (iterations.num_context_tokens + iterations.num_generation_requests) > 0
    num_steps = int(has_work.sum())
    profile = dataclasses.replace(synthetic_profile("llama-tiny"), device="cpu")
    profile.save(tmp_path / "p.json")
    out = tmp_path / "calibrated.json"
    args = [str(run), "--profile", str(tmp_path / "p.json"), "--out", str(out)]
    assert main([*args, "--max-steps", "1000"]) == 0
    printed = capsys.readouterr().out
    assert "bias_before" in printed and f"{num_steps} serving steps added" in printed
    calibrated = Profile.load(out)
    serving = [row for row in calibrated.steps if row.get("kind") == SERVING]
    assert len(serving) == num_steps and calibrated.calibration[0]["num_steps"] == num_steps
    assert all(row["seconds"] > 0 and "host_seconds" in row for row in serving)
    # The run's rows as they are: its counts and its measured step times, in order.
    worked = iterations[has_work]
    assert [r["decode_kv_tokens"] for r in serving] == worked.decode_kv_tokens.tolist()
    assert [r["num_decode_seqs"] for r in serving] == worked.num_generation_requests.tolist()
    assert [r["seconds"] for r in serving] == worked.step_latency.tolist()
    # Enough decode steps: the decode fit now uses them alone.
    fitted = [f for f, _ in calibrated.fit_samples() if f.kind == "decode"]
    assert len(fitted) == sum(r["num_context_tokens"] == 0 for r in serving) >= MIN_SERVING_STEPS

    assert Profile.load(out).fit_error == "relative"
    assert main([*args, "--fit-error", "absolute"]) == 0
    assert Profile.load(out).fit_error == "absolute"
    assert main([*args, "--max-steps", "10"]) == 0  # of each kind
    kept = Counter(f.kind for f, _ in Profile.load(out).samples()[len(profile.steps) :])
    assert kept["decode"] == 10 and all(n <= 10 for n in kept.values())
    capsys.readouterr()
    # --kinds decode: the decode steps alone are added, and the source says so
    assert main([*args, "--kinds", "decode"]) == 0
    calibrated = Profile.load(out)
    added = Counter(f.kind for f, _ in calibrated.samples()[len(profile.steps) :])
    assert set(added) == {"decode"}
    assert added["decode"] == sum(r["num_context_tokens"] == 0 for r in serving)
    assert calibrated.calibration[0]["kinds"] == ["decode"]
    assert main([*args, "--kinds", "decode,prompt"]) == 2
    assert "kinds must be some of ('decode', 'prefill', 'mixed')" in capsys.readouterr().err
    # Calibrated twice: the steps add up, unless --from-grid drops the first calibration's
    twice = [str(run), "--profile", str(out), "--out", str(tmp_path / "twice.json")]
    assert main(twice) == 0
    assert len(Profile.load(tmp_path / "twice.json").calibration) == 2
    assert main([*twice, "--from-grid", "--kinds", "decode"]) == 0
    fresh = Profile.load(tmp_path / "twice.json")
    assert fresh.steps[: len(profile.steps)] == profile.steps  # the grid, as it was
    assert fresh.steps[len(profile.steps) :] == calibrated.steps[len(profile.steps) :]
    assert [c["kinds"] for c in fresh.calibration] == [["decode"]]
    assert "(its serving steps dropped: --from-grid)" in capsys.readouterr().out

    dataclasses.replace(profile, device="NVIDIA H200").save(tmp_path / "h200.json")
    assert main([str(run), "--profile", str(tmp_path / "h200.json"), "--out", str(out)]) == 2
    assert "a run on 'cpu', but the profile is of 'NVIDIA H200'" in capsys.readouterr().err
    dataclasses.replace(profile, model="llama-8b").save(tmp_path / "8b.json")
    assert main([str(run), "--profile", str(tmp_path / "8b.json"), "--out", str(out)]) == 2
    assert "a run of model 'llama-tiny', not 'llama-8b'" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), *args[1:]]) == 2
    assert "no such results directory" in capsys.readouterr().err


def test_cli_refuses_a_simulated_run(tmp_path: Path, capsys):
    from tests.test_fidelity import sim_run

    run, profile = sim_run(tmp_path)
    assert json.loads((run / "run.json").read_text())["hardware"] == "Synthetic GPU"
    assert main([str(run), "--profile", str(profile), "--out", str(tmp_path / "c.json")]) == 2
    assert "a simulated run" in capsys.readouterr().err


def test_an_overlap_run_is_calibrated_to_its_steps_host_or_device_time(tmp_path: Path, capsys):
    """With overlap the time between two reads mixes two steps' work, so an overlap run's steps
    are calibrated to max(host_time, device_time): on the CPU (no device timing) the host's.
    One profile takes runs of one mode only."""
    run = cpu_run(tmp_path, "executor.overlap_scheduler=true")
    iterations = pd.read_parquet(run / "iterations.parquet")
    worked = iterations[(iterations.num_context_tokens + iterations.num_generation_requests) > 0]
    assert worked.device_time.isna().all() and (worked.host_time > 0).all()
    profile = dataclasses.replace(synthetic_profile("llama-tiny"), device="cpu")
    profile.save(tmp_path / "p.json")
    out = tmp_path / "calibrated.json"
    assert main([str(run), "--profile", str(tmp_path / "p.json"), "--out", str(out)]) == 0
    calibrated = Profile.load(out)
    serving = [row for row in calibrated.steps if row.get("kind") == SERVING]
    assert [r["seconds"] for r in serving] == worked.host_time.tolist()
    assert calibrated.calibration[0]["overlap_scheduler"] is True
    # No device time on the CPU: the rows keep the host's, and the fit is not split.
    assert all("device_time" not in r and r["host_time"] > 0 for r in serving)
    assert not calibrated.has_host_device_split
    assert "host and device times of each run" not in capsys.readouterr().out

    # The same run as a GPU run would record it (device time beside the host's), onto a
    # profile with split serving steps of every kind: the fit is split, and the run's host
    # time over the calibrated host model is printed.
    from tests.test_sim import split_profile

    timed = iterations.assign(device_time=0.5 * iterations.host_time)
    timed.to_parquet(run / "iterations.parquet")
    dataclasses.replace(split_profile("llama-tiny"), device="cpu").save(tmp_path / "split.json")
    assert main([str(run), "--profile", str(tmp_path / "split.json"), "--out", str(out)]) == 0
    calibrated = Profile.load(out)
    serving = calibrated.steps[-len(worked) :]
    assert [r["device_time"] for r in serving] == (0.5 * worked.host_time).tolist()
    assert calibrated.has_host_device_split
    printed = capsys.readouterr().out
    assert "host and device times of each run" in printed and "host_time_scale" in printed
    assert str(run) in printed and "warning" not in printed
    # The same run again on a host twice as slow: calibrating both together is flagged.
    slow = tmp_path / "slow"
    shutil.copytree(run, slow)
    timed.assign(host_time=2 * timed.host_time).to_parquet(slow / "iterations.parquet")
    args = [str(run), str(slow), "--profile", str(tmp_path / "split.json"), "--out", str(out)]
    assert main(args) == 0
    warned = re.search(r"warning: these runs' hosts differ by ([\d.]+)x", capsys.readouterr().out)
    assert warned and float(warned.group(1)) == pytest.approx(2.0, rel=0.1)  # scales rounded

    iterations.drop(columns=["host_time", "device_time"]).to_parquet(run / "old.parquet")
    (run / "iterations.parquet").unlink()
    (run / "old.parquet").rename(run / "iterations.parquet")
    assert main([str(run), "--profile", str(tmp_path / "p.json"), "--out", str(out)]) == 2
    assert "an overlap run without host_time / device_time" in capsys.readouterr().err

    plain = cpu_run(tmp_path / "plain", "executor.overlap_scheduler=false")
    assert main([str(plain), "--profile", str(out), "--out", str(tmp_path / "mixed.json")]) == 2
    assert "with and without overlap scheduling" in capsys.readouterr().err


def test_a_run_before_the_padded_column_is_padded_as_its_config_says(tmp_path: Path, capsys):
    """Runs record the rows each step's dense layers ran on (``num_padded_tokens``: eager on the
    CPU, so its tokens). A GPU run made before that column existed gets the buckets its
    config's engine captured (engine.sim.padding): 16 sequences and 256 tokens on this config."""
    run = cpu_run(tmp_path, "executor.overlap_scheduler=false")
    iterations = pd.read_parquet(run / "iterations.parquet")
    tokens = iterations.num_context_tokens + iterations.num_generation_requests
    worked = iterations[tokens > 0]
    tokens = tokens[tokens > 0].tolist()
    assert worked.num_padded_tokens.tolist() == tokens
    profile = dataclasses.replace(synthetic_profile("llama-tiny"), device="cpu")
    profile.save(tmp_path / "p.json")
    out = tmp_path / "calibrated.json"
    args = [str(run), "--profile", str(tmp_path / "p.json"), "--out", str(out)]
    assert main(args) == 0

    def serving_padded() -> list[int]:
        return [r["num_padded_tokens"] for r in Profile.load(out).steps if r.get("kind") == SERVING]

    assert serving_padded() == tokens
    # The same run as an older one, from a GPU
    iterations.drop(columns=["num_padded_tokens"]).to_parquet(run / "iterations.parquet")
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "hardware": "NVIDIA H200"}))
    dataclasses.replace(profile, device="NVIDIA H200").save(tmp_path / "p.json")
    assert main(args) == 0
    padding = StepPadding.of_engine(max_batch_size=16, max_num_tokens=256)
    expected = [
        padding.padded(n, is_decode_only=c == 0)
        for n, c in zip(tokens, worked.num_context_tokens, strict=True)
    ]
    assert serving_padded() == expected != tokens
    capsys.readouterr()


def test_the_host_time_table_gives_each_runs_host_over_the_fitted_one():
    """Two runs, one on a host twice as slow: calibrated together, the table puts the second
    at twice the first (the scale that simulates each one's host)."""
    from harness.calibrate import host_time_table
    from tests.test_sim import split_profile

    grid_size = len(split_profile().steps) - 80
    rows = {scale: split_profile(host_scale=scale).steps[grid_size:] for scale in (1.0, 2.0)}
    profile = synthetic_profile("llama-1b")
    for scale, serving in rows.items():
        profile = profile.with_serving_steps(serving, {"run": scale, "overlap_scheduler": True})
    frame = pd.DataFrame([{**row, "run": scale} for scale, rs in rows.items() for row in rs])
    frame["kind"] = [f.kind for f in features(frame)]
    table = host_time_table(profile, frame).set_index("run").host_time_scale
    assert table[2.0] / table[1.0] == pytest.approx(2.0, rel=0.03)
    assert table[1.0] < 1 < table[2.0]  # the fit lies between the two hosts
    # Without the split (no overlap runs), no table.
    plain = dataclasses.replace(profile, calibration=[])
    assert host_time_table(plain, frame) is None
