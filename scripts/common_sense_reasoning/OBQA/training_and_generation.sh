#!/bin/bash
# DnD's scripts/common_sense_reasoning/OBQA/training_and_generation.sh with the llgbm_ext delta term in training,
# then `llgbm eval` of the generated adapters. Run it from the root of a DnD checkout, as DnD's own script, after
# `llgbm dnd overlay --dnd-root .`:
#   bash /path/to/llgbm_ext/scripts/common_sense_reasoning/OBQA/training_and_generation.sh
# LLGBM_CONFIG picks another plugin config; LLGBM_EVAL_ARGS adds `llgbm eval` options (e.g. "--limit 200").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../dnd_steps.sh"  # llgbm_train, dnd_generate
DND_ROOT="$PWD"
LLGBM_CONFIG="${LLGBM_CONFIG:-$DND_ROOT/workspace/llgbm/configs/common_sense_reasoning.yaml}"

cd "$DND_ROOT/workspace/main"
llgbm_train tasks/common_sense_reasoning/train_qwen0.5lora_OBQA.py 4 --llgbm-config "$LLGBM_CONFIG"

STEPS="1000 2000 3000"
for step in $STEPS; do
    dnd_generate generate/qwen0.5lora_generation_common_sense_reasoning.py --eval_dataset "OBQA$step" --test_dataset OBQA
done

cd "$DND_ROOT"
generated=()
for step in $STEPS; do
    generated+=("./generated/common_sense_reasoning/OBQA${step}T_on_OBQAV")
done
# shellcheck disable=SC2086  # LLGBM_EVAL_ARGS holds several options
llgbm eval --base-model ./models/Qwen2.5-0.5B-Instruct --tasks OBQA --data-dir ./prepare/data \
    --generated "${generated[@]}" --format letter --chat-template --use-system \
    --out ./results/llgbm/common_sense_reasoning/OBQA ${LLGBM_EVAL_ARGS:-}
