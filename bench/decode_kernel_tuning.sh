#!/usr/bin/env bash
# Tune the decode attention kernel on a GPU in one device call: its CUDA tests, a sweep of
# (block_n, num_warps, num_stages, num_splits) (bench/attention_kernels.py --decode-sweep), then
# whole decode steps (bench/decode_steps.py) with the unpipelined, the default and the best
# config, each set through SCHEDLAB_DECODE_CONFIG. About 7 minutes on an H200.
#
#   bash bench/decode_kernel_tuning.sh OUT_DIR
#
# The project root on PYTHONPATH. Writes OUT_DIR/decode-tuning.tar.gz (every log) and prints the
# sweep's tables and the decode-step tables.
set -uo pipefail
OUT=${1:?usage: bash bench/decode_kernel_tuning.sh OUT_DIR}
LOGS=$OUT/decode-tuning
mkdir -p "$LOGS"
failed=()
python -m pytest -q -p no:cacheprovider tests/test_kernels_decode.py >"$LOGS/pytest.log" 2>&1 \
  || failed+=("decode kernel tests")
tail -1 "$LOGS/pytest.log"
python bench/attention_kernels.py --no-prefill --decode-sweep --decode-sweep-out "$LOGS/best.txt" \
  --out "$LOGS/sweep.md" >"$LOGS/sweep.log" 2>&1 || failed+=("sweep")
cat "$LOGS/sweep.md"
best=$(cat "$LOGS/best.txt" 2>/dev/null || echo "64,4,3")
declare -A CONFIGS=([unpipelined]="64,4,1" [default]="64,4,3" [best]="$best")
for name in unpipelined default best; do
  presets=llama-8b,llama-1b
  [[ $name == unpipelined ]] && presets=llama-8b
  echo "=== decode steps, $name config ${CONFIGS[$name]}"
  SCHEDLAB_DECODE_CONFIG=${CONFIGS[$name]} python bench/decode_steps.py --presets "$presets" \
    --batches 1,64,256 --out "$LOGS/steps-$name" >"$LOGS/steps-$name.log" 2>&1 \
    || failed+=("decode steps $name")
  sed -n '/^preset/,$p' "$LOGS/steps-$name.log"
done
tar -czf "$OUT/decode-tuning.tar.gz" -C "$OUT" decode-tuning && rm -rf "$LOGS"
if ((${#failed[@]})); then
  printf 'failed: %s\n' "${failed[@]}"
  exit 1
fi
