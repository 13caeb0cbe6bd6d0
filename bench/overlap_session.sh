#!/usr/bin/env bash
# Overlap scheduling on a GPU in one device call: its CUDA tests (with the graph tests it
# touches), decode steps against the memory floor and the reference workload (ours only), each
# without and with --overlap; a short table last. About 8 minutes on an H200.
#
#   [BATCHES=1,64,256] bash bench/overlap_session.sh OUT_DIR
#
# The project root on PYTHONPATH. Writes OUT_DIR/overlap-session.tar.gz (every log and JSON).
set -uo pipefail
OUT=${1:?usage: bash bench/overlap_session.sh OUT_DIR}
LOGS=$OUT/overlap-session
mkdir -p "$LOGS"
failed=()
BATCHES=${BATCHES:-1,64,256}
python -m pytest -q -p no:cacheprovider tests/test_overlap.py tests/test_piecewise_graphs.py \
  tests/test_cuda_graphs.py tests/test_kernels_decode_inputs.py >"$LOGS/pytest.log" 2>&1 \
  || failed+=("cuda tests")
tail -1 "$LOGS/pytest.log"
grep -E "^(FAILED|ERROR)" "$LOGS/pytest.log"
for mode in sync overlap; do
  flag=()
  [[ $mode == overlap ]] && flag=(--overlap)
  python bench/decode_steps.py --presets llama-8b,llama-1b --batches "$BATCHES" --profile \
    --out "$LOGS/steps-$mode" "${flag[@]}" >"$LOGS/steps-$mode.log" 2>&1 \
    || failed+=("decode steps $mode")
  python bench/peers.py --presets llama-1b,llama-8b --peers '' --decode-batches '' \
    --out "$LOGS/peers-$mode" "${flag[@]}" >"$LOGS/peers-$mode.log" 2>&1 \
    || failed+=("peers $mode")
done
python - "$LOGS" <<'PY'
import json, sys
from pathlib import Path

logs = Path(sys.argv[1])
print("decode steps (context 1,024): step ms, x floor, scheduling + input prep (share), GPU idle")
for mode in ("sync", "overlap"):
    path = logs / f"steps-{mode}" / "decode_steps.json"
    for r in json.loads(path.read_text())["rows"] if path.exists() else []:
        print(f"{mode:8} {r['preset']:9} batch {r['batch']:>3}: {r['step_ms']:6.2f} ms "
              f"{r['ratio']:.2f}x floor, sched {r['sched_ms']:.3f} + prep "
              f"{r['input_prep_ms']:.3f} ms ({100 * r['host_share']:.1f}%), "
              f"GPU idle {100 * r['gpu_idle_share']:.1f}%")
print("reference workload (256 requests, 128 out), ours")
for mode in ("sync", "overlap"):
    path = logs / f"peers-{mode}" / "peers.json"
    for row in json.loads(path.read_text())["peers"] if path.exists() else []:
        print(f"{mode:8} {row['preset']:9} {row['seconds']['ours']:.2f} s, "
              f"{100 * row['fraction_of_floor']:.1f}% of floor {row['floor_s']:.2f} s")
PY
tar -czf "$OUT/overlap-session.tar.gz" -C "$OUT" overlap-session && rm -rf "$LOGS"
if ((${#failed[@]})); then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
