#!/usr/bin/env bash
# Issue 5 on a GPU: profile the real engine, run the same workloads real and simulated, and
# report the simulator's error per metric. One preset per call fits a 10-minute device call.
#
#   bash bench/sim_calibration.sh OUT_DIR llama-8b
#
# On the GPU machine: the repo root on PYTHONPATH, Hydra installed from the carried wheels
# (../shared/tools/device-wheels.sh), and the Azure trace carried in a git-ignored copy:
#   mkdir -p .traces && cp ../shared/traces/azure_llm_2023_conv.csv .traces/   # carry .traces
# Writes OUT_DIR/<model>.json (the profile: commit it as engine/sim/profiles/<gpu>/<model>.json),
# OUT_DIR/fidelity-<workload>-<model>.{csv,png}, OUT_DIR/fidelity-<workload>-calibrated-<model>.csv
# (the workload simulated with the profile calibrated on the other one's real run; the calibrated
# profiles go into the tarball), and OUT_DIR/calibration-<model>.tar.gz holding
# the real and simulated result directories and each pair's steps.csv (the profile's error on
# every real step; RESULTS, default a temporary directory), so that few files come back from a
# device call. A failing step is reported and the rest still run.
# REAL_REPEAT=1 also runs the Azure window real twice (the real engine's run-to-run spread; its
# fidelity table is in the tarball: a device call brings back 8 files).
# PROFILE_FROM=engine/sim/profiles/h200/llama-1b.json uses that profile instead of profiling.
# ARGS="executor.overlap_scheduler=false" adds overrides to every run, real and simulated (the
# harness runs with overlap scheduling by default; a profile is calibrated for one mode).
# REAL_ONLY=1 runs the real engine only (no profiling, simulation or calibration), and
# REAL_FROM=DIR (that tarball, extracted) does the rest from its real/ runs on any CPU:
#   REAL_FROM=DIR PROFILE_FROM=GRID bash bench/sim_calibration.sh OUT llama-8b
set -uo pipefail
OUT=${1:?usage: bash bench/sim_calibration.sh OUT_DIR MODEL}
MODEL=${2:?usage: bash bench/sim_calibration.sh OUT_DIR MODEL}
TRACE=${TRACE:-.traces/azure_llm_2023_conv.csv}
# A new directory each call: a device machine may keep /tmp (and mktemp's names) from a previous one.
RESULTS=${RESULTS:-/tmp/sim_calibration-$(date +%Y%m%d-%H%M%S)-$$}
if [[ -e $RESULTS && -n $(ls -A "$RESULTS") ]]; then
  echo "RESULTS=$RESULTS is not empty: the run directories found in it would be ambiguous" >&2
  exit 2
fi
PROFILE=$OUT/$MODEL.json
mkdir -p "$OUT" "$RESULTS"
if [[ -n ${REAL_FROM:-} ]]; then
  cp -r "$REAL_FROM/real" "$RESULTS/real" || exit 2
fi
failed=()

step() {  # step NAME COMMAND...: run it, time it, remember a failure
  local name=$1 started=$SECONDS
  shift
  echo "=== $name"
  if ! "$@"; then
    failed+=("$name")
  fi
  echo "=== $name: $((SECONDS - started)) s"
}

# fcfs_vs_maxutil as configured for a GPU; an Azure window at 10x its arrival rate (~40 req/s),
# a load that queues; holdout: another window of the trace, 40 minutes in (~5.8 req/s in the
# trace; HOLDOUT_SCALE=0.14 puts it at ~41 req/s), to test a calibration on requests it did not
# see (REAL_ONLY=1 NAMES="azure holdout"); heavy: that window's first 1,200 requests at 20x
# (~91 req/s: a load that queues for llama-1b; HEAVY_SCALE sets it).
declare -A WORKLOADS=(
  [fcfs]="experiment=fcfs_vs_maxutil"
  [azure]="workload=azure workload.path=$TRACE workload.max_requests=600 workload.time_scale=0.1"
  [holdout]="workload=azure workload.path=$TRACE workload.start=2400 workload.max_requests=600 \
workload.time_scale=${HOLDOUT_SCALE:-0.14}"
  [heavy]="workload=azure workload.path=$TRACE workload.start=2400 workload.max_requests=1200 \
workload.time_scale=${HEAVY_SCALE:-0.05}"
)
if [[ ${REAL_ONLY:-0} == 1 ]]; then
  for name in ${NAMES:-fcfs azure}; do
    # shellcheck disable=SC2086  # a list of overrides
    step "real $name" python -m harness ${WORKLOADS[$name]} model="$MODEL" ${ARGS:-} \
      output_root="$RESULTS/real/$name-$MODEL" progress=false
  done
  tar -czf "$OUT/calibration-$MODEL.tar.gz" -C "$RESULTS" .
  ((${#failed[@]} == 0)) || { printf 'failed: %s\n' "${failed[@]}"; exit 1; }
  exit 0
fi

if [[ -n ${PROFILE_FROM:-} ]]; then  # a committed profile: skip the 3-minute profiling
  cp "$PROFILE_FROM" "$PROFILE"
else
  step profile python -m engine.sim.profiler --model "$MODEL" --device cuda --out "$PROFILE"
fi

for name in fcfs azure; do
  args=${WORKLOADS[$name]}
  if [[ -z ${REAL_FROM:-} ]]; then
    # shellcheck disable=SC2086  # args is a list of overrides
    step "real $name" python -m harness $args model="$MODEL" ${ARGS:-} \
      output_root="$RESULTS/real/$name-$MODEL" progress=false
  fi
  # shellcheck disable=SC2086
  step "sim $name" python -m harness $args model="$MODEL" ${ARGS:-} executor.engine=sim \
    executor.profile="$PROFILE" output_root="$RESULTS/sim/$name-$MODEL" progress=false
  real=$(find "$RESULTS/real/$name-$MODEL" -mindepth 2 -maxdepth 2 -type d | head -1)
  sim=$(find "$RESULTS/sim/$name-$MODEL" -mindepth 2 -maxdepth 2 -type d | head -1)
  if [[ -n $real && -n $sim ]]; then
    # --profile: also the profile's prediction of every real step (steps.csv), by kind and size
    step "fidelity $name" python -m harness.fidelity "$real" "$sim" \
      --out "$RESULTS/fidelity/$name-$MODEL" --profile "$PROFILE"
    for f in "$RESULTS/fidelity/$name-$MODEL"/fidelity.*; do
      cp "$f" "$OUT/fidelity-$name-$MODEL.${f##*.}"
    done
  else
    failed+=("fidelity $name (no result directory)")
  fi
done
# Cross-validated calibration: the profile calibrated with one workload's real steps
# (python -m harness.calibrate) simulates the other workload, compared with its real run.
declare -A OTHER=([fcfs]=azure [azure]=fcfs)
for name in fcfs azure; do
  other=${OTHER[$name]}
  calibrated=$RESULTS/$MODEL-calibrated-$name.json
  # the run (azure) or sweep (fcfs) directory under the output root
  real=$(find "$RESULTS/real/$name-$MODEL" -mindepth 2 -maxdepth 2 -type d | head -1)
  step "calibrate with $name" python -m harness.calibrate "$real" \
    --profile "$PROFILE" --out "$calibrated"
  # shellcheck disable=SC2086
  step "sim $other, calibrated with $name" python -m harness ${WORKLOADS[$other]} model="$MODEL" \
    ${ARGS:-} executor.engine=sim executor.profile="$calibrated" \
    output_root="$RESULTS/simcal/$other-$MODEL" progress=false
  real=$(find "$RESULTS/real/$other-$MODEL" -mindepth 2 -maxdepth 2 -type d | head -1)
  sim=$(find "$RESULTS/simcal/$other-$MODEL" -mindepth 2 -maxdepth 2 -type d | head -1)
  step "fidelity $other, calibrated with $name" python -m harness.fidelity "$real" "$sim" \
    --out "$RESULTS/fidelity/$other-calibrated-$MODEL"
  cp "$RESULTS/fidelity/$other-calibrated-$MODEL/fidelity.csv" \
    "$OUT/fidelity-$other-calibrated-$MODEL.csv"
done
# REAL_REPEAT=1: the Azure window real a second time, compared with the first run: the real
# engine's own run-to-run spread, the floor under any simulator's error.
if [[ ${REAL_REPEAT:-0} == 1 && -z ${REAL_FROM:-} ]]; then
  # shellcheck disable=SC2086
  step "real azure again" python -m harness ${WORKLOADS[azure]} model="$MODEL" ${ARGS:-} \
    output_root="$RESULTS/real2/azure-$MODEL" progress=false
  first=$(find "$RESULTS/real/azure-$MODEL" -mindepth 2 -maxdepth 2 -type d | head -1)
  again=$(find "$RESULTS/real2/azure-$MODEL" -mindepth 2 -maxdepth 2 -type d | head -1)
  step "real vs real" python -m harness.fidelity "$first" "$again" \
    --out "$RESULTS/fidelity/azure-repeat-$MODEL"
fi
tar -czf "$OUT/calibration-$MODEL.tar.gz" -C "$RESULTS" .
if ((${#failed[@]})); then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
