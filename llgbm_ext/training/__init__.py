"""Standalone generator training: config, step-seeded batches, the trainer, checkpoints and plots."""

from .config import DataConfig, DeltaConfig, LossConfig, OptimConfig, TrainingConfig
from .trainer import Trainer

__all__ = ["DataConfig", "DeltaConfig", "LossConfig", "OptimConfig", "Trainer", "TrainingConfig"]
