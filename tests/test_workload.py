"""Workloads: arrival processes, length distributions, generated workloads, transforms, and the
trace readers (on the real traces in ../shared/traces and on small files written here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.workload import (
    Empirical,
    RequestDraft,
    WorkloadError,
    arrival_times,
    build_workload,
    constant,
    gamma,
    length_dist,
    parse_timestamp,
    poisson,
    read_azure,
    read_burstgpt,
    read_mooncake,
    read_sharegpt,
)
from harness.workload.transforms import clip_lengths

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
AZURE = TRACES / "azure_llm_2023_conv.csv"
MOONCAKE = TRACES / "mooncake_synthetic.jsonl"
needs_traces = pytest.mark.skipif(
    not (AZURE.exists() and MOONCAKE.exists()),
    reason=f"real traces not found in {TRACES} (the shared/ folder beside the checkout)",
)

VOCAB = 1000
BIG = 1 << 20  # a max_seq_len that clips nothing


def build(cfg: dict, *, max_seq_len: int = BIG, tokenizer=None):
    return build_workload(cfg, vocab_size=VOCAB, max_seq_len=max_seq_len, tokenizer=tokenizer)


class WordTokenizer:
    """One token per whitespace-separated word (ids from the word's characters)."""

    def encode(self, text: str) -> list[int]:
        return [20 + sum(map(ord, w)) % 900 for w in text.split()]


# --------------------------------------------------------------------------------------------
# arrivals


def _cv(times: np.ndarray) -> float:
    gaps = np.diff(times)
    return float(gaps.std() / gaps.mean())


@pytest.mark.parametrize("process", ["constant", "poisson", "gamma"])
def test_arrival_rate_matches(process):
    n, rate = 20_000, 8.0
    times = arrival_times(
        n,
        {"process": process, "rate": rate, "burstiness": 0.5}
        if process == "gamma"
        else {"process": process, "rate": rate},
        np.random.default_rng(3),
    )
    assert len(times) == n and times[0] == 0.0
    assert np.all(np.diff(times) >= 0)
    observed = (n - 1) / times[-1]
    assert observed == pytest.approx(rate, rel=0.03)


def test_arrivals_deterministic_by_seed():
    a = poisson(100, 5.0, np.random.default_rng(7))
    b = poisson(100, 5.0, np.random.default_rng(7))
    c = poisson(100, 5.0, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_burstiness_below_one_is_burstier():
    rng = np.random.default_rng(0)
    cv_poisson = _cv(poisson(20_000, 10.0, rng))
    cv_bursty = _cv(gamma(20_000, 10.0, 0.25, rng))
    assert cv_poisson == pytest.approx(1.0, rel=0.05)
    assert cv_bursty == pytest.approx(2.0, rel=0.08)  # CV = 1 / sqrt(burstiness)
    assert np.allclose(np.diff(gamma(50, 4.0, float("inf"), rng)), 0.25)


def test_all_at_once_and_bad_arrival_config():
    assert not arrival_times(10, None, np.random.default_rng(0)).any()
    assert not arrival_times(10, {"process": "poisson"}, np.random.default_rng(0)).any()
    assert np.allclose(constant(4, 2.0), [0, 0.5, 1.0, 1.5])
    with pytest.raises(WorkloadError, match=r"unknown arrival key 'rat'.*process, rate"):
        arrival_times(3, {"rat": 1}, np.random.default_rng(0))
    with pytest.raises(WorkloadError, match="unknown arrival process 'bursty'"):
        arrival_times(3, {"process": "bursty", "rate": 1}, np.random.default_rng(0))
    with pytest.raises(WorkloadError, match="rate must be > 0"):
        poisson(3, 0.0, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------
# lengths


def test_length_distributions():
    rng = np.random.default_rng(1)
    assert set(length_dist(7).sample(5, rng).tolist()) == {7}
    u = length_dist({"dist": "uniform", "low": 3, "high": 5}).sample(2000, rng)
    assert set(u.tolist()) == {3, 4, 5}
    ln = length_dist(
        {"dist": "lognormal", "median": 200, "sigma": 1.0, "min": 10, "max": 1000}
    ).sample(20_000, rng)
    assert ln.min() >= 10 and ln.max() <= 1000 and ln.dtype == np.int64
    assert np.median(ln) == pytest.approx(200, rel=0.05)
    emp = Empirical((5, 9, 11)).sample(3000, rng)
    assert set(emp.tolist()) == {5, 9, 11}
    with pytest.raises(
        WorkloadError, match="unknown key 'hi' for dist uniform; allowed: low, high"
    ):
        length_dist({"dist": "uniform", "low": 1, "hi": 3})
    with pytest.raises(WorkloadError, match="unknown dist 'zipf'"):
        length_dist({"dist": "zipf"})
    with pytest.raises(WorkloadError, match=">= 1"):
        length_dist(0)


def test_empirical_from_trace(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,100,7\n"
        "2023-11-16 18:15:47.0000000,300,9\n"
    )
    dist = length_dist({"dist": "empirical", "path": str(path), "column": "input"})
    assert set(dist.sample(500, np.random.default_rng(0)).tolist()) == {100, 300}
    dist = length_dist({"dist": "empirical", "path": str(path), "column": "output"})
    assert set(dist.sample(500, np.random.default_rng(0)).tolist()) == {7, 9}


# --------------------------------------------------------------------------------------------
# generated workloads


def test_synthetic_workload():
    cfg = {
        "type": "synthetic",
        "num_requests": 300,
        "input_len": {"dist": "uniform", "low": 16, "high": 64},
        "output_len": 8,
        "arrival": {"process": "poisson", "rate": 20},
        "seed": 5,
    }
    w = build(cfg)
    assert len(w) == 300 and w.concurrency is None
    assert all(16 <= r.num_prompt_tokens <= 64 and r.max_new_tokens == 8 for r in w.requests)
    ids = np.concatenate([r.prompt_token_ids for r in w.requests])
    assert ids.min() >= 10 and ids.max() < VOCAB - 10
    times = [r.arrival_time for r in w.requests]
    assert times[0] == 0 and times == sorted(times)
    assert build(cfg).requests == w.requests
    assert build({**cfg, "seed": 6}).requests != w.requests


def test_shared_prefix_structure():
    w = build(
        {
            "type": "shared_prefix",
            "num_groups": 4,
            "requests_per_group": 5,
            "system_prompt_len": 32,
            "question_len": {"dist": "uniform", "low": 4, "high": 12},
            "output_len": 6,
            "seed": 2,
        }
    )
    assert len(w) == 20
    groups = [r.source.split(":")[1].split("q")[0] for r in w.requests]
    assert groups[:4] == ["g0", "g1", "g2", "g3"]  # round robin: groups interleaved
    by_group: dict[str, list[tuple[int, ...]]] = {}
    for g, r in zip(groups, w.requests, strict=True):
        by_group.setdefault(g, []).append(r.prompt_token_ids)
    systems = set()
    for prompts in by_group.values():
        system = prompts[0][:32]
        systems.add(system)
        assert all(p[:32] == system for p in prompts)
        assert len({p[32] for p in prompts}) == len(prompts)  # members differ right after
    assert len({s[0] for s in systems}) == 4  # groups differ from their first token


def test_closed_loop_workload():
    cfg = {"type": "synthetic", "num_requests": 10, "input_len": 5, "output_len": 5}
    w = build({**cfg, "concurrency": 3})
    assert w.concurrency == 3 and w.duration == 0
    assert all(r.arrival_time == 0 for r in w.requests)
    with pytest.raises(WorkloadError, match="not both"):
        build({**cfg, "concurrency": 3, "arrival": {"rate": 1}})
    with pytest.raises(WorkloadError, match="closed loop"):
        build({**cfg, "concurrency": 3, "rate": 2})


def test_unknown_type_and_key():
    with pytest.raises(WorkloadError, match="unknown workload type 'zipf'; allowed: synthetic"):
        build({"type": "zipf"})
    with pytest.raises(WorkloadError, match="unknown key 'block_size' for workload type azure"):
        build({"type": "azure", "path": "x.csv", "block_size": 16})
    cfg = {"type": "synthetic", "num_requests": 2, "input_len": 1, "output_len": 1}
    assert len(build({**cfg, "_target_": "ignored"})) == 2
    with pytest.raises(WorkloadError, match="needs 'num_requests'"):
        build({"type": "synthetic", "input_len": 1, "output_len": 1})


# --------------------------------------------------------------------------------------------
# transforms


def _timed(n: int = 100, gap: float = 0.5) -> dict:
    return {
        "type": "synthetic",
        "num_requests": n,
        "input_len": 10,
        "output_len": 10,
        "arrival": {"process": "constant", "rate": 1 / gap},
    }


def test_window_and_max_requests():
    w = build({**_timed(), "start": 10.0, "duration": 5.0})  # arrivals 10.0, 10.5, ... 14.5
    assert len(w) == 10
    assert [r.arrival_time for r in w.requests] == pytest.approx([0.5 * k for k in range(10)])
    w = build({**_timed(), "start": 10.0, "max_requests": 3})
    assert len(w) == 3 and w.requests[0].arrival_time == 0
    with pytest.raises(WorkloadError, match="keeps no request"):
        build({**_timed(), "start": 1000.0})


def test_rate_and_time_scale():
    w = build({**_timed(), "rate": 10.0})
    assert (len(w) - 1) / w.duration == pytest.approx(10.0)
    bursty = {**_timed(), "arrival": {"process": "gamma", "rate": 3, "burstiness": 0.3}}
    assert build({**bursty, "rate": 7.0}).metadata["mean_rate"] == pytest.approx(7.0)
    w = build({**_timed(10), "time_scale": 2.0})
    assert w.duration == pytest.approx(9.0)
    with pytest.raises(WorkloadError, match="'rate' or 'time_scale', not both"):
        build({**_timed(), "rate": 1.0, "time_scale": 2.0})


def test_clipping_to_max_seq_len():
    drafts = [
        RequestDraft(0, 100, 10),  # fits
        RequestDraft(0, 10, 300),  # short prompt keeps a long output
        RequestDraft(0, 300, 10),  # long prompt cut
        RequestDraft(0, 300, 300),  # both: output to half, prompt to the rest
    ]
    out, counts = clip_lengths(drafts, 128)
    assert [(d.input_len, d.output_len) for d in out] == [(100, 10), (10, 118), (118, 10), (64, 64)]
    assert counts == {"clipped_input": 2, "clipped_output": 2, "clipped_requests": 3}
    out, counts = clip_lengths(drafts, BIG, max_input_len=50, max_output_len=20)
    assert [(d.input_len, d.output_len) for d in out] == [(50, 10), (10, 20), (50, 10), (50, 20)]

    cfg = {"type": "synthetic", "num_requests": 50, "output_len": 40}
    cfg["input_len"] = {"dist": "uniform", "low": 10, "high": 200}
    w = build(cfg, max_seq_len=128)
    assert all(r.num_prompt_tokens + r.max_new_tokens <= 128 for r in w.requests)
    assert w.metadata["clipped_requests"] > 0


# --------------------------------------------------------------------------------------------
# real traces


@pytest.fixture(scope="module")
def azure_read():
    if not AZURE.exists():
        pytest.skip(f"Azure trace not found at {AZURE}")
    return read_azure(AZURE)


@needs_traces
def test_azure_conv_trace_matches_pandas(azure_read):
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(AZURE)
    rows = azure_read.rows
    assert len(rows) == len(df) == 19_366
    assert rows[0].arrival_time == 0.0
    ins = np.array([r.input_len for r in rows])
    outs = np.array([r.output_len for r in rows])
    assert np.median(ins) == df["ContextTokens"].median() == 1020
    assert ins.sum() == df["ContextTokens"].sum() and outs.sum() == df["GeneratedTokens"].sum()
    ts = pd.to_datetime(df["TIMESTAMP"])
    expected = (ts - ts.iloc[0]).dt.total_seconds().to_numpy()
    assert np.allclose([r.arrival_time for r in rows], expected, atol=1e-6)
    assert azure_read.metadata["out_of_order_rows"] == 0


@needs_traces
def test_azure_build_with_transforms():
    w = build({"type": "azure", "path": str(AZURE), "max_requests": 400}, max_seq_len=2048)
    assert len(w) == 400 and w.name == "azure:azure_llm_2023_conv.csv"
    assert all(r.num_prompt_tokens + r.max_new_tokens <= 2048 for r in w.requests)
    assert w.requests[0].source == "azure_llm_2023_conv.csv:2"


@needs_traces
def test_mooncake_prefix_reuse_is_real():
    read = read_mooncake(MOONCAKE)
    rows = read.rows[:400]
    w = build({"type": "mooncake", "path": str(MOONCAKE), "max_requests": 400})
    assert all(
        r.num_prompt_tokens == d.input_len and r.max_new_tokens == d.output_len
        for r, d in zip(w.requests, rows, strict=True)
    )
    by_first: dict[int, list[int]] = {}
    for k, d in enumerate(rows):
        by_first.setdefault(d.hash_ids[0], []).append(k)
    pairs = [ks[:2] for ks in by_first.values() if len(ks) > 1]
    assert pairs, "expected requests sharing a leading block in the first 400"
    for a, b in pairs:
        ha, hb = rows[a].hash_ids, rows[b].hash_ids
        common = next((i for i, (x, y) in enumerate(zip(ha, hb, strict=False)) if x != y), None)
        shared = min(len(ha), len(hb)) if common is None else common
        n = min(shared * 512, rows[a].input_len, rows[b].input_len)
        pa, pb = w.requests[a].prompt_token_ids, w.requests[b].prompt_token_ids
        assert pa[:n] == pb[:n]
        if common is not None:
            assert pa[n : n + 512] != pb[n : n + 512]


def test_mooncake_blocks_small(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [
        {"timestamp": 1500, "input_length": 10, "output_length": 3, "hash_ids": [7, 8, 9]},
        {"timestamp": 1000, "input_length": 6, "output_length": 2, "hash_ids": [7, 5]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    w = build({"type": "mooncake", "path": str(path), "block_size": 4})
    first, second = w.requests  # sorted by arrival: the 1000 ms row first
    assert [r.arrival_time for r in w.requests] == [0.0, 0.5]
    assert w.metadata["out_of_order_rows"] == 1
    assert (first.num_prompt_tokens, second.num_prompt_tokens) == (6, 10)
    assert first.prompt_token_ids[:4] == second.prompt_token_ids[:4]  # id 7
    assert first.prompt_token_ids[4:6] != second.prompt_token_ids[4:6]  # 5 vs 8


# --------------------------------------------------------------------------------------------
# small files of each format


def test_azure_2024_timestamps(tmp_path):
    path = tmp_path / "a24.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.010000+00:00,10,5\n"
        "2024-05-10T00:00:01.510000+00:00,20,6\n"
        "2024-05-10T02:00:02.01+02:00,30,7\n"
        "2024-05-10 00:00:03Z,40,8\n"
        "2024-05-10 00:00:04.5,50,9\n"
    )
    rows = read_azure(path).rows
    assert [r.arrival_time for r in rows] == pytest.approx([0.0, 1.5, 2.0, 2.99, 4.49])
    assert parse_timestamp("2023-11-16 18:15:46.6805900")[1] == pytest.approx(0.68059)


def test_burstgpt(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,100,20,120,Conversation log\n"
        "7,GPT-4,50,0,50,Conversation log\n"
        "8,GPT-4,60,30,90,API log\n"
        "9.5,ChatGPT,70,10,80,Conversation log\n"
    )
    read = read_burstgpt(path)
    assert [(r.arrival_time, r.input_len, r.output_len) for r in read.rows] == [
        (0.0, 100, 20),
        (3.0, 60, 30),
        (4.5, 70, 10),
    ]
    assert read.metadata["failed_rows"] == 1
    w = build({"type": "burstgpt", "path": str(path), "model": "GPT-4"})
    assert len(w) == 1 and w.requests[0].num_prompt_tokens == 60
    assert w.metadata["other_model_rows"] == 2 and w.metadata["failed_rows"] == 1


def _sharegpt_file(tmp_path) -> Path:
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "hi there friend"}]},
        {
            "id": "b",
            "conversations": [
                {"from": "human", "value": "what is two plus two"},
                {"from": "gpt", "value": "four"},
                {"from": "human", "value": "thanks"},
            ],
        },
        {
            "id": "c",
            "conversations": [
                {"from": "system", "value": "be brief"},
                {"from": "human", "value": "name a color"},
                {"from": "gpt", "value": "blue is a color"},
            ],
        },
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def test_sharegpt(tmp_path):
    path = _sharegpt_file(tmp_path)
    tok = WordTokenizer()
    cfg = {"type": "sharegpt", "path": str(path), "arrival": {"process": "constant", "rate": 2}}
    w = build(cfg, tokenizer=tok)
    assert [(r.num_prompt_tokens, r.max_new_tokens) for r in w.requests] == [(5, 1), (3, 4)]
    assert w.requests[0].prompt_token_ids == tuple(tok.encode("what is two plus two"))
    assert [r.arrival_time for r in w.requests] == [0.0, 0.5]
    assert w.metadata["no_pair_rows"] == 1
    assert len(build({**cfg, "num_requests": 1}, tokenizer=tok)) == 1
    with pytest.raises(WorkloadError, match="needs a tokenizer"):
        build(cfg)


# --------------------------------------------------------------------------------------------
# malformed inputs: every reader names the file, the line and the problem

AZ_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZ_ROW = "2023-11-16 18:15:46.6805900,374,44\n"
BG_HEAD = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
BG_ROW = "5,ChatGPT,100,20,120,Conversation log\n"
MC_ROW = '{"timestamp": 0, "input_length": 600, "output_length": 6, "hash_ids": [1, 2]}\n'


def _read(kind: str, path: Path):
    if kind == "azure":
        return read_azure(path)
    if kind == "burstgpt":
        return read_burstgpt(path)
    if kind == "mooncake":
        return read_mooncake(path)
    return read_sharegpt(path, WordTokenizer())


def _sg(entries: str) -> str:
    return "[\n" + entries + "\n]\n"


SG_OK = json.dumps(
    {"id": "x", "conversations": [{"from": "human", "value": "a b"}, {"from": "gpt", "value": "c"}]}
)
MALFORMED = [
    # (reader, file name, content, line, message pattern)
    ("azure", "a.csv", "TIMESTAMP,Context,GeneratedTokens\n" + AZ_ROW, 1,
     r"missing column 'ContextTokens'; header has: TIMESTAMP, Context, GeneratedTokens"),
    ("azure", "a.csv", AZ_HEAD + AZ_ROW + "2023-11-16 18:15:47.1,abc,44\n", 3,
     r"field 'ContextTokens' is not a number: 'abc'"),
    ("azure", "a.csv", AZ_HEAD + AZ_ROW + "2023-11-16 18:15:47.1,-5,44\n", 3,
     r"field 'ContextTokens' must be >= 1, got '-5'"),
    ("azure", "a.csv", AZ_HEAD + AZ_ROW + "2023-11-16 18:15:47.1,5,0\n", 3,
     r"field 'GeneratedTokens' must be >= 1, got '0'"),
    ("azure", "a.csv", AZ_HEAD + "yesterday,5,5\n", 2,
     r"field 'TIMESTAMP' is not a timestamp: 'yesterday'"),
    ("azure", "a.csv", "", 1, r"empty file"),
    ("azure", "a.csv", AZ_HEAD, 1, r"no data rows"),
    ("burstgpt", "b.csv", "Timestamp,Model,Request tokens,Total tokens\n" + BG_ROW, 1,
     r"missing column 'Response tokens'; header has: Timestamp, Model, Request tokens"),
    ("burstgpt", "b.csv", BG_HEAD + BG_ROW + "6,ChatGPT,100,x1,120,Conversation log\n", 3,
     r"field 'Response tokens' is not a number: 'x1'"),
    ("burstgpt", "b.csv", BG_HEAD + "6,ChatGPT,-100,5,120,Conversation log\n", 2,
     r"field 'Request tokens' must be >= 0, got '-100'"),
    ("burstgpt", "b.csv", "\n", 1, r"empty file"),
    ("burstgpt", "b.csv", BG_HEAD + "6,ChatGPT,100,0,100,Conversation log\n", 2,
     r"no usable rows: 1 failed"),
    ("mooncake", "m.jsonl", MC_ROW + '{"timestamp": 1, "input_length": 5, "output_length": 1}\n',
     2, r"missing field 'hash_ids'; object has: timestamp, input_length, output_length"),
    ("mooncake", "m.jsonl",
     MC_ROW + '{"timestamp": "soon", "input_length": 5, "output_length": 1, "hash_ids": [1]}\n',
     2, r"field 'timestamp' is not a number: 'soon'"),
    ("mooncake", "m.jsonl",
     MC_ROW + '{"timestamp": 1, "input_length": -5, "output_length": 1, "hash_ids": [1]}\n',
     2, r"field 'input_length' must be >= 1, got -5"),
    ("mooncake", "m.jsonl", MC_ROW + MC_ROW + '{"timestamp": 1, "input_length": \n', 3,
     r"bad JSON"),
    ("mooncake", "m.jsonl",
     '{"timestamp": 1, "input_length": 1100, "output_length": 1, "hash_ids": [1, 2]}\n', 1,
     r"input_length 1100 needs 3 blocks of 512 tokens but hash_ids has 2"),
    ("mooncake", "m.jsonl", "", 1, r"empty file"),
    ("sharegpt", "s.json", _sg(SG_OK + ',\n{"id": "y", "turns": []}'), 3,
     r"missing field 'conversations'; object has: id, turns"),
    ("sharegpt", "s.json",
     _sg(SG_OK + ',\n{"id": "y", "conversations": [{"from": "human", "value": 5}]}'), 3,
     r"turn 0 of conversation 'y' needs 'from' and a string 'value'"),
    ("sharegpt", "s.json", _sg(SG_OK + ",\n" + SG_OK + ',\n{"id": "z", "conv'), 4, r"bad JSON"),
    ("sharegpt", "s.json", "  \n", 1, r"empty file"),
    ("sharegpt", "s.json", "[]", 1, r"no data rows"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "name", "content", "line", "pattern"), MALFORMED)
def test_malformed_inputs_name_file_line_problem(tmp_path, kind, name, content, line, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(WorkloadError, match=pattern) as info:
        _read(kind, path)
    assert info.value.path == str(path) and info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize("kind", ["azure", "burstgpt", "mooncake", "sharegpt"])
def test_missing_file(tmp_path, kind):
    path = tmp_path / "nope.txt"
    with pytest.raises(WorkloadError, match="file not found") as info:
        _read(kind, path)
    assert info.value.path == str(path)
