"""Several processes: the accelerator (DDP or DeepSpeed ZeRO) and the work each rank does.

``accelerate launch --config_file configs/accelerate/<ddp|zero2|zero3>.yaml -m llgbm_ext train ...``
starts the processes; each runs the same ``Trainer``.

* DDP: every rank holds the generator and the frozen base model; gradients are all-reduced. On a
  machine without CUDA the same config runs CPU processes that talk over gloo.
* DeepSpeed ZeRO-2: the generator's optimizer state and gradients are partitioned over the ranks;
  the frozen base model stays outside the engine, replicated.
* DeepSpeed ZeRO-3: the generator's parameters are partitioned too, and so is the frozen base model:
  it is loaded whole (the teacher deltas are computed before the engine exists), then becomes a
  submodule of the engine's module, which partitions it and gathers one layer's weights at a time
  for the Δ forward and backward (the LoRA hooks of ``FunctionalLoRA`` only read layer inputs).

Work split: each rank takes its slice of every step's global batch (``training.data``), so the
generated adapters and their behaviour-signal forwards are split across ranks. Teacher targets
missing from the DeltaCache are computed in slices by all ranks and written by rank 0 alone; the
others read them after it (``signals.base.prepare_targets``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from ..paths import cache_dir
from .config import TrainingConfig, TrainingConfigError


def uses_deepspeed() -> bool:
    """Whether ``accelerate launch`` started this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: TrainingConfig):
    """The ``Accelerator`` of this process: DDP (gloo on CPU), DeepSpeed ZeRO, or a single process."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    # delta_guided steps without a computed delta leave the generator without gradient (λw = 0)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.loss.mode == "delta_guided")]
    if uses_deepspeed():
        if cfg.device == "cpu" and torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
            raise TrainingConfigError("device=cpu with DeepSpeed on a CUDA machine: set DS_ACCELERATOR=cpu as well")
        # DeepSpeed compiles its CPU communication op on first use; keep the build with llgbm's cache
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
        if not cuda:  # accelerate picks no process-group backend without CUDA
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        cpu = False  # DeepSpeed chooses its own device
    else:
        # cpu=True makes processes started by torchrun on a CPU machine join over gloo (otherwise each
        # would silently train alone)
        cpu = not cuda
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu, kwargs_handlers=handlers)


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage of this run (0 without DeepSpeed)."""
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) if plugin is not None else 0


@contextlib.contextmanager
def whole_models(accelerator) -> Iterator[None]:
    """Models loaded inside are whole on every rank, also under ZeRO-3 (where accelerate makes
    transformers partition every model at load, whatever ``zero3_init_flag`` says)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def gathered_weights(trainable) -> dict[str, torch.Tensor]:
    """ZeRO-3: the trained weights (not the frozen base) gathered from their partitions, on every rank
    (a collective: all ranks must call it)."""
    import deepspeed

    params = [p for name, p in trainable.named_parameters() if not name.startswith("base.")]
    with deepspeed.zero.GatheredParameters(params):
        return {k: v.detach().cpu().clone() for k, v in trainable.trained_state().items()}


def configure_deepspeed(accelerator, cfg: TrainingConfig) -> None:
    """Fill in the DeepSpeed settings that follow from the run config (call before ``prepare``)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if zero_stage(accelerator) not in (1, 2, 3):
        raise TrainingConfigError("DeepSpeed config: zero_optimization.stage must be 1, 2 or 3 (for plain data "
                                  "parallelism use configs/accelerate/ddp.yaml)")
    if zero_stage(accelerator) == 3 and cfg.delta.gradient_checkpointing:
        raise TrainingConfigError("delta.gradient_checkpointing does not work with ZeRO-3's partitioned base model")
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise TrainingConfigError(f"DeepSpeed config: remove {owned!r}; the run config's optim section sets it")
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size // accelerator.num_processes
    ds["gradient_clipping"] = float(cfg.optim.max_grad_norm)  # the engine clips inside accelerator.backward
