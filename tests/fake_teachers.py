"""A small teacher set written by code, for tests that need one without training teachers."""

import json
from pathlib import Path

import torch

from llgbm_ext.data.teacher_set import write_manifest
from llgbm_ext.lora.adapters import save_dnd_checkpoint, save_peft_adapter
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout


FORMAT = {"answer_style": "option", "chat_template": False, "use_system": False, "separator": "\nAnswer:"}


def write_fake_teachers(root, tasks=("add_1", "add_2", "add_3"), per_task=2, seed=0) -> Path:
    """Per task, ``per_task`` snapshots around one random adapter, with its own condition prompts and
    training inputs (``<task>/train_inputs.json``)."""
    root = Path(root)
    layout = get_layout("tiny")
    g = torch.Generator().manual_seed(seed)
    adapters, info = [], {}
    for task in tasks:
        centre = state_dict_from_factors(random_factors(layout, generator=g, std=0.05), layout)
        for i in range(per_task):
            state = {k: v + 0.005 * torch.randn(v.shape, generator=g) for k, v in centre.items()}
            rel = f"{task}/{task}_{i:03d}"
            save_peft_adapter(state, root / rel, layout, base_model_name_or_path="tiny",
                              extra_json={"prompts.json": {"task": task, "prompts": []}})
            save_dnd_checkpoint(state, root / "data" / "fake" / task / f"{i}.safetensors", layout)
            adapters.append({"name": f"{task}_{i:03d}", "task": task, "path": rel, "step": i,
                             "dnd_file": f"data/fake/{task}/{i}.safetensors"})
        words = task.replace("_", " ")
        inputs = [{"context": f"{words}: {n} and {n + 2}\nAnswer:", "answer": f" {n + 1}"} for n in range(24)]
        (root / task / "train_inputs.json").write_text(json.dumps({"task": task, "format": FORMAT, "inputs": inputs}))
        info[task] = {"kind": "exact", "family": "fake", "prompts": [f"{words}: {n} and {n + 2}" for n in range(24)],
                      "format": FORMAT, "train_inputs": f"{task}/train_inputs.json"}
    write_manifest(root, "tiny", layout, info, adapters)
    return root
