#!/usr/bin/env bash
# Real runs of the windows the simulator's fidelity is measured on (docs/performance.md), for a
# device call: each job's results under OUT, a line per job, a table of medians at the end.
#
#   bash bench/real_windows.sh OUT JOB...      JOB = model:window[:tag[:override,override...]]
#
# windows: fcfs     experiment=fcfs_vs_maxutil (both policies)
#          prefix   experiment=prefix_reuse
#          azure    600 requests of the Azure conversation trace at 10x its rate
#          holdout  600 requests from 40 minutes in, at 1/0.14
#          heavy    1,200 requests from 40 minutes in, at 20x (queues for llama-1b)
# e.g.:    bash bench/real_windows.sh /tmp/real llama-1b:azure llama-1b:azure:full:executor.full_cuda_graphs=true
#
# TRACE: the Azure trace (default .traces/azure_llm_2023_conv.csv, a git-ignored copy of
# ../shared/traces/azure_llm_2023_conv.csv, carried to the GPU machine). Where Hydra is missing
# and .whl/ holds its wheels (../shared/tools/device-wheels.sh), they are installed first.
# Results: OUT/<window>-<model><tag>/, logs OUT/log-<window>-<model><tag>.txt; with OUT_TAR set,
# OUT is tarred there after each job (what a timed-out call has done still comes back).
set -uo pipefail
OUT=${1:?usage: bash bench/real_windows.sh OUT model:window[:tag[:overrides]]...}
shift
if ! python3 -c "import hydra" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
T=${TRACE:-.traces/azure_llm_2023_conv.csv}
declare -A WINDOWS=(
  [fcfs]="experiment=fcfs_vs_maxutil"
  [prefix]="experiment=prefix_reuse"
  [azure]="workload=azure workload.path=$T workload.max_requests=600 workload.time_scale=0.1"
  [holdout]="workload=azure workload.path=$T workload.start=2400 workload.max_requests=600 workload.time_scale=0.14"
  [heavy]="workload=azure workload.path=$T workload.start=2400 workload.max_requests=1200 workload.time_scale=0.05"
)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
  > "$OUT/gpu.txt" 2>/dev/null
for job in "$@"; do
  IFS=: read -r model window tag extra <<< "$job"
  if [[ -z ${WINDOWS[$window]:-} ]]; then
    echo "$job: no window '$window' (one of: ${!WINDOWS[*]})"
    continue
  fi
  name=$window-$model$tag
  start=$SECONDS
  # shellcheck disable=SC2086  # the window's and the job's overrides are words
  timeout 300 python3 -m harness ${WINDOWS[$window]} ${extra//,/ } model="$model" \
    output_root="$OUT/$name" progress=false plots=false > "$OUT/log-$name.txt" 2>&1
  echo "$job rc=$? $((SECONDS - start)) s"
  [[ -n ${OUT_TAR:-} ]] && tar -czf "$OUT_TAR" -C "$OUT" .
done
python3 - "$OUT" <<'PY'
import glob, json, sys
import pandas as pd
print("run | TTFT P50, P90 ms | TPOT P50 ms | output tok/s | mixed steps' host, device ms")
for path in sorted(glob.glob(f"{sys.argv[1]}/**/summary.json", recursive=True)):
    s = json.load(open(path))
    steps = pd.read_parquet(path.replace("summary.json", "iterations.parquet"))
    mixed = steps[steps.num_context_tokens > 0]
    print(path[len(sys.argv[1]) + 1 :].rsplit("/summary.json")[0],
          f"| {s['p50_ttft_ms']:.1f}, {s['p90_ttft_ms']:.1f} | {s['p50_tpot_ms']:.2f}",
          f"| {s['output_throughput']:.0f}",
          f"| {mixed.host_time.median() * 1e3:.2f}, {mixed.device_time.median() * 1e3:.2f}")
PY
