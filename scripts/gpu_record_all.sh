#!/usr/bin/env bash
# One device call that records everything the site shows from a GPU, in an order that keeps timings clean:
#   1. kernels compiled in parallel, then the attention sweep (alone on the GPU);
#   2. the docs build with the gallery executed on the GPU, beside the training-parity study
#      (training needs no clean timings);
#   3. the per-token decoding benchmark (alone on the GPU).
# Usage: OUT=dir RANDATTN_GIT_REVISION=sha bash scripts/gpu_record_all.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-/tmp/record-out}"
mkdir -p "$out"
parity_budget="${PARITY_BUDGET:-100}"
export SWEEP_TIMEOUT="${SWEEP_TIMEOUT:-300}"
export RANDATTN_SKIP_DOCS_BUILD=1
bash scripts/gpu_docs_build.sh
sweep_status=$?
unset RANDATTN_SKIP_DOCS_BUILD
python3 scripts/train_parity.py --device cuda --bf16 --steps 4000 --time-budget "$parity_budget" \
  --out "$out/parity.json" >"$out/parity.log" 2>&1 &
parity=$!
docs_status=1
if [ "$sweep_status" -eq 0 ]; then
  RANDATTN_ONLY_DOCS_BUILD=1 bash scripts/gpu_docs_build.sh
  docs_status=$?
fi
wait "$parity"
echo "parity: exit $?" | tee -a "$out/parity.log"
timeout "${DECODE_TIMEOUT:-70}" python3 scripts/bench_decode.py 2>&1 | tee "$out/bench_decode.log"
echo "sweep $sweep_status docs $docs_status"
