#!/usr/bin/env bash
# Record the fidelity studies on one GPU. Every model trains in its own process, side by side (each is
# small and leaves most of the GPU idle): on an H100 the two parity studies took about 3 minutes this
# way; the recall study, whose models train on 1024 sequences per step, about 5 minutes on its own.
#   training parity of a character LM on the CPython standard library sources (same architecture,
#   steps, data order and seeds per study): the full model (2500 steps each: exact vs softmax m in
#   {64, 256}, softmax m=256 redrawn every 250 steps, relu m=256; one process per variant, merged
#   with --merge), the same model at softmax m in {256, 512, 1024} beside a second exact run, the
#   same model with a short causal convolution in every block (exact vs softmax m in {64, 256, 1024}
#   vs relu m=256), and a
#   smaller one (1500 steps: exact vs softmax m in {32, 128} vs relu m=64);
#   multi-query associative recall (exact vs softmax m in {64, 256} vs relu m=64, 4 and 8 pairs with
#   every key asked, 2000 steps of 1024 sequences each: the RecallConfig defaults).
# Results are written as JSON to $OUT (default: ./fidelity-out); copy parity.json, parity_features.json,
# parity_conv.json, parity_small.json and recall.json to docs/_data/fidelity/.
# Usage: OUT=/path/to/dir bash scripts/gpu_fidelity.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-fidelity-out}"
mkdir -p "$OUT/parts"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
specs=(exact softmax:64 softmax:256 softmax:256@250 relu:256)
pids=()
for i in "${!specs[@]}"; do
  extra=()
  [ "$i" -gt 0 ] && extra=(--no-layer-errors)  # the trained-layer errors come with the exact model
  python scripts/train_parity.py --device cuda --bf16 --steps ${PARITY_STEPS:-2500} --specs "${specs[$i]}" \
      "${extra[@]}" --out "$OUT/parts/parity_$i.json" > "$OUT/parts/parity_$i.log" 2>&1 &
  pids+=($!)
done
# the same model with more features, in one run of its own: exact vs softmax m in {256, 512, 1024}
fspecs=(exact softmax:256 softmax:512 softmax:1024)
for i in "${!fspecs[@]}"; do
  python scripts/train_parity.py --device cuda --bf16 --steps ${PARITY_STEPS:-2500} --specs "${fspecs[$i]}" \
      --no-layer-errors --out "$OUT/parts/features_$i.json" > "$OUT/parts/features_$i.log" 2>&1 &
  pids+=($!)
done
# the same model with a short causal convolution (kernel 4) in front of every block's attention
cspecs=(exact softmax:64 softmax:256 softmax:1024 relu:256)
for i in "${!cspecs[@]}"; do
  python scripts/train_parity.py --device cuda --bf16 --steps ${PARITY_STEPS:-2500} --specs "${cspecs[$i]}" \
      --set short_conv=4 --no-layer-errors --out "$OUT/parts/conv_$i.json" > "$OUT/parts/conv_$i.log" 2>&1 &
  pids+=($!)
done
# the same comparison with a smaller model (2 layers of 2 heads, d_model 64, context 128)
python scripts/train_parity.py --device cuda --bf16 --steps 1500 --specs exact softmax:32 softmax:128 relu:64 \
    --set d_model=64 n_layers=2 n_heads=2 context=128 batch_size=16 lr=0.003 warmup=50 eval_every=100 \
    eval_batches=4 final_eval_batches=32 --no-layer-errors \
    --out "$OUT/parity_small.json" > "$OUT/parity_small.log" 2>&1 &
pids+=($!)
python scripts/train_parity.py --recall --device cuda --bf16 --steps ${RECALL_STEPS:-2000} \
    --out "$OUT/recall.json" > "$OUT/recall.log" 2>&1 &
pids+=($!)
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
parts=()
for i in "${!specs[@]}"; do parts+=("$OUT/parts/parity_$i.json"); done
python scripts/train_parity.py --merge "${parts[@]}" --out "$OUT/parity.json" 2>&1 | tee "$OUT/parity.log" || status=1
fparts=()
for i in "${!fspecs[@]}"; do fparts+=("$OUT/parts/features_$i.json"); done
python scripts/train_parity.py --merge "${fparts[@]}" --out "$OUT/parity_features.json" 2>&1 \
    | tee "$OUT/parity_features.log" || status=1
cparts=()
for i in "${!cspecs[@]}"; do cparts+=("$OUT/parts/conv_$i.json"); done
python scripts/train_parity.py --merge "${cparts[@]}" --out "$OUT/parity_conv.json" 2>&1 \
    | tee "$OUT/parity_conv.log" || status=1
tail -n 4 "$OUT/parity_small.log" "$OUT/recall.log"
echo "exit status $status; results in $OUT/parity.json $OUT/parity_features.json $OUT/parity_conv.json $OUT/parity_small.json $OUT/recall.json"
exit $status
