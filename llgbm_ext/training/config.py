"""The training config: one dataclass per concern, assembled in ``TrainingConfig`` (LLGBM's name).

Loaded from YAML with ``key=value`` overrides (``llgbm_ext.config``); the resolved config is saved as
``<out_dir>/config.yaml`` next to every run. Fixes to LLGBM's ``TrainingConfig`` (contract §4.6,
§6.19): no hidden ``use_small_model`` switch that overwrites fields, the base model and LoRA rank come
from the teacher set (so teacher and generator cannot disagree), and the modes are explicit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import LLGBMError
from ..generator.build import GeneratorConfig
from ..generator.text_encoder import TextEncoderConfig

Mode = Literal["weight_only", "multitask", "delta_only", "delta_guided"]


class TrainingConfigError(LLGBMError):
    """Training settings that contradict each other."""


@dataclass(frozen=True)
class DataConfig:
    """Which teachers the generator learns from.

    Attributes:
        teachers: teacher directory written by ``llgbm teachers`` (manifest.json).
        held_out: tasks left out of training (leave-one-task-out evaluation, as DnD).
        tasks: train on these tasks only (default: all minus ``held_out``).
        num_workers: DataLoader workers that load and tokenize teacher adapters ahead of the step.
    """

    teachers: str = "runs/demo/teachers"
    held_out: tuple[str, ...] = ()
    tasks: tuple[str, ...] | None = None
    num_workers: int = 0


@dataclass(frozen=True)
class LossConfig:
    """The loss ``λw·L_weight + λd·L_delta`` and its modes.

    Attributes:
        mode: ``weight_only`` (DnD's baseline), ``multitask`` (weights and deltas), ``delta_only``,
            ``delta_guided`` (a delta head every step, a computed Δ every ``delta_every`` steps).
        weight_loss: ``token`` (DnD's criterion-weighted token MSE), ``ab`` (raw A/B MSE), ``delta_w``
            (gauge-invariant ΔW MSE).
        criterion_weight: DnD ``criterion_weight.pt`` for the token loss (default: uniform).
        lambda_weight, lambda_delta: the λs of multitask (``delta_only`` uses λw = 0).
        lambda_delta_warmup: λd ramps linearly from 0 over this many steps (0: constant).
        delta_kind: ``nmse`` (2 − 2cos), ``cosine`` or ``mse`` (relative); all independent of H.
        delta_every: ``delta_guided``: compute a real Δ every N steps.
        lambda_pred, lambda_computed, lambda_consistency: ``DeltaGuidedLoss`` weights.
        head_dim: width of the delta head.
        noise: DnD's noise_enhance: N(0, σ²) added to the condition (and 0.1σ to the target tokens).
    """

    mode: Mode = "multitask"
    weight_loss: Literal["token", "ab", "delta_w"] = "token"
    criterion_weight: str | None = None
    lambda_weight: float = 1.0
    lambda_delta: float = 1.0
    lambda_delta_warmup: int = 0
    delta_kind: Literal["nmse", "cosine", "mse"] = "nmse"
    delta_every: int = 4
    lambda_pred: float = 1.0
    lambda_computed: float = 1.0
    lambda_consistency: float = 0.5
    head_dim: int = 128
    noise: float = 1e-4

    @property
    def uses_weight(self) -> bool:
        return self.mode in ("weight_only", "multitask") or (self.mode == "delta_guided" and self.lambda_weight > 0)

    @property
    def uses_delta(self) -> bool:
        return self.mode != "weight_only"


@dataclass(frozen=True)
class DeltaConfig:
    """How Δ is computed for the delta losses (the teachers' deltas use the same settings).

    Attributes:
        probes: ``generic`` | ``domain:math|code|commonsense`` | a probe JSON file.
        chat_template: wrap probes in the tokenizer's chat template.
        layer: hidden-state index; -1 = final norm output.
        gradient_checkpointing: checkpoint the base model's layers on the delta path.
        cache: delta cache directory (default ``<teachers>/deltas``).
        batch_size: teacher adapters per forward when filling the cache.
    """

    probes: str = "generic"
    chat_template: bool = False
    layer: int = -1
    gradient_checkpointing: bool = False
    cache: str | None = None
    batch_size: int = 8


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and a cosine decay to a floor.

    Attributes:
        lr, weight_decay, betas: AdamW (8-bit AdamW from bitsandbytes when ``eight_bit`` and CUDA).
        warmup_steps: linear warm-up from lr/warmup_steps.
        min_lr_ratio: the cosine ends at lr·min_lr_ratio and stays there (DnD's had no floor).
        max_grad_norm: gradient clipping (0 disables).
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eight_bit: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    """A generator training run.

    Attributes:
        out_dir: run folder: config.yaml, metrics.jsonl, loss_curves.png, checkpoints/.
        steps, batch_size: optimizer steps and teacher adapters per step (global, over all processes).
        seed: seeds sampling (each step's batch is a function of (seed, step)) and the generator.
        dtype: base model dtype on the delta path (``float32``; ``bfloat16`` on GPUs).
        mixed_precision: ``no`` or ``bf16`` (autocast; GPU).
        device: ``auto`` (accelerate's choice), ``cpu`` or ``cuda``.
        save_every: checkpoint every N steps (and at the end); keep_checkpoints: how many to keep.
    """

    out_dir: str = "runs/train"
    steps: int = 200
    batch_size: int = 4
    seed: int = 0
    dtype: str = "float32"
    mixed_precision: Literal["no", "bf16"] = "no"
    device: str = "auto"
    save_every: int = 50
    keep_checkpoints: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    delta: DeltaConfig = field(default_factory=DeltaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self):
        for name in ("steps", "batch_size", "save_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise TrainingConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.loss.delta_every <= 0:
            raise TrainingConfigError(f"loss.delta_every must be positive, got {self.loss.delta_every}")
        if self.loss.mode == "multitask" and self.loss.lambda_weight <= 0 and self.loss.lambda_delta <= 0:
            raise TrainingConfigError("multitask needs lambda_weight > 0 or lambda_delta > 0")
        if self.encoder.max_length != self.generator.max_length and self.generator.kind == "hyperconv":
            raise TrainingConfigError(
                f"encoder.max_length ({self.encoder.max_length}) must equal generator.max_length "
                f"({self.generator.max_length}): it is the L of the token-level condition"
            )
