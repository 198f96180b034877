"""Teacher adapters: one LoRA trajectory per task, K tasks per forward, snapshots in DnD's and PEFT's layouts.

``train_teachers(TeacherConfig(...), out)`` is what ``llgbm teachers`` runs (``pipeline``); ``GroupTrainer``
(``train``) is the batched LoRA trainer it uses; ``train_multitask_lora`` (``multitask``) trains the multitask
LoRA baseline of comparisons with it. Those import torch and are loaded on first use, so that the CLI
starts fast.
"""

from importlib import import_module

from .config import QUICK, TeacherConfig, TeacherError

_LAZY = {"train_teachers": "pipeline", "TeacherReport": "pipeline", "GroupTrainer": "train", "init_factors": "train",
         "task_losses": "train", "expand_task_names": "tasks", "train_multitask_lora": "multitask"}

__all__ = ["QUICK", "TeacherConfig", "TeacherError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
