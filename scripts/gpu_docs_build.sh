#!/usr/bin/env bash
# Build the docs on a GPU machine with the gallery executed there (the attention benchmark measures
# for real), then collect what it recorded.
#
# Run from the repository root. Sphinx and the docs theme may come as wheels in .whl/ (installed into
# /tmp/site); the results JSON, the 32 figures (one tar file) and the build log are copied to $OUT.
# RANDATTN_GIT_REVISION names the source revision in the results where the tree has no .git.
set -euo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/docs-build-out}"
mkdir -p "$out"
log="$out/docs-build.log"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c "import sys, torch, sphinx, sphinx_gallery, furo; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'sphinx', sphinx.__version__, \
'sphinx-gallery', sphinx_gallery.__version__, 'furo', furo.__version__)"
} 2>&1 | tee "$log"

start=$(date +%s)
status=0
python3 -m sphinx -W --keep-going -b html docs docs/_build/html 2>&1 | tee -a "$log" || status=$?
echo "docs build: exit ${status}, $(( $(date +%s) - start )) s" | tee -a "$log"

cp docs/_data/benchmark/attention.json "$out/" 2>/dev/null || echo "no results file" | tee -a "$log"
figures=$(for n in $(seq 67 98); do [ -f "docs/_static/$n.png" ] && echo "docs/_static/$n.png"; done)
# shellcheck disable=SC2086
tar -cf "$out/benchmark-figures.tar" docs/_data/benchmark/attention.json $figures
if [ -f docs/sg_execution_times.rst ]; then cp docs/sg_execution_times.rst "$out/"; fi
exit "$status"
