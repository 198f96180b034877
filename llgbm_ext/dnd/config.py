"""``DnDPluginConfig``: what the DnD hooks add to a DnD training run (λs, probes, base model, cadence).

Read from YAML (``llgbm_ext.config``: unknown keys and wrong types are one-line errors naming the file
and key), with ``key=value`` overrides. Paths that start with ``./`` or ``../`` (``base_model``,
``layout``, a probe file, ``cache_dir``) are taken relative to the DnD repository root, the directory
DnD's scripts ``chdir`` to, so the same file works from any working directory; other values are names
(``tiny``, ``qwen2.5-0.5b``, ``domain:math``, a cached hub id) or absolute paths::

    lambda_weight: 1.0          # λw: DnD's own token criterion
    lambda_delta: 0.1           # λ of the delta signal; 0 with no other signal turns the term off
    signals: [delta]            # behaviour signals: delta and/or kl (llgbm_ext.signals)
    base_model: ./models/Qwen2.5-0.5B-Instruct
    layout: auto                # the DnD script's (its tokenizer), else the base model's
    probes: ./workspace/llgbm/probes/commonsense.json   # or task / mixed (needs train_inputs)
    train_inputs: ./workspace/llgbm/inputs              # <Dataset>.json training inputs (task probes, kl)
    delta_every: 1
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, load_config
from ..losses import DELTA_LOSS_KINDS
from ..models.registry import DTYPES
from ..training.config import KLConfig


@dataclass
class DnDPluginConfig:
    """Settings of the llgbm_ext hooks in a DnD training run.

    Attributes:
        lambda_weight: λw, weight of DnD's token criterion (computed as ``TokenMSELoss``).
        lambda_delta: λ of the ``delta`` signal; with every signal's λ at 0 the hooks train exactly
            DnD's objective.
        signals: the behaviour signals of the term (``llgbm_ext.signals``): ``delta`` and/or ``kl``.
        lambda_kl: λ of the ``kl`` signal.
        delta_kind: delta loss, one of ``llgbm_ext.losses.DELTA_LOSS_KINDS``.
        delta_every: compute the delta term on every N-th training step (other steps: λw·L_weight only).
        delta_rows: batch rows per step that get a delta term (the first ones; DnD shuffles); 0 = all.
        base_model: the frozen base model the generated LoRAs are applied to ('tiny', a directory or a
            cached hub id); DnD keeps its models in ``./models/``.
        layout: LoRA/token layout of the generator's output: ``auto`` (the layout of the DnD script's
            tokenizer, else the base model's), a named layout or a model directory. The runner refuses
            one that disagrees with the script's tokenizer, ``token_size`` or generator output.
        probes: probe set, a built-in name (``generic``, ``domain:commonsense`` ...), a JSON file, or
            ``task`` / ``mixed`` (each data set's own / every data set's training inputs).
        probes_per_task, reduce: training inputs per data set of task probes; ``mean`` | ``none`` (per probe).
        train_inputs: folder of ``<Dataset>.json`` training inputs (the format ``llgbm teachers`` writes
            per task), needed by task probes and the ``kl`` signal.
        kl: the ``kl`` signal's settings (examples, per_step, top_k, max_length).
        dtype: base model dtype; ``auto`` = bfloat16 on CUDA, float32 otherwise.
        cache_dir: DeltaCache directory for teacher deltas; empty = ``$LLGBM_CACHE/delta_cache``.
        teacher_batch_size: teacher adapters per base-model forward while precomputing.
        hooks: names of the hooks to install (``llgbm_ext.dnd.hooks.HOOKS``); empty = all.
    """

    lambda_weight: float = 1.0
    lambda_delta: float = 0.1
    signals: tuple[str, ...] = ("delta",)
    lambda_kl: float = 0.0
    delta_kind: str = "nmse"
    delta_every: int = 1
    delta_rows: int = 0
    base_model: str = "./models/Qwen2.5-0.5B-Instruct"
    layout: str = "auto"
    probes: str = "domain:commonsense"
    probes_per_task: int = 8
    reduce: str = "mean"
    train_inputs: str = ""
    kl: KLConfig = field(default_factory=KLConfig)
    dtype: str = "auto"
    cache_dir: str = ""
    teacher_batch_size: int = 8
    hooks: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("lambda_weight", "lambda_delta", "lambda_kl"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        from ..signals import SIGNALS

        if not self.signals or any(s not in SIGNALS for s in self.signals) or len(set(self.signals)) != len(self.signals):
            raise ConfigError(f"signals must list distinct names of {', '.join(SIGNALS)}, got {list(self.signals)}")
        if self.lambda_weight == 0 and not self.uses_delta:
            raise ConfigError("lambda_weight and every signal's lambda are 0: nothing to train")
        if self.reduce not in ("mean", "none"):
            raise ConfigError(f"reduce must be mean or none, got {self.reduce!r}")
        if self.probes_per_task < 1:
            raise ConfigError(f"probes_per_task must be >= 1, got {self.probes_per_task}")
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

    def signal_lambdas(self) -> dict[str, float]:
        """λ of each configured behaviour signal."""
        return {name: self.lambda_kl if name == "kl" else self.lambda_delta for name in self.signals}

    @property
    def uses_delta(self) -> bool:
        """Whether the behaviour term is on (some signal has λ > 0)."""
        return any(value > 0 for value in self.signal_lambdas().values())

    @property
    def needs_train_inputs(self) -> bool:
        """Task-grounded probes and the kl signal run on each data set's training inputs."""
        return "kl" in self.signals or ("delta" in self.signals and self.probes in ("task", "mixed"))


def load_plugin_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> DnDPluginConfig:
    """The plugin config from a YAML file (or the defaults) with ``key=value`` overrides."""
    return load_config(DnDPluginConfig, path, list(overrides))


def under_root(value: str, root: Path) -> str:
    """A path-like setting taken relative to the DnD root; names that are not paths pass through."""
    if value.startswith(("./", "../")) or value in (".", ".."):
        return str((root / value).resolve())
    return value
