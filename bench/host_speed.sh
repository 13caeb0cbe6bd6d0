#!/usr/bin/env bash
# How fast is this machine's host, run to run? The same llama-1b Azure window, real, several
# times (with and without OMP_NUM_THREADS=1), and per run the host's and the device's median
# time per step: llama-1b's mixed steps are bound by the host, so a slower host moves TTFT.
#
#   bash bench/host_speed.sh OUT_DIR [MODEL]        # on the GPU machine (see sim_calibration.sh)
#
# Writes OUT_DIR/host_speed.txt (the table) and OUT_DIR/host_speed.tar.gz (the runs).
set -u
OUT=${1:?usage: bash bench/host_speed.sh OUT_DIR [MODEL]}
MODEL=${2:-llama-1b}
RESULTS=${RESULTS:-/tmp/host_speed-$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$OUT" "$RESULTS"
ARGS="workload=azure workload.path=${TRACE:-.traces/azure_llm_2023_conv.csv} \
workload.max_requests=600 workload.time_scale=0.1 model=$MODEL progress=false plots=false"
for name in default-1 threads1-1 default-2 threads1-2; do
  threads=()
  [[ $name == threads1-* ]] && threads=(env OMP_NUM_THREADS=1)
  # shellcheck disable=SC2086  # a list of overrides
  "${threads[@]}" python -m harness $ARGS output_root="$RESULTS/$name" > "$RESULTS/$name.log" 2>&1 \
    || tail -5 "$RESULTS/$name.log"
done
python - "$RESULTS" <<'PY' | tee "$OUT/host_speed.txt"
import glob
import json
import sys
from pathlib import Path

import pandas as pd

rows = []
for run in sorted(glob.glob(f"{sys.argv[1]}/*/*/*/iterations.parquet")):
    steps = pd.read_parquet(run)
    summary = json.loads((Path(run).parent / "summary.json").read_text())
    decode = steps[(steps.num_context_tokens == 0) & steps.num_generation_requests.between(33, 64)]
    mixed = steps[(steps.num_context_tokens > 0) & (steps.num_generation_requests > 0)]
    rows.append({
        "run": Path(run).parts[-4],
        "decode_host_ms": 1e3 * decode.host_time.median(),  # 33-64 sequences
        "mixed_host_ms": 1e3 * mixed.host_time.median(),
        "mixed_device_ms": 1e3 * mixed.device_time.median(),
        "ttft_p50_ms": summary["p50_ttft_ms"],
        "tpot_p50_ms": summary["p50_tpot_ms"],
    })
print(pd.DataFrame(rows).round(2).to_string(index=False))
PY
tar -czf "$OUT/host_speed.tar.gz" -C "$RESULTS" .
