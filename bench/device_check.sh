#!/usr/bin/env bash
# The prepared GPU check (issue 13): run once, from the repository root, on a lent CUDA machine, where
# python3 already has torch, transformers and numpy. Under 5 minutes; prints two tables (agreement of
# cuda-bf16 with cpu-fp32, and early-exit speed at batch 1/32/128). SmolLM2 joins when its converted
# folder travels with the call (carry a folder holding it, and pass its path as the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
args=()
if [[ $# -ge 1 && -d "$1" ]]; then args+=(--smollm2 "$1"); fi
timeout 290 python3 bench/device_check.py "${args[@]}" 2>&1 | tee "${OUT:-/tmp}/device_check.log"
