#!/usr/bin/env bash
# The GPU check (issue 28): one command, under 8 minutes on one H100/H200, nothing downloaded.
#   bash bench/gpu.sh            # on a GPU machine with bolaco installed (see the device notes in docs/benchmarks.md)
#   bash bench/gpu.sh --cpu      # its smallest size on a CPU, so that it cannot rot
# Prints: per stage at 8B width (2 and 4 blocks, bfloat16): seconds and peak memory against `bolaco plan`, apply
# against one evaluation, memory above the weights at both depths; then a complete 1B-width, 16-block, 40-trial
# study (collect, bases, search with prefetch, refit, export, reload, LoRA in bfloat16) end to end.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
[ -x "$PY" ] || PY=python
if [ "${1:-}" = "--cpu" ]; then
  $PY scale.py --width tiny --blocks 1 2 --calibration 4 --search 2 --dtype float32 --device cpu
  $PY study_e2e.py --width tiny --blocks 2 --trials 4 --dtype float32 --device cpu --seq-len 128
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  $PY scale.py --width 8b --blocks 2 4 --calibration 64 --seq-len 2048 --search 16 --batch-size 8 \
      --dtype bfloat16 --device cuda --trials 5
  $PY study_e2e.py --width 1b --blocks 16 --trials 40 --dtype bfloat16 --device cuda
fi
