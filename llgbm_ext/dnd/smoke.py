"""Data of the plugin's CPU smoke task: tiny LoRA checkpoint folders, prompts and criterion weights in DnD's formats.

The smoke task (``workspace_overrides/main/tasks/llgbm_smoke/train_tinylora_Smoke.py``) trains DnD's
own ``HyperConvDecoderModel_FullCond`` on LoRAs of the embedded ``tiny`` base model, so the whole
DnD training path runs on a CPU in seconds. ``ensure_smoke_data(root)`` builds, once and atomically,

    <root>/data/llgbm_smoke/checkpoints/<task>/<step>.safetensors   (DnD flat files, PEFT keys, bf16)
    <root>/data/llgbm_smoke/prompts/<task>_train.json               (DnD's prompt records)
    <root>/data/llgbm_smoke/criterion_weights/<task>/criterion_weight.pt

Each task's checkpoints are one synthetic trajectory (a random adapter drifting a little per step),
like DnD's folders of consecutive optimizer steps; the prompts are short task-specific questions.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from ..atomic import build_once
from ..lora.criterion_weights import criterion_weights, save_criterion_weight
from ..lora.adapters import save_dnd_checkpoint
from ..lora.factors import random_factors, state_dict_from_factors
from ..lora.layout import TINY

SMOKE_DIR = Path("data") / "llgbm_smoke"
SMOKE_TASKS = ("add", "capital", "sentiment")
STEPS_PER_TASK = 6

_COUNTRIES = ["France", "Japan", "Kenya", "Chile", "Canada", "Norway", "Egypt", "India", "Peru", "Spain", "Italy", "Ghana"]
_PHRASES = ["a wonderful film", "a dull and slow story", "great acting", "a waste of time", "truly moving",
            "badly written", "a joy to watch", "boring from start to end", "clever and funny", "painfully long"]


def smoke_prompts(task: str, count: int = 24, seed: int = 0) -> list[str]:
    rng = random.Random(f"{task}-{seed}")
    if task == "add":
        return [f"What is {rng.randint(1, 99)} plus {rng.randint(1, 99)}?" for _ in range(count)]
    if task == "capital":
        return [f"What is the capital of {rng.choice(_COUNTRIES)}? Answer with one word." for _ in range(count)]
    return [f"Is this review positive or negative: {rng.choice(_PHRASES)}?" for _ in range(count)]


def _build(out: Path) -> None:
    for index, task in enumerate(SMOKE_TASKS):
        generator = torch.Generator().manual_seed(1000 + index)
        start = random_factors(TINY, generator=generator, std=0.02)
        drift = random_factors(TINY, generator=generator, std=0.002)
        folder = out / "checkpoints" / task
        folder.mkdir(parents=True)
        for step in range(STEPS_PER_TASK):
            factors = {p: (a + step * da, b + step * db) for (p, (a, b)), (da, db) in zip(start.items(), drift.values())}
            save_dnd_checkpoint(state_dict_from_factors(factors, TINY), folder / f"{step + 1}.safetensors", TINY,
                                dtype=torch.bfloat16)
        weights = criterion_weights(sorted(folder.iterdir()), TINY, progress=False)
        save_criterion_weight(weights, out / "criterion_weights" / task / "criterion_weight.pt")
        records = [{"prompt": p, "response": "", "system": ""} for p in smoke_prompts(task)]
        (out / "prompts").mkdir(exist_ok=True)
        (out / "prompts" / f"{task}_train.json").write_text(json.dumps(records, indent=4) + "\n")


def ensure_smoke_data(root: str | os.PathLike) -> Path:
    """Build the smoke data under ``<root>/data/llgbm_smoke`` unless it exists; returns that folder."""
    return build_once(Path(root) / SMOKE_DIR, _build)
