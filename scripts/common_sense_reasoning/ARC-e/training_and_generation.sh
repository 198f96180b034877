#!/bin/bash
# DnD's scripts/common_sense_reasoning/ARC-e/training_and_generation.sh with the llgbm_ext delta term in training,
# then `llgbm eval` of the generated adapters. Run it from the root of a DnD checkout, as DnD's own script, after
# `llgbm dnd overlay --dnd-root .`:
#   bash /path/to/llgbm_ext/scripts/common_sense_reasoning/ARC-e/training_and_generation.sh
# LLGBM_CONFIG picks another plugin config; LLGBM_EVAL_ARGS adds `llgbm eval` options (e.g. "--limit 200").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../dnd_steps.sh"  # llgbm_train, dnd_generate
DND_ROOT="$PWD"
LLGBM_CONFIG="${LLGBM_CONFIG:-$DND_ROOT/workspace/llgbm/configs/common_sense_reasoning.yaml}"

cd "$DND_ROOT/workspace/main"
llgbm_train tasks/common_sense_reasoning/train_qwen0.5lora_ARC-e.py 4 --llgbm-config "$LLGBM_CONFIG"

export CUDA_VISIBLE_DEVICES=0,1
# Qwen0.5B has 14 attention heads and can only parallel on 2 or 7 GPUs (DnD's note)
STEPS="1000 2000"
for step in $STEPS; do
    dnd_generate generate/qwen0.5lora_generation_common_sense_reasoning.py --eval_dataset "ARC-e$step" --test_dataset ARC-e
done

cd "$DND_ROOT"
generated=()
for step in $STEPS; do
    generated+=("./generated/common_sense_reasoning/ARC-e${step}T_on_ARC-eV")
done
# shellcheck disable=SC2086  # LLGBM_EVAL_ARGS holds several options
llgbm eval --base-model ./models/Qwen2.5-0.5B-Instruct --tasks ARC-e --data-dir ./prepare/data \
    --generated "${generated[@]}" --format letter --chat-template --use-system \
    --out ./results/llgbm/common_sense_reasoning/ARC-e ${LLGBM_EVAL_ARGS:-}
