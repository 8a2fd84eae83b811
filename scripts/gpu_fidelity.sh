#!/usr/bin/env bash
# Record the fidelity studies on one GPU. Every model trains in its own process, side by side (each is
# small and leaves most of the GPU idle): on an H100 the two parity studies took about 3 minutes this
# way; the recall study, whose models train on 1024 sequences per step, about 5 minutes on its own.
#   training parity of a character LM on the CPython standard library sources (same architecture,
#   steps, data order and seeds per study):
#   - parity: the full model (2500 steps each: exact vs softmax m in {64, 256}, softmax m=256 redrawn
#     every 250 steps, relu m=256);
#   - features: the same model at softmax m in {256, 512, 1024} beside a second exact run;
#   - conv: the same model with a short causal convolution in every block (exact vs softmax m in
#     {64, 256, 1024} vs relu m=256);
#   - context: the same model over 1024 characters of context, 16 sequences per step (the same
#     characters per step as 64 of 256): exact vs softmax m in {64, 256, 512};
#   - window, window_context: the same model, exact vs softmax m=256 with exact weights for each
#     query's latest 64 keys (local_window=64), over 256 and over 1024 characters of context;
#   - small: a smaller model (1500 steps: exact vs softmax m in {32, 128} vs relu m=64);
#   multi-query associative recall (exact vs softmax m in {64, 256} vs relu m=64, 4 and 8 pairs with
#   every key asked, 2000 steps of 1024 sequences each: the RecallConfig defaults).
# Results are written as JSON to $OUT (default: ./fidelity-out); copy parity.json, parity_features.json,
# parity_conv.json, parity_context.json, parity_window.json, parity_window_context.json,
# parity_small.json and recall.json to docs/_data/fidelity/.
# Usage: OUT=/path/to/dir [STUDIES="parity features conv context window small recall"] bash scripts/gpu_fidelity.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-fidelity-out}"
STUDIES="${STUDIES:-parity features conv context window small recall}"
mkdir -p "$OUT/parts"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
pids=()
status=0
declare -A variants

wanted() { [[ " $STUDIES " == *" $1 "* ]]; }

# run_study NAME LAYER_ERRORS "SETTINGS" SPEC...: one process per variant; the trained-layer errors
# (LAYER_ERRORS=1) come with the first variant only
run_study() {
  local name=$1 layer_errors=$2 settings=$3
  shift 3
  local i=0 spec flags
  for spec in "$@"; do
    flags=(--no-layer-errors)
    if [ "$layer_errors" = 1 ] && [ "$i" -eq 0 ]; then flags=(); fi
    # shellcheck disable=SC2086  # settings: FIELD=VALUE words for --set
    python scripts/train_parity.py --device cuda --bf16 --steps "${PARITY_STEPS:-2500}" --specs "$spec" \
        ${settings:+--set $settings} "${flags[@]}" --out "$OUT/parts/${name}_$i.json" \
        > "$OUT/parts/${name}_$i.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
  variants[$name]=$i
}

# merge_study NAME OUTPUT: one study of a run_study's variants
merge_study() {
  local name=$1 out=$2 parts=() i
  for ((i = 0; i < ${variants[$name]}; i++)); do parts+=("$OUT/parts/${name}_$i.json"); done
  python scripts/train_parity.py --merge "${parts[@]}" --out "$OUT/$out" 2>&1 | tee "$OUT/${out%.json}.log" \
      || status=1
}

if wanted parity; then run_study parity 1 "" exact softmax:64 softmax:256 softmax:256@250 relu:256; fi
if wanted features; then run_study features 0 "" exact softmax:256 softmax:512 softmax:1024; fi
if wanted conv; then run_study conv 0 "short_conv=4" exact softmax:64 softmax:256 softmax:1024 relu:256; fi
if wanted context; then run_study context 0 "context=1024 batch_size=16" exact softmax:64 softmax:256 softmax:512; fi
if wanted window; then
  run_study window 0 "" exact softmax:256w64
  run_study window_context 0 "context=1024 batch_size=16" exact softmax:256w64
fi
if wanted small; then
  python scripts/train_parity.py --device cuda --bf16 --steps 1500 --specs exact softmax:32 softmax:128 relu:64 \
      --set d_model=64 n_layers=2 n_heads=2 context=128 batch_size=16 lr=0.003 warmup=50 eval_every=100 \
      eval_batches=4 final_eval_batches=32 --no-layer-errors \
      --out "$OUT/parity_small.json" > "$OUT/parity_small.log" 2>&1 &
  pids+=($!)
fi
if wanted recall; then
  python scripts/train_parity.py --recall --device cuda --bf16 --steps "${RECALL_STEPS:-2000}" \
      --out "$OUT/recall.json" > "$OUT/recall.log" 2>&1 &
  pids+=($!)
fi
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
if wanted parity; then merge_study parity parity.json; fi
if wanted features; then merge_study features parity_features.json; fi
if wanted conv; then merge_study conv parity_conv.json; fi
if wanted context; then merge_study context parity_context.json; fi
if wanted window; then
  merge_study window parity_window.json
  merge_study window_context parity_window_context.json
fi
for log in parity_small.log recall.log; do
  if [ -f "$OUT/$log" ]; then tail -n 4 "$OUT/$log"; fi
done
echo "exit status $status; results in $OUT"
exit $status
