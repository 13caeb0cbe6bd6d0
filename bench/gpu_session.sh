#!/usr/bin/env bash
# Issue 4 on a GPU in one device call: the CUDA tests, exactness against transformers, one eager
# step's anatomy and the reference workload, each without and with piecewise CUDA graphs, and
# decode steps of the last preset by batch shape (bench/decode_shapes.py, issue 5); a short table
# last. About 7 minutes on an H200 for both presets.
#
#   bash bench/gpu_session.sh OUT_DIR [PRESETS]        # PRESETS default llama-1b,llama-8b
#
# The project root on PYTHONPATH. Writes OUT_DIR/gpu-session.tar.gz (every log and JSON) and
# OUT_DIR/summary.txt (the table). A failing step is reported and the rest still run.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_session.sh OUT_DIR [PRESETS]}
PRESETS=${2:-llama-1b,llama-8b}
LOGS=$OUT/logs
mkdir -p "$LOGS"
failed=()

step() {  # step NAME LOG COMMAND...: run it, log it, time it, remember a failure
  local name=$1 log=$2 started=$SECONDS
  shift 2
  echo "=== $name"
  if ! "$@" >"$log" 2>&1; then
    failed+=("$name")
    tail -5 "$log"
  fi
  echo "=== $name: $((SECONDS - started)) s"
}

step "cuda tests" "$LOGS/pytest.log" python -m pytest -q -p no:cacheprovider \
  tests/test_piecewise_graphs.py tests/test_cuda_graphs.py tests/test_kernels_fused.py
tail -1 "$LOGS/pytest.log"
step "tiny presets vs generate()" "$LOGS/gpu_check.log" \
  python bench/gpu_check.py --out "$LOGS/gpu_check" --presets ''
for mode in eager piecewise; do
  flag=(--no-piecewise)
  [[ $mode == piecewise ]] && flag=(--piecewise)
  for preset in ${PRESETS//,/ }; do
    step "anatomy $preset $mode" "$LOGS/anatomy-$preset-$mode.log" python bench/step_anatomy.py \
      --out "$LOGS/anatomy-$mode" --preset "$preset" --decodes 1:1,256:256 "${flag[@]}"
  done
  step "peers $mode" "$LOGS/peers-$mode.log" python bench/peers.py --out "$LOGS/peers-$mode" \
    --presets "$PRESETS" --peers '' --repeat --decode-batches 64,256 "${flag[@]}"
done

# Why serving steps are slower than the profiler's points (issue 5): one change at a time.
step "decode shapes" "$LOGS/decode-shapes.log" python bench/decode_shapes.py \
  --out "$LOGS/shapes" --preset "${PRESETS##*,}"

python - "$LOGS" >"$OUT/summary.txt" <<'EOF'
import json, sys
from pathlib import Path

logs = Path(sys.argv[1])
print("eager step (prefill of T tokens), median ms; enqueue = host time until queued")
print(f"{'preset':9} {'mode':9} {'T':>5} {'step':>7} {'enqueue':>8}")
for path in sorted(logs.glob("anatomy-*/anatomy_*.json")):
    a = json.loads(path.read_text())
    mode = "piecewise" if a["piecewise"] else "eager"
    for t, phases in a["phases_ms"].items():
        step, enqueue = a["prefill_ms"][t], phases["forward_enqueue_ms"]
        print(f"{a['preset']:9} {mode:9} {t:>5} {step:7.2f} {enqueue:8.2f}")
print("\nreference workload (ours), decode steps against the memory floor")
for mode in ("eager", "piecewise"):
    path = logs / f"peers-{mode}" / "peers.json"
    if not path.exists():
        continue
    p = json.loads(path.read_text())
    for row in p["peers"]:
        s = row["seconds"]
        print(f"{row['preset']:9} {mode:9} first {s['ours']:.2f} s, again {s.get('ours_again', 0):.2f}"
              f" s, {100 * row['fraction_of_floor']:.0f}% of floor")
    for d in p["decode"]:
        print(f"{d['preset']:9} {mode:9} batch {d['batch']:>3}: {d['ratio']:.2f}x floor, "
              f"host share {100 * d['host_share']:.1f}%")
shapes = logs / "shapes" / "decode_shapes.json"
if shapes.exists():
    print("\ndecode step by batch shape (same sequences and KV tokens), vs uniform")
    for r in json.loads(shapes.read_text()):
        print(f"{r['preset']:9} batch {r['batch']:>3} {r['variant']:10} {r['step_ms']:7.2f} ms"
              f"  {r['vs_uniform']:.3f}")
EOF
tar -czf "$OUT/gpu-session.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
cat "$OUT/summary.txt"
if ((${#failed[@]})); then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
