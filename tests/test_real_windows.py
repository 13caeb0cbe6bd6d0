"""``bench/real_windows.sh``: the fidelity windows run real, on the CPU with a tiny preset."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"


def test_a_window_runs_and_a_bad_one_is_named(tmp_path: Path):
    out = tmp_path / "real"
    proc = subprocess.run(
        ["bash", "bench/real_windows.sh", str(out),
         "llama-tiny:azure:x:executor.warmup=false", "llama-tiny:nowindow"],
        cwd=ROOT, env={**os.environ, "TRACE": str(TRACE)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "llama-tiny:azure:x:executor.warmup=false rc=0" in proc.stdout
    assert "no window 'nowindow'" in proc.stdout
    (requests,) = (out / "azure-llama-tinyx").rglob("requests.parquet")
    assert len(pd.read_parquet(requests)) == 600  # the window's requests, none lost
    (overrides,) = (out / "azure-llama-tinyx").rglob("overrides.yaml")
    assert "workload.time_scale=0.1" in overrides.read_text()
    assert "executor.warmup=false" in overrides.read_text()
    assert "azure-llama-tinyx/default/" in proc.stdout  # the table's row
