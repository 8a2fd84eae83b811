#!/usr/bin/env bash
# Record the attention benchmark on a GPU and build the docs with the gallery executed there.
#
# Run from the repository root. Sphinx and the docs theme may come as wheels in .whl/ (installed into
# /tmp/site). Steps:
#   1. the sweep (python -m randattn.benchmark sweep), stopped after SWEEP_TIMEOUT seconds (default
#      420); it writes every finished point to docs/_data/benchmark/attention.json at once, so a
#      later run given that file back resumes where this one stopped;
#   2. once the sweep is complete, the docs build with warnings as errors: the gallery runs on the
#      GPU, finds the finished sweep of the same setup, and draws the 32 figures from it.
# Copied to $OUT: attention.json, benchmark-figures.tar (the JSON and docs/_static/67..98.png),
# docs-build.log and sg_execution_times.rst. RANDATTN_GIT_REVISION names the source revision in the
# results where the tree has no .git. Exit status 0 only when the sweep finished and the docs built.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/docs-build-out}"
mkdir -p "$out"
log="$out/docs-build.log"
results=docs/_data/benchmark/attention.json

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

collect() {
  cp "$results" "$out/" 2>/dev/null
  local figures
  figures=$(for n in $(seq 67 98); do [ -f "docs/_static/$n.png" ] && echo "docs/_static/$n.png"; done)
  # shellcheck disable=SC2086
  tar -cf "$out/benchmark-figures.tar" "$results" $figures 2>/dev/null
  [ -f docs/sg_execution_times.rst ] && cp docs/sg_execution_times.rst "$out/"
  return 0
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton, sphinx, sphinx_gallery, furo; print('python', \
sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', \
torch.cuda.is_available(), 'sphinx', sphinx.__version__, 'sphinx-gallery', \
sphinx_gallery.__version__, 'furo', furo.__version__)"
} 2>&1 | tee -a "$log"

if [ -z "${RANDATTN_ONLY_DOCS_BUILD:-}" ]; then
start=$(date +%s)
python3 -m randattn.benchmark prewarm --processes 12 2>&1 | tee -a "$log"
echo "prewarm: $(( $(date +%s) - start )) s" | tee -a "$log"
start=$(date +%s)
timeout "${SWEEP_TIMEOUT:-420}" python3 -m randattn.benchmark sweep --output "$results" 2>&1 | tee -a "$log"
sweep_status=$?
echo "sweep: exit ${sweep_status}, $(( $(date +%s) - start )) s" | tee -a "$log"
if [ "$sweep_status" -ne 0 ]; then
  collect
  echo "the sweep did not finish: put $out/attention.json back at $results and run again to resume" \
    | tee -a "$log"
  exit 1
fi
fi
if [ -n "${RANDATTN_SKIP_DOCS_BUILD:-}" ]; then collect; exit 0; fi

start=$(date +%s)
python3 -m sphinx -W --keep-going -b html docs docs/_build/html 2>&1 | tee -a "$log"
status=$?
echo "docs build: exit ${status}, $(( $(date +%s) - start )) s" | tee -a "$log"
collect
exit "$status"
