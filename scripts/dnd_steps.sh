#!/bin/bash
# The two DnD steps of scripts/<family>/.../training_and_generation.sh; sourced by them, not run.
# Both are called from DnD's workspace/main, in a DnD checkout whose folder may have any name.
#
#   llgbm_train SCRIPT N [--llgbm-config FILE.yaml] [--set KEY=VALUE ...]
#       DnD's training script with the llgbm_ext hooks: DnD's own `bash launch_multi.sh SCRIPT N --llgbm ...`
#       when patches/llgbm-flag.patch is applied to it, else scripts/launch_llgbm.sh (the same launch).
#   dnd_generate SCRIPT [ARGS ...]
#       a DnD generation script, run by `python -m llgbm_ext.dnd.runner --no-hooks`: DnD's generation
#       scripts find the repository root only in a folder named Drag-and-Drop-LLMs (unless
#       patches/fix-repo-root.patch is applied); the runner links that name to the checkout when needed.
LLGBM_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

llgbm_train() {
    local script="$1" processes="$2"
    shift 2
    if grep -q "llgbm_ext.dnd.runner" launch_multi.sh 2>/dev/null; then
        bash launch_multi.sh "$script" "$processes" --llgbm "$@"
    else
        bash "$LLGBM_SCRIPTS/launch_llgbm.sh" "$script" "$processes" "$@"
    fi
}

dnd_generate() {
    python -m llgbm_ext.dnd.runner --no-hooks "$@"
}
