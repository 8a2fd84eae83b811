#!/usr/bin/env bash
# Record the fidelity studies on one GPU (about 7 minutes on an H100):
#   training parity (2500 steps each: exact vs softmax m in {64, 256}, softmax m=256 redrawn every
#   250 steps, relu m=256; character LM on the
#   CPython standard library sources, same architecture, steps, data order and seeds) and
#   multi-query associative recall (exact vs softmax m in {64, 256} vs relu m=64, 8 and 32 pairs).
# Results are written as JSON to $OUT (default: ./fidelity-out); copy parity.json and recall.json
# to docs/_data/fidelity/.
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
python scripts/train_parity.py --recall --device cuda --bf16 --steps 6000 --time-budget ${RECALL_SECONDS:-100} \
    --out "$OUT/recall.json" 2>&1 | tee "$OUT/recall.log" || status=1
echo "exit status $status; results in $OUT/parity.json $OUT/recall.json"
exit $status
