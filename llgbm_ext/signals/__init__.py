"""Behaviour signals: how a generated adapter's behaviour is compared with its teacher's.

  base.py    BehaviourSignal (the interface the trainer and the DnD loss hook use), SignalResult,
             prepare_targets (teacher targets through the DeltaCache, split over processes)
  delta.py   DeltaSignal: delta activations on generic, task-grounded or mixed probes, per probe or averaged
  kl.py      KLSignal: next-token distributions at the answer positions of each task's training inputs

``build_signals`` makes the signals a run asks for by name (``loss.signals``), with their λ.
"""

from __future__ import annotations

import os
from typing import Sequence

from torch import nn

from ..data.teacher_set import TeacherSet
from .base import BehaviourSignal, SignalError, SignalResult, prepare_targets
from .delta import DeltaSignal, probe_sets
from .kl import KLSignal

SIGNALS = ("delta", "kl")


def build_signals(names: Sequence[str], model: nn.Module, tokenizer, teachers: TeacherSet, tasks: Sequence[str], *,
                  base_model: str, model_dir: str | os.PathLike, delta, kl, delta_kind: str = "nmse", seed: int = 0,
                  source_tasks: Sequence[str] | None = None) -> dict[str, BehaviourSignal]:
    """The named signals on one base model for the adapters of ``tasks``; ``delta`` and ``kl`` are the
    run's ``DeltaConfig`` and ``KLConfig``."""
    unknown = [n for n in names if n not in SIGNALS]
    if unknown:
        raise SignalError(f"unknown behaviour signal {unknown[0]!r}: use {', '.join(SIGNALS)}")
    signals: dict[str, BehaviourSignal] = {}
    common = dict(base_model=base_model, model_dir=model_dir)
    for name in names:
        if name == "delta":
            signals[name] = DeltaSignal.for_teachers(model, tokenizer, teachers, tasks, probes=delta.probes,
                                                     per_task=delta.probes_per_task, reduce=delta.reduce,
                                                     kind=delta_kind, source_tasks=source_tasks,
                                                     chat_template=delta.chat_template, layer=delta.layer, **common)
        else:
            signals[name] = KLSignal(model, tokenizer, teachers, tasks, examples=kl.examples, per_step=kl.per_step,
                                     top_k=kl.top_k, max_length=kl.max_length, seed=seed, **common)
    return signals


__all__ = ["SIGNALS", "BehaviourSignal", "DeltaSignal", "KLSignal", "SignalError", "SignalResult", "build_signals",
           "prepare_targets", "probe_sets"]
