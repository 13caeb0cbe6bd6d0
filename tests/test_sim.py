"""The simulated engine: step features, cost models, the sim LLM, and the same executor and
policies as the real engine (same schedule, step for step, given the same step times)."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from engine import LLM, SamplingParams
from engine.clock import VirtualClock
from engine.models import model_shape
from engine.scheduler import SchedulerOutput
from engine.sim import LinearCostModel, Profile, RooflineCostModel, StepFeatures
from engine.sim.cost_model import DECODE_TERMS, MIXED_TERMS
from engine.sim.padding import StepPadding
from engine.sim.profile import default_profile_path
from tests.scenario import make_request

# A step-time law to generate profiles from (seconds): decode-only steps and steps with
# context tokens each have their own coefficients, as in LinearCostModel.
DECODE = {"intercept": 2e-3, "num_decode_seqs": 1e-5, "decode_kv_tokens": 2e-8}
MIXED = {
    "intercept": 4e-3,
    "num_padded_tokens": 3e-6,
    "context_attention": 1e-9,
    "num_context_seqs": 5e-5,
    "num_decode_seqs": 1e-5,
    "decode_kv_tokens": 2e-8,
}


def law(features: StepFeatures) -> float:
    return LinearCostModel(DECODE, MIXED).predict(features)


def synthetic_profile(model: str, free_bytes_for_kv: int | None = 2**30) -> Profile:
    """A profile whose steps follow ``law`` exactly (a stand-in for a measured one)."""
    shapes = [
        StepFeatures(num_decode_seqs=b, decode_kv_tokens=b * c)
        for b in (1, 8, 64)
        for c in (100, 1000)
    ]
    shapes += [
        StepFeatures(
            num_context_seqs=s,
            num_context_tokens=t,
            context_attention=t * (t / s + 1) / 2,
            num_decode_seqs=r,
            decode_kv_tokens=r * 500,
            num_padded_tokens=p,
        )
        for s, t, r, p in (
            (1, 64, 0, 64),
            (4, 500, 0, 512),
            (1, 2048, 16, 4096),
            (16, 4096, 0, 4096),
            (2, 256, 64, 512),
            (1, 8192, 0, 8192),
            (8, 1024, 128, 2048),
            (1, 1200, 0, 2048),
        )
    ]
    return Profile(
        model=model,
        device="Synthetic GPU",
        dtype="bfloat16",
        steps=[{**f.as_dict(), "seconds": law(f)} for f in shapes],
        memory={"free_bytes_for_kv": free_bytes_for_kv} if free_bytes_for_kv else {},
    )


def test_step_features_of_a_batch():
    """A context chunk of 5 after 3 computed tokens, a whole 4-token prompt, two decodes."""
    chunked = make_request(0, list(range(10, 20)))
    chunked.num_computed_tokens, chunked.context_chunk_size = 3, 5
    whole = make_request(1, [5, 6, 7, 8])
    whole.context_chunk_size = 4
    decodes = []
    for i, (prompt, out) in enumerate((([1, 2, 3], [4, 5]), ([9] * 7, [3]))):
        request = make_request(2 + i, prompt)
        request.output_token_ids = list(out)
        request.num_computed_tokens = request.num_tokens - 1
        decodes.append(request)
    batch = SchedulerOutput(context_requests=[chunked, whole], generation_requests=decodes)
    features = StepFeatures.of(batch)
    assert features == StepFeatures(
        num_context_seqs=2,
        num_context_tokens=9,
        context_attention=5 * (3 + 3) + 4 * (0 + 2.5),  # chunk * (computed + (chunk + 1) / 2)
        num_decode_seqs=2,
        decode_kv_tokens=5 + 8,
        max_decode_kv=8,  # the longer decode: 7 prompt tokens + 1 output
    )
    assert features.num_tokens == features.num_padded_tokens == 11  # not padded
    assert not features.is_decode_only
    # The real engine on a GPU runs 11 tokens in its 16-token piecewise graph, and 2 decodes
    # alone in its 2-sequence decode graph
    padding = StepPadding(decode_sizes=(1, 2, 4), token_sizes=(16, 32))
    assert StepFeatures.of(batch, padding) == dataclasses.replace(features, num_padded_tokens=16)
    decode_only = SchedulerOutput(generation_requests=decodes[:1] * 3)
    assert StepFeatures.of(decode_only, padding).num_padded_tokens == 4


def test_step_padding_follows_the_engine_settings():
    padding = StepPadding.of_engine(max_batch_size=64, max_num_tokens=1000)
    assert padding.decode_sizes == (1, 2, 4, 8, 16, 32, 48, 64)
    assert padding.token_sizes == (16, 32, 64, 128, 256, 512, 1000)
    assert padding.padded(33, is_decode_only=True) == 48
    assert padding.padded(513, is_decode_only=False) == 1000
    assert padding.padded(65, is_decode_only=True) == 65  # beyond every graph: eager
    assert padding.padded(16, is_decode_only=False) == 16
    explicit = StepPadding.of_engine(
        max_batch_size=64,
        max_num_tokens=1000,
        cuda_graph_batch_sizes=[8, 1],
        piecewise_token_sizes=[100],
    )
    assert explicit == StepPadding((1, 8), (100,))
    assert StepPadding.of_engine(
        max_batch_size=64, max_num_tokens=1000, piecewise_cuda_graphs=False
    ) == StepPadding(padding.decode_sizes, ())
    assert StepPadding.of_engine(max_batch_size=64, max_num_tokens=1000, enforce_eager=True) == (
        StepPadding()
    )
    # A profile made with prompt steps eager (the H100 ones) pads decode steps only
    engine = {"max_batch_size": 64, "max_num_tokens": 1000, "cuda_graphs": True}
    assert StepPadding.of_profile(engine) == StepPadding(padding.decode_sizes, ())
    assert StepPadding.of_profile({**engine, "piecewise_cuda_graphs": True}) == padding


def test_linear_fit_recovers_the_law():
    profile = synthetic_profile("llama-8b")
    model = profile.cost_model()
    for term, value in DECODE.items():
        assert math.isclose(model.decode[term], value, rel_tol=1e-6, abs_tol=1e-12), term
    for term, value in MIXED.items():
        assert math.isclose(model.mixed[term], value, rel_tol=1e-6, abs_tol=1e-12), term
    unseen = StepFeatures(num_decode_seqs=200, decode_kv_tokens=200 * 3000)
    assert math.isclose(model.predict(unseen), law(unseen), rel_tol=1e-9)


def test_linear_fit_needs_enough_steps_of_each_kind():
    samples = synthetic_profile("llama-8b").samples()
    decode_only = [s for s in samples if s[0].is_decode_only]
    with pytest.raises(ValueError, match=f"at least {len(MIXED_TERMS)} context steps"):
        LinearCostModel.fit(decode_only)
    with pytest.raises(ValueError, match=f"at least {len(DECODE_TERMS)} decode-only steps"):
        LinearCostModel.fit([s for s in samples if not s[0].is_decode_only])
    with pytest.raises(ValueError, match="must be positive"):
        LinearCostModel.fit([(decode_only[0][0], 0.0), *samples])


def random_steps(
    rng: np.random.Generator, count: int, max_seqs: int, max_kv: int, min_tokens: int
) -> list[StepFeatures]:
    """``count`` steps of random sizes, every other one decode-only, the others with 1-3
    prompts of ``min_tokens``-4095 tokens beside their decodes."""
    steps = []
    for i in range(count):
        seqs, kv = int(rng.integers(1, max_seqs)), int(rng.integers(100, max_kv))
        f = StepFeatures(num_decode_seqs=seqs, decode_kv_tokens=seqs * kv)
        if i % 2:
            tokens = int(rng.integers(min_tokens, 4096))
            f = dataclasses.replace(
                f,
                num_context_seqs=int(rng.integers(1, 4)),
                num_context_tokens=tokens,
                context_attention=tokens * float(rng.integers(tokens // 2, 4 * tokens)),
                num_padded_tokens=tokens + seqs,
            )
        steps.append(f)
    return steps


def noisy_samples(noise: float, seed: int = 0) -> list[tuple[StepFeatures, float]]:
    """Decode-only and mixed steps of ``law`` times a lognormal noise of ``noise`` (its
    sigma): measured steps scatter so around what their work costs."""
    rng = np.random.default_rng(seed)
    steps = random_steps(rng, 400, max_seqs=200, max_kv=3000, min_tokens=32)
    return [(f, law(f) * float(rng.lognormal(0.0, noise))) for f in steps]


def test_a_matched_fit_predicts_its_samples_total_with_the_same_shape():
    """The relative error's least squares predicts the typical step, under the mean by about
    twice the squared noise: ``match_totals`` scales each kind's fit to its samples' total
    and leaves every step's share of it as fitted."""
    samples = noisy_samples(noise=0.25)
    fitted = LinearCostModel.fit(samples)
    matched = LinearCostModel.fit(samples, match_totals=True)
    for kind in ("decode", "mixed"):
        steps = [(f, s) for f, s in samples if f.kind == kind]
        measured = sum(s for _, s in steps)
        assert sum(fitted.predict(f) for f, _ in steps) < 0.95 * measured  # ~2 * 0.25^2 short
        assert sum(matched.predict(f) for f, _ in steps) == pytest.approx(measured, rel=1e-9)
        ratios = [matched.predict(f) / fitted.predict(f) for f, _ in steps]
        assert ratios == pytest.approx([ratios[0]] * len(ratios), rel=1e-9)  # one scale a kind
        assert 1.03 < ratios[0] < 1.2
    # Exact samples: their totals are met already, nothing moves.
    exact = [(f, law(f)) for f, _ in samples]
    unmoved = LinearCostModel.fit(exact, match_totals=True)
    assert all(unmoved.predict(f) == pytest.approx(law(f), rel=1e-6) for f, _ in exact)


def test_roofline_by_hand():
    model = RooflineCostModel(
        num_params=1e9,
        weight_bytes=2e9,
        kv_bytes_per_token=1e5,
        attention_flops_per_pair=1e4,
        bandwidth=1e12,
        flops=1e14,
        overhead=1e-3,
    )
    # 64 decodes at 1,000 tokens: weights 2 ms (GEMMs 2*1e9*64/1e14 = 1.28 ms is below), KV 6.4 ms
    decode = StepFeatures(num_decode_seqs=64, decode_kv_tokens=64_000)
    assert math.isclose(model.predict(decode), 1e-3 + 2e-3 + 6.4e-3)
    # 8,192 prompt tokens: GEMMs 2*1e9*8192/1e14 = 163.84 ms; attention 1e7 pairs * 1e4 / 1e14
    prefill = StepFeatures(num_context_seqs=1, num_context_tokens=8192, context_attention=1e7)
    assert math.isclose(model.predict(prefill), 1e-3 + 0.16384 + 1e-3)


def sim_llm(profile: Profile, **kwargs) -> LLM:
    kwargs.setdefault("kv_cache_manager", dict(tokens_per_block=16))
    return LLM(profile.model, engine="sim", cost_model=profile, **kwargs)


def test_sim_pool_counts_blocks_from_the_profile_memory():
    profile = synthetic_profile("llama-1b", free_bytes_for_kv=2**30)
    llm = sim_llm(profile, kv_cache_manager=dict(tokens_per_block=16, free_gpu_memory_fraction=0.5))
    shape = model_shape("llama-1b")
    bytes_per_block = 16 * shape.kv_elements_per_token * 2  # bf16
    assert llm.kv_cache_manager.num_blocks == (2**30 // 2) // bytes_per_block
    assert llm.kv_cache_manager.kv_pool.device.type == "meta"  # counted, not allocated
    with pytest.raises(ValueError, match="simulated pool needs a size"):
        sim_llm(synthetic_profile("llama-1b", free_bytes_for_kv=None))
    sized = sim_llm(
        synthetic_profile("llama-1b", None),
        kv_cache_manager=dict(tokens_per_block=16, max_tokens=4096),
    )
    assert sized.kv_cache_manager.num_blocks == 4096 // 16


def test_sim_llm_setup_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="needs a cost_model"):
        LLM("llama-1b", engine="sim")
    with pytest.raises(ValueError, match="of model 'llama-1b', not 'llama-8b'"):
        LLM("llama-8b", engine="sim", cost_model=synthetic_profile("llama-1b"))
    with pytest.raises(ValueError, match="engine must be one of"):
        LLM("llama-1b", engine="vidur")
    with pytest.raises(ValueError, match="no such profile file"):
        LLM("llama-1b", engine="sim", cost_model=tmp_path / "missing.json")
    path = tmp_path / "p.json"
    synthetic_profile("llama-1b").save(path)
    assert LLM("llama-1b", engine="sim", cost_model=path).profile.device == "Synthetic GPU"


def reference_prompts(num: int, vocab: int = 30000) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(128, 1024, (num,), generator=g)
    return [torch.randint(10, vocab, (int(n),), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("overlap", [False, True])
def test_sim_is_deterministic_and_times_follow_the_law(overlap):
    profile = synthetic_profile("llama-8b")
    prompts = reference_prompts(64)
    params = [SamplingParams(max_new_tokens=16 + i % 40, ignore_eos=True) for i in range(64)]
    arrivals = [0.05 * i for i in range(64)]
    runs = []
    for _ in range(2):
        llm = sim_llm(profile, capacity_scheduler="max_utilization", overlap_scheduler=overlap)
        outputs = llm.generate(prompts, params, arrival_times=arrivals)
        runs.append(([o.metrics for o in outputs], llm.executor.iteration_stats))
    assert runs[0][0] == runs[1][0]
    assert [s.step_latency for s in runs[0][1]] == [s.step_latency for s in runs[1][1]]
    outputs_lengths = [len(o.token_ids) for o in outputs]
    assert outputs_lengths == [p.max_new_tokens for p in params]
    # Every step lasted what the law says for its batch, on the virtual clock.
    for stats in runs[0][1]:
        features = StepFeatures(
            num_context_seqs=stats.num_context_requests,
            num_context_tokens=stats.num_context_tokens,
            num_decode_seqs=stats.num_generation_requests,
        )
        assert stats.step_latency >= law(features) - 1e-12


def test_sim_and_real_engines_schedule_identically():
    """Same policies, same workload, the same time per step: the sim engine and the real model
    (CPU, float32) make the same decisions step for step, preemptions and prefix hits included.
    The real engine's clock ticks by a constant after each step; the sim's cost model predicts
    the same constant, so both clocks agree on every arrival."""
    step = 0.01

    class Constant(LinearCostModel):
        def predict(self, features: StepFeatures) -> float:
            return step

    g = torch.Generator().manual_seed(4)
    system = torch.randint(3, 259, (16,), generator=g).tolist()
    prompts = [
        system + torch.randint(3, 259, (int(n),), generator=g).tolist()
        for n in (9, 30, 4, 22, 15, 40)
    ]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (12, 5, 20, 9, 14, 7)]
    arrivals = [0.0, 0.0, 0.015, 0.03, 0.031, 0.08]
    config = dict(
        capacity_scheduler="max_utilization",
        microbatch_scheduler=dict(max_batch_size=4, max_num_tokens=24, chunking="equal_progress"),
        kv_cache_manager=dict(tokens_per_block=4, num_blocks=22, enable_block_reuse=True),
    )
    real = LLM(
        "llama-tiny", device="cpu", dtype="float32", clock=VirtualClock(step_time=step), **config
    )
    real_out = real.generate(prompts, params, arrival_times=arrivals)
    sim = LLM("llama-tiny", engine="sim", cost_model=Constant({}, {}), **config)
    sim_out = sim.generate(prompts, params, arrival_times=arrivals)

    def schedule(llm):
        return [
            (
                s.num_context_requests,
                s.num_context_tokens,
                s.num_generation_requests,
                s.num_paused_requests,
                s.kv_used_blocks,
            )
            for s in llm.executor.iteration_stats
        ]

    assert schedule(sim) == schedule(real)
    assert sum(o.metrics.num_preemptions for o in real_out) > 0
    assert sum(o.metrics.num_cached_tokens for o in real_out) > 0
    for r, s in zip(real_out, sim_out, strict=True):
        assert len(s.token_ids) == len(r.token_ids)
        assert s.metrics.num_preemptions == r.metrics.num_preemptions
        assert s.metrics.num_cached_tokens == r.metrics.num_cached_tokens
        # the real clock stamps tokens at the step's start, the sim's at its end
        assert math.isclose(s.metrics.first_token_time, r.metrics.first_token_time + step)
        assert math.isclose(s.metrics.finish_time, r.metrics.finish_time + step)


# ---- fast-forward: runs of identical decode steps advanced in one go must change nothing ----
from dataclasses import astuple, fields  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from engine.stats import IterationStats  # noqa: E402

HOST_TIME_FIELDS = {  # wall, not simulated
    "scheduling_time",
    "forward_time",
    "input_prep_time",
    "forward_enqueue_time",
    "host_time",
    "device_time",  # NaN, which equals nothing
}


def stats_rows(llm: LLM) -> list[tuple]:
    keep = [i for i, f in enumerate(fields(IterationStats)) if f.name not in HOST_TIME_FIELDS]
    return [tuple(astuple(s)[i] for i in keep) for s in llm.executor.iteration_stats]


def request_rows(outputs) -> list[tuple]:
    return [
        (
            len(o.token_ids),
            o.metrics.first_token_time,
            o.metrics.finish_time,
            o.metrics.num_preemptions,
            o.metrics.num_cached_tokens,
            o.finish_reason,
        )
        for o in outputs
    ]


@st.composite
def sim_cases(draw):
    num = draw(st.integers(1, 12))
    prompt_lens = draw(st.lists(st.integers(1, 60), min_size=num, max_size=num))
    out_lens = draw(st.lists(st.integers(1, 40), min_size=num, max_size=num))
    gaps = draw(st.lists(st.floats(0, 0.2), min_size=num, max_size=num))
    shared = draw(st.integers(0, 24))  # a shared system prefix, for block reuse
    config = dict(
        capacity_scheduler=draw(
            st.sampled_from(["guaranteed_no_evict", "max_utilization", "static_batch"])
        ),
        microbatch_scheduler=dict(
            max_batch_size=draw(st.integers(1, 8)),
            max_num_tokens=draw(st.sampled_from([64, 128, None])),
            chunking=draw(st.sampled_from([None, "first_come_first_served", "equal_progress"])),
        ),
        kv_cache_manager=dict(
            tokens_per_block=draw(st.sampled_from([1, 2, 4, 16])),
            max_tokens=draw(st.sampled_from([128, 256, 2048])),
            enable_block_reuse=draw(st.booleans()),
        ),
    )
    return prompt_lens, out_lens, gaps, shared, config


def case_workload(case) -> tuple[list[list[int]], list[SamplingParams], list[float], dict]:
    """A ``sim_cases`` draw as (prompts, params, arrival times, LLM config)."""
    prompt_lens, out_lens, gaps, shared, config = case
    if config["microbatch_scheduler"]["max_num_tokens"] is None:
        config["microbatch_scheduler"]["chunking"] = None
    prompts = [
        [7] * shared + [10 + (i * 31 + j) % 200 for j in range(n)]
        for i, n in enumerate(prompt_lens)
    ]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in out_lens]
    arrivals = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    return prompts, params, arrivals, config


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sim_cases())
def test_fast_forward_changes_nothing(case):
    prompts, params, arrivals, config = case_workload(case)
    profile = synthetic_profile("llama-tiny", free_bytes_for_kv=None)
    runs = []
    for fast in (False, True):
        llm = LLM("llama-tiny", engine="sim", cost_model=profile, sim_fast_forward=fast, **config)
        assert (llm.executor.decode_run is not None) == fast
        outputs = llm.generate(prompts, params, arrival_times=arrivals)
        llm.kv_cache_manager.check_integrity()
        assert llm.kv_cache_manager.num_free_blocks == llm.kv_cache_manager.num_blocks
        runs.append((request_rows(outputs), stats_rows(llm), [o.token_ids for o in outputs]))
    assert runs[1] == runs[0]


@pytest.mark.parametrize("loop", ["plain", "host pipeline"])
def test_fast_forward_skips_most_steps_of_a_light_load(loop):
    """The point of it: a light load is mostly repeated decode steps, which the plain loop's
    fast-forward advances, and the overlap loop's where the host pipeline runs that loop."""
    pool = dict(max_tokens=8192)
    if loop == "plain":
        profile = synthetic_profile("llama-tiny", free_bytes_for_kv=None)
        llm = LLM("llama-tiny", engine="sim", cost_model=profile, kv_cache_manager=pool)
    else:
        model = pipeline_model()
        pipeline = dict(overlap_scheduler=True, sim_host_pipeline=True, kv_cache_manager=pool)
        llm = LLM("llama-1b", engine="sim", cost_model=model, **pipeline)
    prompts = [p[:100] for p in reference_prompts(40, vocab=250)]
    params = SamplingParams(max_new_tokens=100, ignore_eos=True)
    calls = []
    run = llm.executor.decode_run

    def counting(executor, batch):
        calls.append(run(executor, batch))
        return calls[-1]

    llm.executor.decode_run = counting
    outputs = llm.generate(prompts, params, arrival_times=[0.5 * i for i in range(40)])
    assert all(len(o.token_ids) == 100 for o in outputs)
    assert sum(calls) > 0.8 * len(llm.executor.iteration_stats)


def test_linear_fit_keeps_every_coefficient_non_negative():
    """Noisy or collinear steps would pull a least-squares coefficient below zero (and a long
    batch would then be predicted to take no time): such terms are dropped instead."""
    decode = [
        StepFeatures(num_decode_seqs=b, decode_kv_tokens=b * c)
        for b in (1, 4, 16)
        for c in (10, 100)
    ]
    # time falls with KV tokens in this (made-up) data: the kv coefficient would be negative
    samples = [(f, 0.01 + 1e-4 * f.num_decode_seqs - 1e-7 * f.decode_kv_tokens) for f in decode]
    samples += [s for s in synthetic_profile("llama-8b").samples() if not s[0].is_decode_only]
    model = LinearCostModel.fit(samples)
    assert all(c >= 0 for c in model.decode.values())
    assert model.decode["decode_kv_tokens"] == 0.0
    big = StepFeatures(num_decode_seqs=256, decode_kv_tokens=256 * 100_000)
    assert model.predict(big) > 0


def one_prompt_mixed_steps(tokens, decodes, contexts) -> list[StepFeatures]:
    """Mixed steps of one fresh prompt of T tokens beside R decodes at KV length c, for each
    (T, R, c) in that order."""
    return [
        StepFeatures(
            num_context_seqs=1,
            num_context_tokens=t,
            context_attention=t * (t + 1) / 2,
            num_decode_seqs=r,
            decode_kv_tokens=r * c,
        )
        for t in tokens
        for r in decodes
        for c in contexts
    ]


def test_a_term_constant_in_every_sample_is_left_to_the_intercept():
    """Every mixed step below has one context sequence: its per-sequence cost cannot be told
    from the intercept, so it gets none (else a step with four would pay the base four times)."""
    mixed = one_prompt_mixed_steps((256, 1024, 4096), (16, 64, 255), (512, 1536))
    samples = [(f, 0.02 + 1e-6 * f.num_padded_tokens + 4e-8 * f.decode_kv_tokens) for f in mixed]
    samples += [s for s in synthetic_profile("llama-8b").samples() if s[0].is_decode_only]
    model = LinearCostModel.fit(samples)
    assert model.mixed["num_context_seqs"] == 0.0
    assert model.mixed["intercept"] == pytest.approx(0.02, rel=1e-6)
    four = dataclasses.replace(mixed[0], num_context_seqs=4)
    assert model.predict(four) == pytest.approx(model.predict(mixed[0]), rel=1e-9)


def test_budgets_beyond_the_profile_are_reported(caplog):
    profile = synthetic_profile("llama-1b")  # largest steps: 136 sequences; 8,192 tokens
    with caplog.at_level("WARNING", logger="engine.llm"):
        sim_llm(profile, microbatch_scheduler=dict(max_batch_size=64, max_num_tokens=8192))
    assert not caplog.records
    with caplog.at_level("WARNING", logger="engine.llm"):
        sim_llm(profile, microbatch_scheduler=dict(max_batch_size=256, max_num_tokens=8192))
    assert "max_batch_size=256 is beyond the profile's largest step (136)" in caplog.text


def test_a_host_floor_is_fitted_where_short_steps_cost_the_same():
    """Eager steps cost the host's launch time up to a knee, then grow with their tokens:
    ``max(floor, linear)`` fits both sides; a single line through them cannot."""
    prefill = [
        StepFeatures(num_context_seqs=s, num_context_tokens=t, context_attention=t * (t + 1) / 2)
        for t in (16, 64, 256, 1024, 2048, 4096, 8192)
        for s in (1, 4)
    ]
    mixed = one_prompt_mixed_steps((16, 256, 1024, 4096, 8192), (16, 64, 255), (1000,))
    decode = [
        StepFeatures(num_decode_seqs=b, decode_kv_tokens=b * c)
        for b in (1, 8, 64, 256)
        for c in (512, 2048)
    ]

    def measured(f: StepFeatures) -> float:
        if f.is_decode_only:
            return 0.006 + 2e-5 * f.num_decode_seqs + 1e-8 * f.decode_kv_tokens
        if f.num_decode_seqs == 0:
            return max(0.015, 0.002 + 2.5e-5 * f.num_padded_tokens)
        # a mixed step: every row at the prefill's rate plus its decodes' attention, above its
        # own floor
        return max(0.02, 0.004 + 2.5e-5 * f.num_padded_tokens + 1e-8 * f.decode_kv_tokens)

    model = LinearCostModel.fit([(f, measured(f)) for f in prefill + mixed + decode])
    assert model.prefill is not None  # enough prefill-only steps for their own fit
    assert math.isclose(model.floors["prefill"], 0.015, rel_tol=1e-6)
    assert math.isclose(model.floors["mixed"], 0.02, rel_tol=1e-6)
    assert math.isclose(model.mixed["intercept"], 0.004, rel_tol=1e-6)
    for f in prefill + mixed + decode:
        assert math.isclose(model.predict(f), measured(f), rel_tol=1e-6), f
    # One line (least squares on relative error, no floor) misses the short steps by far more.
    design = np.array([[1.0, f.num_padded_tokens] for f in prefill])
    seconds = np.array([measured(f) for f in prefill])
    line, *_ = np.linalg.lstsq(design / seconds[:, None], np.ones(len(prefill)), rcond=None)
    assert max(abs(design @ line - seconds) / seconds) > 0.15  # vs < 1e-6 above


def test_each_decode_graph_bucket_gets_the_offset_its_steps_show():
    """Decode steps that follow one line but for a step up at the 48-row CUDA graph (as
    llama-1b's on the H200) and down at 64: the fit gives each bucket its offset, and
    predicts every step; the line alone misses the 48-row steps by over 10%. A bucket with
    fewer than ``MIN_BUCKET_STEPS`` steps gets none of its own."""
    from engine.sim.cost_model import MIN_BUCKET_STEPS

    rng = np.random.default_rng(1)
    step = {16: 0.0, 32: 0.0, 48: 5e-4, 64: -2e-4}  # seconds beside the line
    decode = []
    for _ in range(400):
        seqs = int(rng.integers(9, 65))
        padded = next(b for b in step if b >= seqs)
        kv = int(rng.integers(200, 2000))
        decode.append(
            StepFeatures(
                num_decode_seqs=seqs,
                decode_kv_tokens=seqs * kv,
                max_decode_kv=2 * kv,
                num_padded_tokens=padded,
            )
        )
    rare = [StepFeatures(num_decode_seqs=100, decode_kv_tokens=100 * 500, num_padded_tokens=112)]
    mixed = one_prompt_mixed_steps((16, 256, 1024, 4096), (16, 64), (1000,))

    def measured(f: StepFeatures) -> float:  # 112 rows: as the 64-row graph
        return law(f) + step.get(f.num_padded_tokens, step[64])

    model = LinearCostModel.fit([(f, measured(f)) for f in decode + rare * 5 + mixed])
    offsets = model.decode_offsets
    assert set(offsets) <= set(step) and MIN_BUCKET_STEPS > 5  # 112: too few steps
    assert offsets[48] - offsets[32] == pytest.approx(5e-4, rel=0.02)
    assert offsets[64] - offsets[32] == pytest.approx(-2e-4, rel=0.05)
    for f in decode:
        assert model.predict(f) == pytest.approx(measured(f), rel=0.01), f
    line = dataclasses.replace(model, decode_offsets={})
    assert max(abs(line.predict(f) / measured(f) - 1) for f in decode) > 0.1
    assert model.predict(rare[0]) == pytest.approx(measured(rare[0]), rel=0.01)


def test_a_decode_bucket_without_an_offset_takes_the_nearest_ones_below():
    model = LinearCostModel(DECODE, MIXED, decode_offsets={16: 1e-4, 48: 3e-4})

    def added(padded: int) -> float:
        f = StepFeatures(num_decode_seqs=8, decode_kv_tokens=8000, num_padded_tokens=padded)
        return model.predict(f) - law(f)

    expected = {8: 1e-4, 16: 1e-4, 32: 1e-4, 48: 3e-4, 256: 3e-4}  # 8: below them all
    assert {p: added(p) for p in expected} == pytest.approx(expected)


def test_real_and_simulated_engines_record_the_same_work_for_the_same_schedule():
    """All requests at t=0 and lengths fixed by ``max_new_tokens``: the real engine (CPU) and the
    simulated one schedule the same steps, and each iteration row carries the same work
    (counted from the engine's inputs on one side, from the cost model's features on the
    other), equal to a count over the requests (``SchedulerOutput``'s properties)."""
    config = dict(
        microbatch_scheduler=dict(max_batch_size=4, max_num_tokens=24),
        kv_cache_manager=dict(tokens_per_block=4, num_blocks=64),
    )
    prompts = [[5 + i] * n for i, n in enumerate((30, 7, 12, 3, 9))]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (4, 9, 2, 6, 5)]
    profile = synthetic_profile("llama-tiny", free_bytes_for_kv=None)
    rows = {}
    for engine in ("torch", "sim"):
        extra = dict(engine="sim", cost_model=profile, sim_fast_forward=False)
        llm = LLM("llama-tiny", **config, **(extra if engine == "sim" else dict(device="cpu")))
        seen: list[tuple[float, int, int, int]] = []
        step_work = llm.model_engine.step_work

        def recording(batch, step_work=step_work, seen=seen):
            # the slow count, over the requests (neither pads: eager, and a profile without)
            seen.append(
                (
                    batch.context_attention,
                    batch.decode_kv_tokens,
                    batch.max_decode_kv,
                    batch.num_tokens,
                )
            )
            return step_work(batch)

        llm.model_engine.step_work = recording
        llm.generate(prompts, params)
        stats = llm.executor.iteration_stats
        rows[engine] = [
            (s.context_attention, s.decode_kv_tokens, s.max_decode_kv, s.num_padded_tokens)
            for s in stats
        ]
        assert rows[engine] == seen
    assert rows["torch"] == rows["sim"]
    assert any(a > 0 for a, *_ in rows["sim"]) and any(kv > 0 for _, kv, *_ in rows["sim"])
    assert any(0 < longest < kv for _, kv, longest, _ in rows["sim"])  # several decodes


@pytest.mark.parametrize("overlap", [False, True])
def test_the_simulator_pads_steps_as_the_profiled_engine_did(overlap):
    """A profile made with graphs: each simulated step runs in the bucket the real engine would
    pick with this LLM's settings (decode sizes 1, 2, 4; token sizes 16, 24) and costs the
    padded rows; a profile made eagerly pads nothing."""
    config = dict(
        microbatch_scheduler=dict(max_batch_size=4, max_num_tokens=24),
        kv_cache_manager=dict(tokens_per_block=4, num_blocks=64),
        overlap_scheduler=overlap,
        sim_fast_forward=False,
    )
    prompts = [[5 + i] * n for i, n in enumerate((30, 7, 12, 3, 9))]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (4, 9, 2, 6, 5)]
    eager = synthetic_profile("llama-tiny", free_bytes_for_kv=None)
    graphs = dataclasses.replace(
        eager, engine={"max_batch_size": 4, "max_num_tokens": 24, "cuda_graphs": True,
                       "piecewise_cuda_graphs": True},
    )  # fmt: skip
    padding = StepPadding((1, 2, 4), (16, 24))
    for profile, expected in ((graphs, padding), (eager, StepPadding())):
        llm = LLM("llama-tiny", engine="sim", cost_model=profile, **config)
        assert llm.model_engine.padding == expected
        llm.generate(prompts, params)
        stats = [s for s in llm.executor.iteration_stats if s.num_scheduled_tokens]
        for s in stats:
            n = s.num_scheduled_tokens
            assert s.num_padded_tokens == expected.padded(n, s.num_context_tokens == 0)
        is_padded = [s.num_padded_tokens > s.num_scheduled_tokens for s in stats]
        assert any(is_padded) == (profile is graphs)
        if not overlap:  # a step's latency is its predicted time, at the padded rows
            model = profile.cost_model()
            for s in stats:
                features = StepFeatures(
                    num_context_seqs=s.num_context_requests,
                    num_context_tokens=s.num_context_tokens,
                    context_attention=s.context_attention,
                    num_decode_seqs=s.num_generation_requests,
                    decode_kv_tokens=s.decode_kv_tokens,
                    max_decode_kv=s.max_decode_kv,
                    num_padded_tokens=s.num_padded_tokens,
                )
                assert s.step_latency == pytest.approx(model.predict(features), rel=1e-9)


def queue_rows(outputs) -> list[tuple]:
    return [(o.metrics.first_scheduled_time, o.metrics.num_cached_tokens) for o in outputs]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sim_cases())
def test_simulated_overlap_is_the_overlap_loop_with_or_without_fast_forward(case):
    """Overlap scheduling simulated three ways gives every request the same times: the overlap
    loop itself on the virtual device (``sim_fast_forward=False``), and the plain loop with
    lagged admission, stepped and fast-forwarded."""
    prompts, params, arrivals, config = case_workload(case)
    profile = synthetic_profile("llama-tiny", free_bytes_for_kv=None)
    runs = []
    for mode in ("overlap loop", "lagged", "lagged, fast-forwarded"):
        llm = LLM(
            "llama-tiny",
            engine="sim",
            cost_model=profile,
            overlap_scheduler=True,
            sim_fast_forward=mode != "overlap loop",
            **config,
        )
        executor = llm.executor
        assert executor.overlap == (mode == "overlap loop")
        assert executor.lagged_admission == (mode != "overlap loop")
        if mode == "lagged":
            executor.decode_run = None
        outputs = llm.generate(prompts, params, arrival_times=arrivals)
        llm.kv_cache_manager.check_integrity()
        assert llm.kv_cache_manager.num_free_blocks == llm.kv_cache_manager.num_blocks
        runs.append((request_rows(outputs), queue_rows(outputs)))
    assert runs[1] == runs[0]
    assert runs[2] == runs[0]


def test_simulated_overlap_schedules_a_new_arrival_one_step_later():
    """A request arriving while another decodes: the plain loop runs its prefill in the next
    step; overlap scheduling has already queued that step, so the prefill runs in the one after.
    The virtual device runs the steps back to back either way."""
    profile = synthetic_profile("llama-tiny", free_bytes_for_kv=None)
    prompts = [[11] * 20, [12] * 30]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    arrivals = [0.0, 1e-4]  # while the first request's prefill runs
    for overlap, prefill_row in ((False, 1), (True, 2)):
        for fast in (False, True):
            llm = LLM(
                "llama-tiny",
                engine="sim",
                cost_model=profile,
                overlap_scheduler=overlap,
                sim_fast_forward=fast,
                kv_cache_manager=dict(max_tokens=2048),
            )
            outputs = llm.generate(prompts, params, arrival_times=arrivals)
            rows = llm.executor.iteration_stats.columns()
            assert rows["num_context_tokens"][prefill_row] == 30
            assert sum(rows["num_context_tokens"][:prefill_row]) == 20
            ends = np.cumsum(rows["step_latency"])  # back to back from t=0
            assert outputs[1].metrics.first_token_time == pytest.approx(ends[prefill_row])


@pytest.mark.parametrize("calibrated_with_overlap", [True, False])
def test_a_profile_of_the_other_mode_is_warned_about(caplog, calibrated_with_overlap):
    profile = dataclasses.replace(
        synthetic_profile("llama-tiny"),
        calibration=[{"run": "somewhere", "overlap_scheduler": calibrated_with_overlap}],
    )
    assert profile.overlap_scheduler is calibrated_with_overlap
    for overlap in (True, False):
        caplog.clear()
        LLM("llama-tiny", engine="sim", cost_model=profile, overlap_scheduler=overlap)
        warned = "calibrated on runs" in caplog.text
        assert warned == (overlap != calibrated_with_overlap)


def test_the_harness_pads_simulated_steps_with_its_graph_settings(tmp_path: Path):
    """``executor.piecewise_token_sizes`` / ``cuda_graph_batch_sizes`` reach the simulated
    engine: its steps are padded to those buckets (the profile's engine ran graphs)."""
    from tests.test_harness import harness, only_dir

    profile = dataclasses.replace(
        synthetic_profile("llama-1b"),
        engine={"max_batch_size": 256, "max_num_tokens": 8192, "cuda_graphs": True,
                "piecewise_cuda_graphs": True},
    )  # fmt: skip
    profile.save(tmp_path / "p.json")
    harness(
        tmp_path / "runs",
        "executor.engine=sim",
        f"executor.profile={tmp_path / 'p.json'}",
        "model=llama-1b",
        "workload.num_requests=40",
        "executor.piecewise_token_sizes=[3000,8192]",
        "executor.cuda_graph_batch_sizes=[100,256]",
        "progress=false",
        "plots=false",
    )
    steps = pd.read_parquet(only_dir(tmp_path / "runs" / "default") / "iterations.parquet")
    steps = steps[steps.num_context_tokens + steps.num_generation_requests > 0]
    decode_only = steps.num_context_tokens == 0
    assert set(steps[~decode_only].num_padded_tokens) <= {3000, 8192}
    assert set(steps[decode_only].num_padded_tokens) <= {100, 256}
    assert (~decode_only).any() and decode_only.any()


# A host-time law beside ``law`` (the device's): the host pays per sequence and per prompt row.
HOST_DECODE = {"intercept": 3e-3, "num_decode_seqs": 2e-5}
HOST_MIXED = {"intercept": 6e-3, "num_padded_tokens": 1e-6, "num_decode_seqs": 2e-5}


def host_law(features: StepFeatures) -> float:
    return LinearCostModel(HOST_DECODE, HOST_MIXED).predict(features)


# Of the host's time, the forward's launches (host_seconds): the part beside the device's work.
LAUNCH_DECODE = {"intercept": 2e-3, "num_decode_seqs": 1e-5}
LAUNCH_MIXED = {"intercept": 4e-3, "num_padded_tokens": 5e-7, "num_decode_seqs": 1e-5}


def launch_law(features: StepFeatures) -> float:
    return LinearCostModel(LAUNCH_DECODE, LAUNCH_MIXED).predict(features)


def split_profile(model: str = "llama-1b", host_scale: float = 1.0) -> Profile:
    """``synthetic_profile`` plus overlap serving steps whose host time is ``host_scale`` times
    ``host_law`` (of which ``launch_law``, scaled alike, is launches) and whose device time is
    ``law``."""
    rows = []
    steps = random_steps(np.random.default_rng(0), 80, max_seqs=128, max_kv=2000, min_tokens=64)
    for f in steps:
        host, device, launch = host_scale * host_law(f), law(f), host_scale * launch_law(f)
        rows.append({**f.as_dict(), "seconds": max(host, device), "host_time": host,
                     "device_time": device, "host_seconds": launch})  # fmt: skip
    source = {"run": f"host x{host_scale}", "overlap_scheduler": True}
    return synthetic_profile(model).with_serving_steps(rows, source)


def test_a_host_device_model_predicts_the_longer_of_its_scaled_host_and_device_times():
    from engine.sim import HostDeviceCostModel

    model = split_profile().cost_model()
    assert isinstance(model, HostDeviceCostModel) and model.host_time_scale == 1.0
    small = StepFeatures(num_decode_seqs=4, decode_kv_tokens=4 * 300)  # host-bound
    big = StepFeatures(
        num_context_seqs=1, num_context_tokens=4000, context_attention=8e6, num_decode_seqs=100,
        decode_kv_tokens=100 * 1000, num_padded_tokens=4096,
    )  # fmt: skip
    for f in (small, big):
        assert model.host.predict(f) == pytest.approx(host_law(f), rel=1e-6)
        assert model.device.predict(f) == pytest.approx(law(f), rel=1e-6)
    assert host_law(small) > law(small) and law(big) > host_law(big)
    assert model.predict(small) == pytest.approx(host_law(small), rel=1e-6)
    assert model.predict(big) == pytest.approx(law(big), rel=1e-6)
    # A host twice as slow: the host-bound step doubles, the device-bound one holds while the
    # device stays the longer.
    slower = split_profile().cost_model(host_time_scale=2.0)
    assert slower.predict(small) == pytest.approx(2 * host_law(small), rel=1e-6)
    assert slower.predict(big) == pytest.approx(max(law(big), 2 * host_law(big)), rel=1e-6)
    with pytest.raises(ValueError, match="host_time_scale must be > 0"):
        dataclasses.replace(model, host_time_scale=0.0)


def test_only_overlap_steps_that_all_record_both_times_split_the_model():
    split = split_profile()
    assert split.has_host_device_split
    # A plain run's serving steps (no overlap): their times are whole steps, no split.
    plain = dataclasses.replace(split, calibration=[{"run": "a", "overlap_scheduler": False}])
    assert not plain.has_host_device_split
    assert isinstance(plain.cost_model(), LinearCostModel)
    with pytest.raises(ValueError, match="needs a profile whose serving steps record host_time"):
        plain.cost_model(host_time_scale=2.0)
    # One fitted step without its device time (a CPU run): no split either.
    steps = [dict(row) for row in split.steps]
    del steps[-1]["device_time"]
    assert not dataclasses.replace(split, steps=steps).has_host_device_split


def test_an_overlap_profile_predicts_its_serving_steps_totals_and_a_plain_one_as_fitted():
    """The split's host and device fits (overlap serving steps) are matched to their steps'
    totals, kind by kind; a plain loop's profile keeps its relative fit as it was."""
    rng = np.random.default_rng(1)
    profile = split_profile()
    steps = [
        {**row, "host_time": row["host_time"] * float(rng.lognormal(0.0, 0.3)),
         "device_time": row["device_time"] * float(rng.lognormal(0.0, 0.3))}
        if row.get("kind") == "serving" else row
        for row in profile.steps
    ]  # fmt: skip
    noisy = dataclasses.replace(profile, steps=steps)
    model = noisy.cost_model()
    serving = [row for row in steps if row.get("kind") == "serving"]
    for kind in ("decode", "mixed"):
        rows = [row for row in serving if (row["num_context_tokens"] == 0) == (kind == "decode")]
        features = [StepFeatures(**{k: row[k] for k in StepFeatures.__dataclass_fields__})
                    for row in rows]  # fmt: skip
        for part in ("host", "device"):
            predicted = sum(getattr(model, part).predict(f) for f in features)
            assert predicted == pytest.approx(sum(row[f"{part}_time"] for row in rows), rel=1e-9)
    plain = dataclasses.replace(noisy, calibration=[{"run": "a", "overlap_scheduler": False}])
    assert plain.cost_model() == LinearCostModel.fit(plain.fit_samples(), compose_mixed=False)


def test_the_sim_llm_runs_a_slower_host_and_refuses_it_where_the_model_cannot(tmp_path: Path):
    """``sim_host_time_scale`` reaches the cost model: the same requests finish later on a
    host twice as slow (this profile's small steps are host-bound)."""
    profile = split_profile()

    def finish_times(**kwargs) -> list[float]:
        llm = sim_llm(profile, overlap_scheduler=True, **kwargs)
        prompts = [[1] * 40 for _ in range(4)]
        outputs = llm.generate(prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
        return [o.metrics.e2e_latency for o in outputs]

    base, slower = finish_times(), finish_times(sim_host_time_scale=2.0)
    assert all(s > 1.5 * b for b, s in zip(base, slower, strict=True))
    with pytest.raises(ValueError, match="needs a profile whose serving steps record"):
        sim_llm(synthetic_profile("llama-1b"), sim_host_time_scale=2.0)
    with pytest.raises(ValueError, match="needs a HostDeviceCostModel"):
        LLM("llama-1b", engine="sim", cost_model=LinearCostModel(DECODE, MIXED),
            sim_host_time_scale=2.0)  # fmt: skip
    with pytest.raises(ValueError, match="applies to engine='sim' only"):
        LLM("llama-tiny", device="cpu", sim_host_time_scale=2.0)


def test_the_harness_simulates_the_host_its_config_names(tmp_path: Path):
    """``executor.sim_host_time_scale`` reaches the simulated engine: a host three times as
    slow stretches the run's host-bound steps (every step of this light load)."""
    durations = {}
    for scale in (1.0, 3.0):
        run = simulate_split_profile(tmp_path, f"executor.sim_host_time_scale={scale}")
        durations[scale] = pd.read_parquet(run / "iterations.parquet").step_latency.median()
    assert durations[3.0] == pytest.approx(3 * durations[1.0], rel=0.2)


def simulate_split_profile(tmp_path: Path, override: str) -> Path:
    """The harness's run directory for 10 requests at 1/s, simulated with ``split_profile``
    and ``override``."""
    from tests.test_harness import harness, only_dir

    profile = tmp_path / "p.json"
    if not profile.exists():
        split_profile().save(profile)
    out = tmp_path / override.replace("=", "-")
    harness(
        out,
        "executor.engine=sim",
        f"executor.profile={profile}",
        override,
        "model=llama-1b",
        "workload.num_requests=10",
        "workload.rate=1",
        "progress=false",
        "plots=false",
    )
    return only_dir(out / "default")


def test_a_launch_fit_gives_each_steps_host_launch_and_device_times():
    model = split_profile().cost_model(with_launch=True)
    f = StepFeatures(
        num_context_seqs=2, num_context_tokens=1000, context_attention=6e5, num_decode_seqs=30,
        decode_kv_tokens=30 * 800, num_padded_tokens=1030,
    )  # fmt: skip
    phases = model.phases(f)
    assert phases.host == pytest.approx(host_law(f), rel=1e-6)
    assert phases.launch == pytest.approx(launch_law(f), rel=1e-6)
    assert phases.device == pytest.approx(law(f), rel=1e-6)
    assert phases.before_launch == pytest.approx(host_law(f) - launch_law(f), rel=1e-6)
    slower = split_profile().cost_model(host_time_scale=2.0, with_launch=True).phases(f)
    assert (slower.host, slower.launch) == pytest.approx((2 * phases.host, 2 * phases.launch))
    assert slower.device == pytest.approx(phases.device)
    # Without it (the default: the fit costs time), phases cannot be told.
    with pytest.raises(ValueError, match="phases need a launch model"):
        split_profile().cost_model().phases(f)
    plain = dataclasses.replace(split_profile(), calibration=[{"overlap_scheduler": False}])
    with pytest.raises(ValueError, match="a launch fit needs a profile whose serving steps"):
        plain.cost_model(with_launch=True)
    steps = [dict(row) for row in split_profile().steps]
    del steps[-1]["host_seconds"]
    with pytest.raises(ValueError, match="without host_seconds"):
        dataclasses.replace(split_profile(), steps=steps).cost_model(with_launch=True)


def constant_phases(host_ms: float, launch_ms: float, device_ms: float):
    """A ``HostDeviceCostModel`` whose every step has the same host, launch and device times."""
    from engine.sim import HostDeviceCostModel

    def constant(ms: float) -> LinearCostModel:
        return LinearCostModel({"intercept": ms / 1e3}, {"intercept": ms / 1e3})

    return HostDeviceCostModel(
        host=constant(host_ms), device=constant(device_ms), launch=constant(launch_ms)
    )


@pytest.mark.parametrize(
    "host, launch, device, max_ttft, pipeline_ttft, pipeline_e2e",
    [
        # Device-bound: the host's work before its launches (1 ms) comes before the device's
        # 5 ms, in series; then the device runs step after step.
        (3, 2, 5, 5, 1 + 5, 1 + 10 * 5),
        # Host-bound: the first token is read once the host has launched the second step (2 x
        # 5 ms); the last once it has launched the tenth.
        (5, 4, 3, 5, 2 * 5, 10 * 5),
    ],
)
def test_the_host_pipeline_reads_a_token_after_the_hosts_work_and_the_devices(
    host, launch, device, max_ttft, pipeline_ttft, pipeline_e2e
):
    """One request of 10 tokens on an idle engine, every step costing the same: the pipeline's
    times follow the two stages (engine.sim.engine), where the default charges each step the
    longer of the host's and the device's times (TTFT = max(host, device), then one token per
    max)."""
    times = {}
    for pipeline in (False, True):
        llm = LLM(
            "llama-1b",
            engine="sim",
            cost_model=constant_phases(host, launch, device),
            overlap_scheduler=True,
            sim_host_pipeline=pipeline,
            kv_cache_manager=dict(tokens_per_block=16, num_blocks=64),
        )
        (out,) = llm.generate([[1] * 20], SamplingParams(max_new_tokens=10, ignore_eos=True))
        times[pipeline] = (1e3 * out.metrics.ttft, 1e3 * out.metrics.e2e_latency)
    step_ms = max(host, device)
    assert times[False] == pytest.approx((max_ttft, max_ttft + 9 * step_ms))
    assert times[True] == pytest.approx((pipeline_ttft, pipeline_e2e))


def test_the_host_pipeline_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="with overlap_scheduler=True"):
        LLM("llama-1b", engine="sim", cost_model=constant_phases(3, 2, 5),
            sim_host_pipeline=True)  # fmt: skip
    with pytest.raises(ValueError, match="with overlap_scheduler=True"):
        LLM("llama-tiny", device="cpu", overlap_scheduler=True, sim_host_pipeline=True)
    with pytest.raises(ValueError, match="needs a HostDeviceCostModel with a launch model"):
        LLM("llama-1b", engine="sim", cost_model=LinearCostModel(DECODE, MIXED),
            overlap_scheduler=True, sim_host_pipeline=True,
            kv_cache_manager=dict(num_blocks=64))  # fmt: skip
    with pytest.raises(ValueError, match="a launch fit needs a profile"):
        sim_llm(synthetic_profile("llama-1b"), overlap_scheduler=True, sim_host_pipeline=True)


def test_the_harness_runs_the_host_pipeline_its_config_names(tmp_path: Path):
    """``executor.sim_host_pipeline`` reaches the simulated engine: this profile's steps are
    host-bound, so a first token also waits for the host to launch the next step (a decode:
    3 ms of host time, HOST_DECODE) before it is read. The load is light: no queue."""
    ttft = {}
    for pipeline in ("false", "true"):
        run = simulate_split_profile(tmp_path, f"executor.sim_host_pipeline={pipeline}")
        ttft[pipeline] = pd.read_parquet(run / "requests.parquet").ttft_ms.median()
    assert ttft["true"] - ttft["false"] == pytest.approx(3.0, rel=0.05)


@functools.cache
def pipeline_model():
    """``split_profile``'s cost model with its launch fit (made once: the fit costs time)."""
    return split_profile().cost_model(with_launch=True)


def finished_token_times(llm: LLM) -> list[tuple]:
    """Every request's token ids and the time of each token, by request id."""
    return sorted(
        (r.request_id, tuple(r.output_token_ids), tuple(r.token_times))
        for r in llm.executor.finished_requests
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sim_cases(), variant=st.sampled_from(["pipeline", "power cap", "host timeline", "max"]))
def test_the_overlap_loops_fast_forward_changes_nothing(case, variant):
    """``fast_forward_overlap`` gives what stepping the overlap loop gives: every token's time,
    every iteration row (host-time columns aside), the KV blocks. With the host pipeline (its
    power cap and host timeline too), and without it (``max``: the step costs the longer of
    the host's and the device's times; there the simulator runs the lagged plain loop, so the
    overlap loop's fast-forward is set by hand)."""
    from engine.sim import HostTimeline, PowerCap
    from engine.sim.fast_forward import is_steady
    from engine.sim.fast_forward_overlap import fast_forward_overlap

    prompts, params, arrivals, config = case_workload(case)
    extra = {
        "pipeline": dict(sim_host_pipeline=True),
        "power cap": dict(
            sim_host_pipeline=True,
            sim_power=PowerCap(tau_s=0.05, threshold=100.0, base=1.0, slope=2e-3),
        ),
        "host timeline": dict(
            sim_host_pipeline=True,
            sim_host_timeline=HostTimeline((0.0, 0.05, 0.2), (1.0, 2.5, 0.7)),
        ),
        "max": dict(),
    }[variant]
    runs = []
    for fast in (False, True):
        llm = LLM(
            "llama-1b",
            engine="sim",
            cost_model=pipeline_model(),
            overlap_scheduler=True,
            sim_fast_forward=fast and variant != "max",
            **extra,
            **config,
        )
        executor = llm.executor
        assert executor.overlap
        if fast and variant == "max" and is_steady(executor):
            executor.decode_run = fast_forward_overlap
        assert (executor.decode_run is fast_forward_overlap) == (fast and is_steady(executor))
        outputs = llm.generate(prompts, params, arrival_times=arrivals)
        llm.kv_cache_manager.check_integrity()
        assert llm.kv_cache_manager.num_free_blocks == llm.kv_cache_manager.num_blocks
        runs.append((request_rows(outputs), stats_rows(llm), finished_token_times(llm)))
    assert runs[1] == runs[0]


def test_decode_span_is_the_longest_range_one_program_walks():
    """``DecodeSplits.span``: a decode-only step's graph runs padded rows x KV heads programs
    (the H200: 132 SMs, so 16 rows and 8 KV heads run 2 splits, 48 rows one); a mixed step's
    decodes, and those of an engine without decode graphs, run as many as they are."""
    from engine.sim.decode_splits import DecodeSplits

    splits = DecodeSplits(num_sms=132, num_kv_heads=8, max_positions=131072)
    decode = StepFeatures(num_decode_seqs=10, decode_kv_tokens=5000, max_decode_kv=1000)
    assert splits.span(dataclasses.replace(decode, num_padded_tokens=16)) == 500
    assert splits.span(dataclasses.replace(decode, num_padded_tokens=48)) == 1000
    assert splits.span(dataclasses.replace(decode, num_padded_tokens=1)) == 1000 / 16
    # 2 decodes beside a prompt: 16 programs, a table as wide as the longest (4 tiles each)
    mixed = StepFeatures(
        num_context_seqs=1, num_context_tokens=100, num_decode_seqs=2, decode_kv_tokens=1500,
        max_decode_kv=1000,
    )  # fmt: skip
    assert splits.span(mixed) == 250
    eager = dataclasses.replace(splits, graphs=False)
    assert eager.span(dataclasses.replace(decode, num_padded_tokens=16)) == 1000 / 4
    assert splits.span(StepFeatures(num_context_seqs=1, num_context_tokens=100)) == 0.0


def test_a_decode_fit_with_the_split_rule_recovers_a_kernel_that_splits():
    """Decode steps whose attention tail is the longest sequence over its splits (the Triton
    kernel's): a fit that reads ``decode_span`` through the rule recovers them; one that reads
    the longest sequence whole cannot (one slope for graphs of 16 splits and of one)."""
    from engine.sim.decode_splits import DecodeSplits

    splits = DecodeSplits(num_sms=132, num_kv_heads=8, max_positions=131072)
    truth = LinearCostModel(
        {**DECODE, "decode_span": 4e-7}, MIXED, decode_splits=splits
    )  # the law, its decodes' tail split as the kernel splits it
    rng = np.random.default_rng(1)
    samples = []
    for f in random_steps(rng, 400, max_seqs=64, max_kv=4000, min_tokens=64):
        longest = int(f.decode_kv_tokens / f.num_decode_seqs * rng.uniform(1.0, 3.0))
        padded = next(b for b in (1, 2, 4, 8, 16, 32, 48, 64) if b >= f.num_decode_seqs)
        if f.is_decode_only:
            f = dataclasses.replace(f, num_padded_tokens=padded)
        f = dataclasses.replace(f, max_decode_kv=longest)
        samples.append((f, truth.predict(f)))
    fitted = LinearCostModel.fit(samples, decode_splits=splits)
    whole = LinearCostModel.fit(samples)
    assert fitted.decode["decode_span"] == pytest.approx(4e-7, rel=1e-3)

    def worst(model: LinearCostModel) -> float:
        return max(abs(model.predict(f) / s - 1) for f, s in samples)

    assert worst(fitted) < 1e-3
    assert worst(whole) > 0.03


def test_a_profile_of_a_known_gpu_fits_its_decodes_with_the_split_rule():
    from engine.sim.decode_splits import DecodeSplits

    profile = Profile.load(default_profile_path("llama-1b", "h200", overlap=True))
    rule = DecodeSplits.of_profile(profile)
    assert rule == DecodeSplits(num_sms=132, num_kv_heads=8, max_positions=131072)
    assert profile.cost_model().device.decode_splits == rule
    # A GPU of unknown SMs: the longest sequence whole, as one split
    unknown = dataclasses.replace(profile, device="a GPU of unknown SMs")
    assert DecodeSplits.of_profile(unknown) is None
    recorded = dataclasses.replace(unknown, engine={**unknown.engine, "num_sms": 114})
    assert DecodeSplits.of_profile(recorded).num_sms == 114


def test_each_fast_forward_refuses_the_other_loop():
    from engine.sim.fast_forward import fast_forward_decodes
    from engine.sim.fast_forward_overlap import fast_forward_overlap

    profile = synthetic_profile("llama-tiny", free_bytes_for_kv=None)
    sim = dict(engine="sim", cost_model=profile, kv_cache_manager=dict(max_tokens=2048))
    plain = LLM("llama-tiny", **sim).executor
    overlap = LLM("llama-tiny", overlap_scheduler=True, sim_fast_forward=False, **sim).executor
    with pytest.raises(ValueError, match="runs the plain loop"):
        fast_forward_decodes(overlap, SchedulerOutput())
    with pytest.raises(ValueError, match="runs the overlap loop"):
        fast_forward_overlap(plain, SchedulerOutput())
