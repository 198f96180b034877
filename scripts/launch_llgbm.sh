#!/bin/bash
# DnD's launch_multi.sh with the llgbm_ext hooks, for DnD checkouts without patches/llgbm-flag.patch.
# From DnD's workspace/main, exactly like `bash launch_multi.sh SCRIPT N --llgbm [...]` after the patch:
#   bash /path/to/llgbm_ext/scripts/launch_llgbm.sh tasks/common_sense_reasoning/train_qwen0.5lora_ARC-e.py 4 \
#       [--llgbm] [--llgbm-config FILE.yaml] [--set KEY=VALUE ...]
# The accelerate flags are DnD's, except the port (20000-39999: DnD's RANDOM % 20000 can hit ports below 1024).
# LLGBM_LAUNCH_FLAGS replaces the device flags "--multi_gpu --mixed_precision=bf16", e.g.
#   LLGBM_LAUNCH_FLAGS="--cpu --mixed_precision=no" ... SCRIPT 1      (one process on a CPU)
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash launch_llgbm.sh SCRIPT NUM_PROCESSES [--llgbm-config FILE.yaml] [--set KEY=VALUE ...]" >&2
    exit 2
fi
EXEC_FILE="$1"
NUM_GPUS="$2"
shift 2
if [ "${1:-}" = "--llgbm" ]; then
    shift  # accepted for copy-paste from the patched launcher
fi
export NUM_PROCESSES="$NUM_GPUS"

# shellcheck disable=SC2086  # the device flags are several words
accelerate launch \
    ${LLGBM_LAUNCH_FLAGS:---multi_gpu --mixed_precision=bf16} \
    --num_processes="$NUM_GPUS" \
    --main_process_port=$((RANDOM % 20000 + 20000)) \
    --num_machines=1 \
    --dynamo_backend=no \
    -m llgbm_ext.dnd.runner "$@" "$EXEC_FILE"
