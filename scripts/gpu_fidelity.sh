#!/usr/bin/env bash
# Record the fidelity studies on one GPU (about 10 minutes on an H100):
#   training parity of a character LM on the CPython standard library sources (same architecture,
#   steps, data order and seeds per study): the full model (2500 steps each: exact vs softmax m in
#   {64, 256}, softmax m=256 redrawn every 250 steps, relu m=256) and a smaller one (1500 steps:
#   exact vs softmax m in {32, 128} vs relu m=64); multi-query associative recall (exact vs softmax
#   m in {64, 256} vs relu m=64, 4 and 8 pairs with every key asked, 2000 steps of 1024 sequences
#   each: the RecallConfig defaults; about 5 minutes).
# Results are written as JSON to $OUT (default: ./fidelity-out); copy parity.json, parity_small.json
# and recall.json to docs/_data/fidelity/.
# Usage: OUT=/path/to/dir bash scripts/gpu_fidelity.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-fidelity-out}"
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python scripts/train_parity.py --device cuda --bf16 --steps ${PARITY_STEPS:-2500} \
    --out "$OUT/parity.json" 2>&1 | tee "$OUT/parity.log" || status=1
# the same comparison with a smaller model (2 layers of 2 heads, d_model 64, context 128)
python scripts/train_parity.py --device cuda --bf16 --steps 1500 --specs exact softmax:32 softmax:128 relu:64 \
    --set d_model=64 n_layers=2 n_heads=2 context=128 batch_size=16 lr=0.003 warmup=50 eval_every=100 \
    eval_batches=4 final_eval_batches=32 --no-layer-errors \
    --out "$OUT/parity_small.json" 2>&1 | tee "$OUT/parity_small.log" || status=1
python scripts/train_parity.py --recall --device cuda --bf16 --steps ${RECALL_STEPS:-2000} \
    --out "$OUT/recall.json" 2>&1 | tee "$OUT/recall.log" || status=1
echo "exit status $status; results in $OUT/parity.json $OUT/parity_small.json $OUT/recall.json"
exit $status
