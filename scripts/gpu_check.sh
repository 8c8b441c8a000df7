#!/usr/bin/env bash
# One command for a machine with one CUDA GPU, offline, from a source checkout, in at most 9 minutes:
# a speed table of the base model (bf16/fp16, eager/compiled on batches of varying shape), then
# Multi30k EN->DE trained in the time left, with its test BLEU. Uses the python (and torch) already
# installed: PYTHON=... to choose one. Packages it lacks are installed offline from
# wheels/pyX.Y (`make wheels PYVER=X.Y` on a machine with PyPI) into runs/gpu_check/site-pyX.Y
# (GPU_CHECK_SITE=DIR to choose), never into that python's own environment.
# Usage: scripts/gpu_check.sh --data DIR [--out results.jsonl] [--minutes 9] [--run-dir DIR]
#        scripts/gpu_check.sh --cpu-smoke --data DIR   (the same logic, tiny, on the CPU: make test runs it)
set -euo pipefail
export GPU_CHECK_STARTED="${GPU_CHECK_STARTED:-$(date +%s.%N)}"  # the --minutes budget counts from here
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
SITE="${GPU_CHECK_SITE:-runs/gpu_check/site-py$VER}"
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
NEEDED="numpy pyyaml sentencepiece sacrebleu tqdm"
if ! "$PY" -c "import torch, numpy, yaml, sentencepiece, sacrebleu, tqdm" 2>/dev/null; then
  if [ -d "wheels/py$VER" ]; then
    echo "gpu_check: installing $NEEDED from wheels/py$VER into $SITE (offline)" >&2
    mkdir -p "$SITE"
    if "$PY" -m pip --version >/dev/null 2>&1; then
      "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "wheels/py$VER" \
        --target "$SITE" $NEEDED
    else  # no pip: a wheel is a zip of what goes into site-packages
      for w in "wheels/py$VER"/*.whl; do "$PY" -m zipfile -e "$w" "$SITE"; done
    fi
  fi
fi
exec "$PY" scripts/gpu_check.py "$@"
