#!/bin/bash
# DnD's scripts/math1.5B/training_and_generation.sh with the llgbm_ext delta term in training,
# then `llgbm eval` of the adapters generated for GSM8K (llgbm eval has no MATH task). Run it from
# the root of a DnD checkout, as DnD's own script, after `llgbm dnd overlay --dnd-root .`:
#   bash /path/to/llgbm_ext/scripts/math1.5B/training_and_generation.sh
# LLGBM_CONFIG picks another plugin config; LLGBM_EVAL_ARGS adds `llgbm eval` options (e.g. "--limit 200").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../dnd_steps.sh"  # llgbm_train, dnd_generate
DND_ROOT="$PWD"
LLGBM_CONFIG="${LLGBM_CONFIG:-$DND_ROOT/workspace/llgbm/configs/math1.5B.yaml}"

cd "$DND_ROOT/workspace/main"
llgbm_train tasks/math/train_qwen1.5lora_Math.py 8 --llgbm-config "$LLGBM_CONFIG"

STEPS="1000 2000 3000 4000 5000"
for test in GSM8K MATH; do
    for step in $STEPS; do
        dnd_generate generate/qwen1.5lora_generation_math.py --eval_dataset "Math1.5B$step" --test_dataset "$test"
    done
done

cd "$DND_ROOT"
generated=()
for step in $STEPS; do
    generated+=("./generated/math1.5B/Math1.5B${step}T_on_GSM8KV")
done
# shellcheck disable=SC2086  # LLGBM_EVAL_ARGS holds several options
llgbm eval --base-model ./models/Qwen2.5-1.5B-Instruct --tasks GSM8K --data-dir ./prepare/data \
    --generated "${generated[@]}" --chat-template --out ./results/llgbm/math1.5B/GSM8K ${LLGBM_EVAL_ARGS:-}
