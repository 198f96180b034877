"""``DnDPluginConfig``: what the DnD hooks add to a DnD training run (λs, probes, base model, cadence).

Read from YAML (``llgbm_ext.config``: unknown keys and wrong types are one-line errors naming the file
and key), with ``key=value`` overrides. Paths that start with ``./`` or ``../`` (``base_model``,
``layout``, a probe file, ``cache_dir``) are taken relative to the DnD repository root, the directory
DnD's scripts ``chdir`` to, so the same file works from any working directory; other values are names
(``tiny``, ``qwen2.5-0.5b``, ``domain:math``, a cached hub id) or absolute paths::

    lambda_weight: 1.0          # λw: DnD's own token criterion
    lambda_delta: 0.1           # λd: behaviour term; 0 turns it off (no base model is loaded)
    base_model: ./models/Qwen2.5-0.5B-Instruct
    layout: qwen2.5-0.5b
    probes: ./workspace/llgbm/probes/commonsense.json
    delta_every: 1
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, load_config
from ..losses import DELTA_LOSS_KINDS
from ..models.registry import DTYPES


@dataclass
class DnDPluginConfig:
    """Settings of the llgbm_ext hooks in a DnD training run.

    Attributes:
        lambda_weight: λw, weight of DnD's token criterion (computed as ``TokenMSELoss``).
        lambda_delta: λd, weight of the delta loss; 0 trains exactly DnD's objective through the hooks.
        delta_kind: delta loss, one of ``llgbm_ext.losses.DELTA_LOSS_KINDS``.
        delta_every: compute the delta term on every N-th training step (other steps: λw·L_weight only).
        delta_rows: batch rows per step that get a delta term (the first ones; DnD shuffles); 0 = all.
        base_model: the frozen base model the generated LoRAs are applied to ('tiny', a directory or a
            cached hub id); DnD keeps its models in ``./models/``.
        layout: LoRA/token layout of the generator's output (a named layout or a model directory).
        probes: probe set, a built-in name (``generic``, ``domain:commonsense`` ...) or a JSON file.
        dtype: base model dtype; ``auto`` = bfloat16 on CUDA, float32 otherwise.
        cache_dir: DeltaCache directory for teacher deltas; empty = ``$LLGBM_CACHE/delta_cache``.
        teacher_batch_size: teacher adapters per base-model forward while precomputing.
        hooks: names of the hooks to install (``llgbm_ext.dnd.hooks.HOOKS``); empty = all.
    """

    lambda_weight: float = 1.0
    lambda_delta: float = 0.1
    delta_kind: str = "nmse"
    delta_every: int = 1
    delta_rows: int = 0
    base_model: str = "./models/Qwen2.5-0.5B-Instruct"
    layout: str = "qwen2.5-0.5b"
    probes: str = "domain:commonsense"
    dtype: str = "auto"
    cache_dir: str = ""
    teacher_batch_size: int = 8
    hooks: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("lambda_weight", "lambda_delta"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.lambda_weight == 0 and self.lambda_delta == 0:
            raise ConfigError("lambda_weight and lambda_delta are both 0: nothing to train")
        if self.lambda_weight == 0 and self.delta_every != 1:
            raise ConfigError("lambda_weight = 0 needs delta_every = 1 (steps without a delta term would train nothing)")
        if self.delta_kind not in DELTA_LOSS_KINDS:
            raise ConfigError(f"delta_kind must be one of {list(DELTA_LOSS_KINDS)}, got {self.delta_kind!r}")
        for name in ("delta_every", "teacher_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.delta_rows < 0:
            raise ConfigError(f"delta_rows must be >= 0 (0 = all rows), got {self.delta_rows}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def uses_delta(self) -> bool:
        return self.lambda_delta > 0


def load_plugin_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> DnDPluginConfig:
    """The plugin config from a YAML file (or the defaults) with ``key=value`` overrides."""
    return load_config(DnDPluginConfig, path, list(overrides))


def under_root(value: str, root: Path) -> str:
    """A path-like setting taken relative to the DnD root; names that are not paths pass through."""
    if value.startswith(("./", "../")) or value in (".", ".."):
        return str((root / value).resolve())
    return value
