"""Speed of the simulated engine on a prefix of the Azure conversation trace (no model).

    python -m pytest bench/test_sim_benchmark.py --benchmark-only

The whole-trace figure of issue 5 (19,366 requests under 60 s, under 2 GiB) is measured with
the harness command in docs/performance.md; this benchmark tracks the replay loop itself on a
2,000-request prefix, with fast-forward on and off, so a regression shows up in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM
from harness.replay import replay
from harness.workload import build_workload
from tests.test_sim import synthetic_profile

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure_llm_2023_conv.csv"


@pytest.fixture(scope="module")
def workload():
    if not TRACE.is_file():
        pytest.skip(f"no trace at {TRACE}")
    spec = dict(type="azure", path=str(TRACE), seed=0, max_requests=2000)
    return build_workload(spec, vocab_size=128256, max_seq_len=131072)


@pytest.mark.parametrize("fast_forward", [True, False], ids=["fast_forward", "every_step"])
def test_sim_replay(benchmark, workload, fast_forward):
    profile = synthetic_profile("llama-8b", free_bytes_for_kv=50 * 2**30)

    def run():
        llm = LLM("llama-8b", engine="sim", cost_model=profile, sim_fast_forward=fast_forward)
        replay(llm, workload)
        return llm

    llm = benchmark.pedantic(run, rounds=1, iterations=1)
    assert len(llm.executor.finished_requests) == len(workload)
