#!/usr/bin/env bash
# Issue 5 on a GPU: profile the real engine, run the same workloads real and simulated, and
# report the simulator's error per metric. One preset per call fits a 10-minute device call.
#
#   bash bench/sim_calibration.sh OUT_DIR llama-8b
#
# On the GPU machine: the repo root on PYTHONPATH, Hydra installed from the carried wheels
# (../shared/tools/device-wheels.sh), and the Azure trace carried in a git-ignored copy:
#   mkdir -p .traces && cp ../shared/traces/azure_llm_2023_conv.csv .traces/   # carry .traces
# Writes OUT_DIR/profiles/h100/<model>.json (commit it under engine/sim/profiles/), the real and
# simulated result directories, and OUT_DIR/fidelity/<workload>-<model>/fidelity.{csv,png}.
set -euo pipefail
OUT=${1:?usage: bash bench/sim_calibration.sh OUT_DIR MODEL}
MODEL=${2:?usage: bash bench/sim_calibration.sh OUT_DIR MODEL}
TRACE=${TRACE:-.traces/azure_llm_2023_conv.csv}
PROFILE=$OUT/profiles/h100/$MODEL.json

python -m engine.sim.profiler --model "$MODEL" --device cuda --out "$PROFILE"

# fcfs_vs_maxutil as configured for a GPU; an Azure window at 10x its arrival rate (~55 req/s),
# a load that queues.
declare -A WORKLOADS=(
  [fcfs]="experiment=fcfs_vs_maxutil"
  [azure]="workload=azure workload.path=$TRACE workload.max_requests=600 workload.time_scale=0.1"
)
for name in fcfs azure; do
  args=${WORKLOADS[$name]}
  # shellcheck disable=SC2086  # args is a list of overrides
  python -m harness $args model="$MODEL" output_root="$OUT/real/$name-$MODEL" progress=false
  # shellcheck disable=SC2086
  python -m harness $args model="$MODEL" executor.engine=sim executor.profile="$PROFILE" \
    output_root="$OUT/sim/$name-$MODEL" progress=false
  real=$(find "$OUT/real/$name-$MODEL" -mindepth 2 -maxdepth 2 -type d | head -1)
  sim=$(find "$OUT/sim/$name-$MODEL" -mindepth 2 -maxdepth 2 -type d | head -1)
  python -m harness.fidelity "$real" "$sim" --out "$OUT/fidelity/$name-$MODEL"
done
