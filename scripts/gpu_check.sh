#!/usr/bin/env bash
# One command for a machine with one CUDA GPU, offline, from a source checkout, in at most 9 minutes:
# a speed table of the base model (bf16/fp16, eager/compiled), then Multi30k EN->DE trained in the time
# left, with its test BLEU. Uses the python (and torch) already installed: PYTHON=... to choose one.
# Usage: scripts/gpu_check.sh --data DIR [--out results.jsonl] [--minutes 9]
#        scripts/gpu_check.sh --cpu-smoke --data DIR   (the same logic, tiny, on the CPU: make test runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
