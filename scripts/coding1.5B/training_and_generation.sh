#!/bin/bash
# DnD's scripts/coding1.5B/training_and_generation.sh with the llgbm_ext delta term in training,
# then DnD's HumanEval generation and evaluation (llgbm eval has no coding task). Run it from the
# root of a DnD checkout, as DnD's own script, after `llgbm dnd overlay --dnd-root .`:
#   bash /path/to/llgbm_ext/scripts/coding1.5B/training_and_generation.sh
# LLGBM_CONFIG picks another plugin config.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../dnd_steps.sh"  # llgbm_train, dnd_generate
DND_ROOT="$PWD"
LLGBM_CONFIG="${LLGBM_CONFIG:-$DND_ROOT/workspace/llgbm/configs/coding1.5B.yaml}"

cd "$DND_ROOT/workspace/main"
llgbm_train tasks/coding/train_qwen1.5lora_Coding.py 8 --llgbm-config "$LLGBM_CONFIG"

for step in 500 1000 1500 2000 2500; do
    dnd_generate generate/qwen1.5lora_generation_coding.py --eval_dataset "Coding1.5B$step" --test_dataset Human_Eval
done
