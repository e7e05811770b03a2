#!/usr/bin/env bash
# The GPU measurement of issue 17 in one script: the ~2.2B Idefics3-shaped model in bf16, sides (a) ours
# padding-free with the fastest attention, (b) ours with the dense mask, (c) transformers' Idefics3 padded,
# on OBELICS-like and Cauldron-like mixes of 8,192-token rows, regional compile off then on.
# One packed row per step (no activation checkpointing here: 8k tokens of the 1.7B decoder fit an H100).
# Usage: bash bench/gpu_training.sh [extra gpu_training.py arguments]   (about 10-20 minutes on an H100)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for compile in "" "--compile"; do
  for mix in obelics cauldron; do
    python bench/gpu_training.py --device cuda --dtype bfloat16 --shape 2b --mix "$mix" \
      --rows 1 --steps 3 --repeats 3 $compile "$@"
  done
done
