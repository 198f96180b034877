"""Generate adapters with a trained generator: prompts -> LoRA, batched, written as PEFT and DnD files."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import load_config
from ..errors import LLGBMError
from ..generator.build import LoraGenerator, build_generator
from ..generator.text_encoder import EmbeddingCache, TextEncoder, TextEncoderConfig
from ..lora.adapters import save_dnd_checkpoint, save_peft_adapter
from ..lora.factors import LoraFactors, state_dict_from_factors
from ..lora.layout import LoraLayout
from .checkpoint import RUN_INFO, CheckpointError, latest_checkpoint, load_module_weights
from .config import TrainingConfig


@functools.lru_cache(maxsize=4)
def shared_encoder(config: TextEncoderConfig) -> TextEncoder:
    """One encoder per configuration and process, on the on-disk embedding cache that training fills:
    generators loaded one after another (a comparison's runs) load its model once, encode a prompt once."""
    return TextEncoder(config, EmbeddingCache())


@dataclass
class TrainedGenerator:
    """A generator restored from a run, with what it needs to condition and to describe its adapters."""

    generator: LoraGenerator
    encoder: TextEncoder
    layout: LoraLayout
    base_model: str
    config: TrainingConfig

    @torch.no_grad()
    def factors(self, prompt_lists: list[list[str]], batch_size: int = 16) -> LoraFactors:
        """LoRA factors (K, L, ...) for K prompt lists, generated in batches of ``batch_size``."""
        level = self.config.generator.condition_level
        parts = []
        for start in range(0, len(prompt_lists), batch_size):
            condition = self.encoder.condition(prompt_lists[start : start + batch_size], level)
            parts.append(self.generator.lora_factors(condition))
        return {p: tuple(torch.cat([f[p][j] for f in parts]) for j in (0, 1)) for p in self.layout.targets}


def load_trained_generator(path: str | os.PathLike) -> TrainedGenerator:
    """Restore from a run folder (its latest checkpoint) or from one checkpoint folder inside a run."""
    path = Path(path)
    run = path if (path / "config.yaml").is_file() else path.parent.parent
    if not (run / "config.yaml").is_file() or not (run / RUN_INFO).is_file():
        raise CheckpointError(f"{path}: not a training run (needs config.yaml and {RUN_INFO})")
    checkpoint = path if (path / "state.json").is_file() else latest_checkpoint(run)
    if checkpoint is None:
        raise CheckpointError(f"{run}: has no checkpoint yet")
    cfg = load_config(TrainingConfig, run / "config.yaml")
    info = json.loads((run / RUN_INFO).read_text())
    layout = LoraLayout.from_dict(info["layout"])
    generator = build_generator(cfg.generator, layout)
    generator.load_state_dict(load_module_weights(checkpoint, "generator"))
    return TrainedGenerator(generator.eval(), shared_encoder(cfg.encoder), layout, info["base_model"], cfg)


def read_prompts(path: str | os.PathLike) -> tuple[str, list[str]]:
    """(task name, prompts) from a JSON list of strings, {"prompts": [...], "task": ...}, or a DnD task file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LLGBMError(f"{path}: no such prompts file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LLGBMError(f"{path}: not valid JSON ({e})") from None
    name = path.stem
    if isinstance(data, dict):
        name = str(data.get("task") or name)
        data = data.get("prompts")
    if isinstance(data, list) and data and all(isinstance(r, dict) and "prompt" in r for r in data):
        data = [r["prompt"] for r in data]
    if not isinstance(data, list) or not data or not all(isinstance(p, str) and p for p in data):
        raise LLGBMError(f"{path}: expected a non-empty list of prompt strings (or records with 'prompt')")
    return name, data


def sample_prompts(prompts: list[str], n: int, samples: int, seed: int) -> list[list[str]]:
    """``samples`` draws of ``n`` prompts each (without replacement where possible), seeded."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return [[prompts[j] for j in rng.choice(len(prompts), size=n, replace=n > len(prompts))] for _ in range(samples)]


def write_generated(trained: TrainedGenerator, named_prompts: dict[str, list[str]], out: str | os.PathLike,
                    samples: int = 1, seed: int = 0) -> list[Path]:
    """Generate ``samples`` adapters per task in one batched pass; write PEFT dirs and DnD flat files.

    PEFT: ``<out>/<task>`` (or ``<out>/<task>_<s>`` for several samples) with prompts.json;
    DnD: ``<out>/dnd/<task>/<s>.safetensors``.
    """
    out = Path(out)
    n = trained.config.generator.num_prompts
    jobs = [(task, s, chosen) for task, prompts in named_prompts.items()
            for s, chosen in enumerate(sample_prompts(prompts, n, samples, seed))]
    factors = trained.factors([chosen for _, _, chosen in jobs])
    written = []
    for k, (task, s, chosen) in enumerate(jobs):
        one = {p: (a[k], b[k]) for p, (a, b) in factors.items()}
        state = state_dict_from_factors(one, trained.layout)
        name = task if samples == 1 else f"{task}_{s}"
        written.append(save_peft_adapter(state, out / name, trained.layout, base_model_name_or_path=trained.base_model,
                                         extra_json={"prompts.json": {"task": task, "prompts": chosen, "generated": True}}))
        save_dnd_checkpoint(state, out / "dnd" / task / f"{s}.safetensors", trained.layout)
    return written
