"""The profiler of the simulated engine (engine/sim/profiler.py) and the profile file's checks.

The profiler runs the real engine (llama-tiny on the CPU, small grid) and must record steps of
exactly the shapes its grid asks for, leave the engine idle with no KV block in use, and write a
profile that loads back and fits. Timings are only checked to be positive.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sim import LinearCostModel, Profile, available_profiles, default_profile_path
from engine.sim.cost_model import StepFeatures
from engine.sim.profile import SERVING
from engine.sim.profiler import (
    ProfileGrid,
    ProfileShapeError,
    causal_pairs,
    fit_report,
    free_bytes_for_kv,
    main,
    profile_engine,
    split_tokens,
)
from policies.kv_cache.paged import PagedKVCacheManager

REPO = Path(__file__).resolve().parent.parent
GRID = ProfileGrid.small()
MAX_BATCH_SIZE = 8
MAX_NUM_TOKENS = 64


def tiny_llm(capacity_scheduler: str = "guaranteed_no_evict") -> LLM:
    return LLM(
        "llama-tiny",
        device="cpu",
        dtype="float32",
        capacity_scheduler=capacity_scheduler,
        microbatch_scheduler=dict(
            max_batch_size=MAX_BATCH_SIZE,
            max_num_tokens=MAX_NUM_TOKENS,
            chunking="first_come_first_served",
        ),
        kv_cache_manager=dict(tokens_per_block=8, max_tokens=2048),
    )


@pytest.fixture(scope="module")
def profiled() -> tuple[LLM, Profile]:
    llm = tiny_llm()
    return llm, profile_engine(llm, GRID, repeats=2, progress=False)


def rows(profile: Profile, kind: str) -> list[dict]:
    return [row for row in profile.steps if row["kind"] == kind]


# ---- the grid ---------------------------------------------------------------------------------
def test_grids_have_points_of_every_kind_within_the_engine_limits():
    assert GRID.num_points() == {
        "decode": 7,
        "prefill": 4,
        "mixed": 8,
        "chunked": 2,
        "replay": 6,
    }
    full = ProfileGrid.full(256, 8192)
    assert full.num_points() == {
        "decode": 57,
        "prefill": 21,
        "mixed": 54,
        "chunked": 3,
        "replay": 300,
    }
    assert full.mixed_contexts == (512, 1536, 2048)  # KV lengths: decode rows vs KV bytes
    assert full.mixed_prefill_points[:2] == [(256, 1), (256, 4)]  # a prompt's cost vs a step's
    assert full.mixed_decodes == (16, 64, 255)  # and one slot for the prefill
    smaller = ProfileGrid.full(max_batch_size=64, max_num_tokens=2048)
    assert max(smaller.decode_batch_sizes) == 64 and max(smaller.prefill_tokens) == 2048
    assert smaller.mixed_decodes == (16, 63) and smaller.mixed_prefill_tokens == (256, 1024)
    assert ProfileGrid(prefill_tokens=[8], prefill_seqs=[1, 16]).prefill_points == [(8, 1)]
    # Ragged decodes: B >= 2k sequences, one at k * c, the same B * c KV tokens in all.
    assert full.ragged_decode_points[0] == (8, 256, 4) and len(full.ragged_decode_points) == 12
    assert ProfileGrid.ragged_contexts(4, 16, 2) == [32, 11, 11, 10]
    with pytest.raises(ValueError, match="decode_ragged_skews"):
        ProfileGrid(decode_ragged_skews=(1,))
    with pytest.raises(ValueError, match="decode_batch_sizes"):
        ProfileGrid(decode_batch_sizes=(0,))
    with pytest.raises(ValueError, match="replay_prompt_lens"):
        ProfileGrid(replay_prompt_lens=(64, 8))


# ---- the profile of the real engine ------------------------------------------------------------
def test_decode_points_have_the_asked_batch_at_the_asked_context(profiled):
    _, profile = profiled
    decode = rows(profile, "decode")
    num_uniform = len(GRID.decode_batch_sizes) * len(GRID.decode_contexts)
    assert len(decode) == num_uniform + len(GRID.ragged_decode_points)
    # The ragged point (B=4, c=16, k=2): KV lengths 32, 11, 11, 10 at its first decode.
    skews = [r["max_decode_kv"] * r["num_decode_seqs"] / r["decode_kv_tokens"] for r in decode]
    [ragged] = [row for row, skew in zip(decode, skews, strict=True) if skew > 1.5]
    assert ragged["num_decode_seqs"] == 4 and 64 <= ragged["decode_kv_tokens"] <= 64 + 4 * 30
    assert 32 <= ragged["max_decode_kv"] <= 32 + 30
    shapes = set()
    for row in decode:
        if row is ragged:
            continue
        batch = row["num_decode_seqs"]
        assert row["num_context_tokens"] == 0 and row["num_context_seqs"] == 0
        # KV length c at the first decode; a few tokens further on after the set-up steps.
        context = max(c for c in GRID.decode_contexts if row["decode_kv_tokens"] >= batch * c)
        assert batch * context <= row["decode_kv_tokens"] <= batch * (context + 30)
        shapes.add((batch, context))
    assert shapes == {(b, c) for b in GRID.decode_batch_sizes for c in GRID.decode_contexts}


def test_a_decode_point_holds_only_its_own_batch():
    """The engine holds exactly B requests while B decode (host work grows with every request
    held, so B=1 timed among 256 held ones would be too slow)."""
    llm = tiny_llm()
    held = []
    step = llm.executor.step

    def counting_step():
        stats = step()
        if stats is not None:
            held.append(stats.num_active_requests)
        return stats

    llm.executor.step = counting_step
    grid = ProfileGrid(decode_batch_sizes=(1, 4), decode_contexts=(16,))
    profile = profile_engine(llm, grid, repeats=2, warmup=0, progress=False)
    assert [row["num_decode_seqs"] for row in profile.steps] == [1, 4]
    # Each point: prefill steps, then 2 timed steps, then the drain, all with B requests held.
    assert set(held) == {1, 4}


def test_prefill_points_prefill_T_tokens_over_S_fresh_sequences(profiled):
    _, profile = profiled
    prefill = rows(profile, "prefill")
    shapes = {(row["num_context_tokens"], row["num_context_seqs"]) for row in prefill}
    assert shapes == set(GRID.prefill_points) == {(8, 1), (8, 4), (32, 1), (32, 4)}
    for row in prefill:
        tokens, seqs = row["num_context_tokens"], row["num_context_seqs"]
        assert row["num_decode_seqs"] == 0 and row["decode_kv_tokens"] == 0
        assert row["context_attention"] == seqs * causal_pairs(tokens // seqs)  # no prefix


def test_mixed_and_chunked_points_carry_decodes_or_a_prefix(profiled):
    _, profile = profiled
    mixed = rows(profile, "mixed")
    context = GRID.mixed_contexts[0]
    shapes = {(r["num_decode_seqs"], r["num_context_tokens"], r["num_context_seqs"]) for r in mixed}
    assert shapes == {(r, t, s) for r in (2, 4) for t in (8, 32) for s in (1, 2)}
    for row in mixed:
        decodes, tokens, seqs = (
            row[k] for k in ("num_decode_seqs", "num_context_tokens", "num_context_seqs")
        )
        prompts = split_tokens(tokens, seqs)  # all S prompts ran in the one timed step
        assert row["context_attention"] == sum(causal_pairs(n) for n in prompts)
        assert decodes * context <= row["decode_kv_tokens"] <= decodes * (context + 40)
    chunked = rows(profile, "chunked")
    assert sorted(r["num_context_tokens"] for r in chunked) == [8, 32]
    for row in chunked:
        tokens = row["num_context_tokens"]
        assert row["num_context_seqs"] == 1 and row["num_decode_seqs"] == 0
        assert row["context_attention"] == causal_pairs(tokens, GRID.chunked_prefix)


def test_every_step_records_its_host_enqueue_time(profiled):
    """The host's share of each timed step (until its forward returned): positive and within
    the step (on a CPU the forward runs as it is called, so it is most of the step)."""
    _, profile = profiled
    for row in profile.steps:
        assert 0 < row["host_seconds"] <= row["seconds"], row

    def decode_row(report: str) -> list[str]:  # the error table's decode row
        return next(r.split() for r in report.splitlines() if re.match(r"  decode +\d+ ", r))

    assert decode_row(fit_report(profile))[-1].endswith("%")  # the report's host column
    without = dataclasses.replace(
        profile,
        steps=[{k: v for k, v in row.items() if k != "host_seconds"} for row in profile.steps],
    )
    assert decode_row(fit_report(without))[-1] == "-"  # profiles made before it was recorded


def test_replay_times_every_step_of_a_short_serving_run(profiled):
    _, profile = profiled
    replay = rows(profile, "replay")
    # One request arrives before each of the first 6 steps; all of them are timed, to the end.
    assert len(replay) >= GRID.replay_requests
    assert all(row["seconds"] > 0 for row in replay)
    assert replay[0]["num_decode_seqs"] == 0 and replay[0]["num_context_seqs"] == 1
    assert any(r["num_context_seqs"] and r["num_decode_seqs"] for r in replay)  # mixed steps
    assert replay[-1]["num_context_seqs"] == 0  # the drain: decodes only
    low, high = GRID.replay_prompt_lens
    prompts = sum(r["num_context_tokens"] for r in replay)
    assert GRID.replay_requests * low <= prompts <= GRID.replay_requests * high
    assert "predicted by a fit to the grid points alone" in fit_report(profile)


def test_profiling_leaves_the_engine_idle_and_as_it_was(profiled):
    llm, _ = profiled
    kv = llm.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks  # no block leaked
    kv.check_integrity()
    assert not llm.executor.has_unfinished_requests
    assert llm.microbatch_scheduler.max_batch_size == MAX_BATCH_SIZE
    assert llm.microbatch_scheduler.max_num_tokens == MAX_NUM_TOKENS
    assert "forward" not in vars(llm.model_engine)  # the spy is gone
    outputs = llm.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(outputs[0].token_ids) == 3


def test_profile_metadata(profiled):
    _, profile = profiled
    assert (profile.model, profile.device, profile.dtype) == ("llama-tiny", "cpu", "float32")
    assert all(row["seconds"] > 0 for row in profile.steps)
    assert profile.memory == {}  # no GPU memory to report on a CPU
    engine = profile.engine
    assert engine["max_batch_size"] == MAX_BATCH_SIZE
    assert engine["max_num_tokens"] == MAX_NUM_TOKENS
    assert engine["tokens_per_block"] == 8
    assert engine["cuda_graphs"] is False and engine["attention_backend"] == "torch"
    assert engine["fast_launch"] is False and engine["piecewise_cuda_graphs"] is False  # CPU
    assert engine["num_sms"] is None  # a GPU's SMs, which the decode kernel's splits follow
    assert engine["skipped"] == [] and engine["repeats"] == 2
    assert {"torch", "transformers", "python"} <= set(profile.software)
    assert profile.created.endswith("+00:00")


def test_profile_round_trips_and_fits(profiled, tmp_path):
    _, profile = profiled
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded == profile
    model = LinearCostModel.fit(loaded.samples())
    assert all(model.predict(features) > 0 for features, _ in loaded.samples())
    report = fit_report(loaded)
    assert "decode_kv_tokens" in report and "median" in report
    # The simulated engine runs on it.
    sim = LLM("llama-tiny", engine="sim", cost_model=path, kv_cache_manager=dict(max_tokens=512))
    outputs = sim.generate([[5, 6, 7]] * 3, SamplingParams(max_new_tokens=4))
    assert all(o.metrics.e2e_latency > 0 for o in outputs)


def test_points_that_cannot_run_are_skipped_and_reported(profiled):
    llm, _ = profiled
    grid = ProfileGrid(
        decode_batch_sizes=(16,),  # > max_batch_size
        decode_contexts=(16,),
        prefill_tokens=(128,),  # > max_num_tokens
        prefill_seqs=(1,),
        mixed_decodes=(8,),  # no batch slot left for the prefill
        mixed_contexts=(16,),
        mixed_prefill_tokens=(8,),
        chunked_prefix=12,  # not a multiple of the chunk unit (8)
        chunked_tokens=(8,),
    )
    profile = profile_engine(llm, grid, repeats=1, progress=False)
    assert profile.steps == []
    skipped = profile.engine["skipped"]
    assert [s["kind"] for s in skipped] == ["decode", "prefill", "mixed", "chunked"]  # no replay
    assert "batch limit" in skipped[0]["reason"]
    assert "max_num_tokens" in skipped[1]["reason"]
    assert "batch limit" in skipped[2]["reason"]
    assert "chunk unit" in skipped[3]["reason"]


def test_a_step_of_another_shape_stops_profiling():
    # static_batch admits no request while others decode: the mixed step is decode-only.
    llm = tiny_llm(capacity_scheduler="static_batch")
    grid = ProfileGrid(mixed_decodes=(2,), mixed_contexts=(16,), mixed_prefill_tokens=(8,))
    with pytest.raises(ProfileShapeError, match=r"mixed R=2 T=8.*num_context_tokens=0"):
        profile_engine(llm, grid, repeats=1, progress=False)


def test_bad_arguments_are_value_errors(profiled):
    llm, _ = profiled
    with pytest.raises(ValueError, match="repeats"):
        profile_engine(llm, GRID, repeats=0)
    sim = LLM(
        "llama-tiny",
        engine="sim",
        cost_model=LinearCostModel({}, {}),
        kv_cache_manager=dict(max_tokens=512),
    )
    with pytest.raises(ValueError, match="real engine"):
        profile_engine(sim, GRID)


@pytest.mark.parametrize("fraction", [0.9, 0.5, 0.95, 1.0, 0.123])
@pytest.mark.parametrize("num_blocks", [1, 7, 1000, 123457])
def test_free_bytes_for_kv_sizes_a_simulated_pool_to_the_same_blocks(fraction, num_blocks):
    kv = PagedKVCacheManager(tokens_per_block=32, free_gpu_memory_fraction=fraction)
    bytes_per_block = 32 * 32 * 2 * 8 * 128 * 2  # llama-8b in bfloat16
    free = free_bytes_for_kv(num_blocks, bytes_per_block, fraction)
    kv.allocate_pool(32, 8, 128, torch.bfloat16, torch.device("meta"), free_bytes=free)
    assert kv.num_blocks == num_blocks


# ---- the command line ---------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.sim.profiler", *args],
        cwd=REPO,
        # One thread, as in conftest: OpenMP spin-waiting on a busy 2-core machine is slow.
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "p.json"
    result = run_cli(
        "--device", "cpu", "--model", "llama-tiny", "--grid", "small", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    profile = Profile.load(out)
    assert profile.model == "llama-tiny" and profile.device == "cpu"
    assert {row["kind"] for row in profile.steps} == {
        "decode",
        "prefill",
        "mixed",
        "chunked",
        "replay",
    }
    assert profile.command.startswith("python -m engine.sim.profiler --device cpu")
    assert "in-sample relative error" in result.stdout and "intercept" in result.stdout
    assert "[profiler] decode" in result.stderr  # a progress line per group


def test_cli_bad_argument_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "p.json"
    result = run_cli(
        "--device", "cpu", "--model", "llama-tiny", "--out", str(out), "--kv-fraction", "2"
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "free_gpu_memory_fraction" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--dtype", "float8"], "dtype must be"),
        (["--model", "no-such-model"], "unknown model"),
        (["--out", "."], "is a directory"),
        (["--piecewise"], "piecewise_cuda_graphs=True needs a CUDA device"),
        pytest.param(
            ["--device", "cuda"],
            "no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),
        ),
    ],
)
def test_main_reports_bad_arguments(tmp_path, capsys, args, message):
    defaults = ["--device", "cpu", "--model", "llama-tiny", "--out", str(tmp_path / "p.json")]
    assert main([*defaults, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "p.json").exists()
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors: exit 2 too
        main([*defaults, "--grid", "huge"])
    assert exit_info.value.code == 2


# ---- Profile.load's errors ----------------------------------------------------------------------
def profile_data() -> dict:
    step = dict(
        num_context_seqs=0,
        num_context_tokens=0,
        context_attention=0.0,
        num_decode_seqs=4,
        decode_kv_tokens=64,
        seconds=0.01,
    )
    return {
        "format": 1,
        "model": "llama-tiny",
        "device": "cpu",
        "dtype": "float32",
        "steps": [dict(step), dict(step)],
    }


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_profile_load_reads_a_minimal_file(tmp_path):
    profile = Profile.load(write(tmp_path / "p.json", profile_data()))
    assert len(profile.samples()) == 2 and profile.memory == {}


def test_profile_load_missing_file(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: no such profile file"):
        Profile.load(path)


def test_profile_load_bad_json(tmp_path):
    path = write(tmp_path / "p.json", '{"format": 1, "steps": [')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not valid JSON"):
        Profile.load(path)


def test_profile_load_not_an_object_or_wrong_format(tmp_path):
    path = write(tmp_path / "p.json", [1, 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: a profile is a JSON object"):
        Profile.load(path)
    path = write(tmp_path / "p.json", {**profile_data(), "format": 2})
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: format 2, expected 1"):
        Profile.load(path)


@pytest.mark.parametrize("field", ["model", "device", "dtype", "steps"])
def test_profile_load_missing_field(tmp_path, field):
    data = profile_data()
    del data[field]
    path = write(tmp_path / "p.json", data)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: missing field '{field}'"):
        Profile.load(path)


def test_profile_load_step_missing_a_feature(tmp_path):
    data = profile_data()
    del data["steps"][1]["decode_kv_tokens"]
    path = write(tmp_path / "p.json", data)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: steps\[1\] has no decode_kv_tokens"
    ):
        Profile.load(path)


@pytest.mark.parametrize("seconds", [0, -0.5])
def test_profile_load_non_positive_seconds(tmp_path, seconds):
    data = profile_data()
    data["steps"][0]["seconds"] = seconds
    path = write(tmp_path / "p.json", data)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: steps\[0\]\.seconds must be > 0"
    ):
        Profile.load(path)


# ---- the committed profiles ---------------------------------------------------------------------
COMMITTED = [
    (model, device, overlap, False)
    for model in ("llama-1b", "llama-8b")
    for device, overlap in (("h100", False), ("h200", False), ("h200", True))
] + [("llama-1b", "h200", True, True)]


@pytest.mark.parametrize(("model", "device", "overlap", "full"), COMMITTED)
def test_committed_profiles_fit_their_own_serving_steps(model, device, overlap, full):
    """engine/sim/profiles/<device>/<model>[.full][.overlap].json, measured on that GPU
    (python -m engine.sim.profiler; the H200 ones with piecewise CUDA graphs, the engine's
    default, or full ones), the .overlap ones calibrated on runs with overlap scheduling."""
    path = default_profile_path(model, device, overlap, full)
    assert f"{device}/{path.stem}" in available_profiles()
    profile = Profile.load(path)
    assert profile.engine.get("full_cuda_graphs", False) is full
    if full:
        assert "--full-graphs" in profile.command
    assert profile.overlap_scheduler is (overlap if profile.calibration else None)
    assert profile.model == model and device.upper() in profile.device
    assert profile.dtype == "bfloat16"
    assert profile.command.startswith(f"python -m engine.sim.profiler --model {model}")
    assert profile.engine["cuda_graphs"] and profile.engine["attention_backend"] == "triton"
    kinds = Counter(row["kind"] for row in profile.steps)
    assert set(kinds) - {SERVING} == {"decode", "prefill", "mixed", "chunked", "replay"}
    assert kinds["replay"] >= 300 and kinds["decode"] >= 30
    # A calibrated profile (python -m harness.calibrate) is fitted to its real serving steps;
    # the others to the grid, checked on the profiler's own short serving run (replay).
    serving = SERVING if profile.calibration else "replay"
    assert kinds[serving] >= 300
    cost = profile.cost_model()
    errors = [
        abs(cost.predict(features) - seconds) / seconds
        for row, (features, seconds) in zip(profile.steps, profile.samples(), strict=True)
        if row["kind"] == serving
    ]
    assert statistics.median(errors) < 0.10
    one = cost.predict(StepFeatures(num_decode_seqs=1, decode_kv_tokens=1024))
    full = cost.predict(StepFeatures(num_decode_seqs=256, decode_kv_tokens=256 * 1024))
    assert 0 < one < full
    assert profile.memory["free_bytes_for_kv"] > profile.memory["kv_pool_bytes"] > 0


def test_the_report_of_a_split_profile_gives_both_fits():
    from tests.test_sim import split_profile

    split = split_profile()
    report = fit_report(split)
    assert "host: LinearCostModel" in report and "device: LinearCostModel" in report
    plain = dataclasses.replace(split, calibration=[])  # no overlap source: one fit
    assert report.count("floor") == 2 * fit_report(plain).count("floor") > 0
