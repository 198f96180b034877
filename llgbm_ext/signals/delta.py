"""The Δ signal: delta activations of the generated adapter against its teacher's, per probe or averaged.

Probe sources (``DeltaConfig.probes``):
  * ``generic``, ``domain:<name>`` or a JSON file: one fixed set for every adapter (the paper's Δ);
  * ``task``: each adapter is probed on ``probes_per_task`` training inputs of its own task, in the
    teachers' answer format (the context up to where the answer starts), so Δ is read where the
    teacher's behaviour on the task is decided;
  * ``mixed``: one shared set of ``probes_per_task`` training inputs from every training task.
Probes come from the train split only (``<task>/train_inputs.json`` of the teacher set).

``reduce``: ``mean`` compares the probe-averaged Δ (H,), as the paper defines Δ; ``none`` compares Δ
probe by probe (P, H) and averages the loss, so what differs on one probe is not averaged away by the
others. Teacher and student are always computed on exactly the same rows (``DeltaComputer``).
"""

from __future__ import annotations

import os
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from ..data.teacher_set import TeacherSet
from ..delta.cache import DeltaContext
from ..delta.deltas import DeltaComputer
from ..delta.teacher import delta_context
from ..delta.probes import ProbeSet, get_probe_set
from ..lora.factors import LoraFactors
from ..losses.delta import DeltaLoss
from .base import BehaviourSignal, SignalError, SignalResult, rank, together

TASK_PROBES = ("task", "mixed")


def task_inputs(teachers: TeacherSet, task: str, n: int, what: str) -> list[str]:
    """The first ``n`` training contexts of a task; too few is an error naming the task."""
    contexts = [r["context"] for r in teachers.train_inputs(task)]
    if len(contexts) < n:
        raise SignalError(f"{what}: task {task!r} has {len(contexts)} training inputs, fewer than the {n} asked for")
    return contexts[:n]


def probe_sets(spec: str, teachers: TeacherSet, tasks: Sequence[str], per_task: int,
               source_tasks: Sequence[str] | None = None, chat_template: bool = False) -> tuple[list[ProbeSet], dict[str, int]]:
    """The probe sets of ``spec`` and the set each task's adapters use.

    ``source_tasks``: the tasks a ``mixed`` set draws from (default ``tasks``; the training tasks, when
    held-out tasks are evaluated on the training probes)."""
    what = f"delta.probes={spec}"
    if spec == "task":
        sets = [ProbeSet(f"task:{t}", tuple(task_inputs(teachers, t, per_task, what))) for t in tasks]
        return sets, {t: i for i, t in enumerate(tasks)}
    if spec == "mixed":
        texts = [c for t in (source_tasks or tasks) for c in task_inputs(teachers, t, per_task, what)]
        return [ProbeSet("mixed", tuple(texts))], {t: 0 for t in tasks}
    return [get_probe_set(spec, chat_template=True if chat_template else None)], {t: 0 for t in tasks}


class DeltaSignal(BehaviourSignal):
    """Δ of generated adapters against their teachers' Δ on the same probes (see the module docstring).

    Args:
        computer: the ``DeltaComputer`` (base model, probe sets, layer).
        base_model, model_dir: the base model's name and directory (cache context).
        set_of_task: task -> probe set of its adapters; None: set 0 for every task.
        reduce, kind: ``mean`` | ``none``, and the ``DeltaLoss`` kind.
        context: a fixed cache context for set 0 (instead of one derived from ``model_dir``).
    Build one for a teacher set with ``DeltaSignal.for_teachers``.
    """

    name = "delta"

    def __init__(self, computer: DeltaComputer, *, base_model: str, model_dir: str | os.PathLike,
                 set_of_task: dict[str, int] | None = None, reduce: Literal["mean", "none"] = "mean",
                 kind: str = "nmse", context: DeltaContext | None = None):
        super().__init__(computer.model, computer.layout, base_model, model_dir)
        if reduce not in ("mean", "none"):
            raise SignalError(f"delta.reduce must be mean or none, got {reduce!r}")
        self.computer, self.set_of_task, self.reduce = computer, set_of_task, reduce
        self.criterion = DeltaLoss(kind)
        self._context = context

    @classmethod
    def for_teachers(cls, model: nn.Module, tokenizer, teachers: TeacherSet, tasks: Sequence[str], *,
                     probes: str = "generic", per_task: int = 8, source_tasks: Sequence[str] | None = None,
                     chat_template: bool = False, layer: int = -1, **kwargs) -> "DeltaSignal":
        """The signal for the adapters of ``tasks`` of a teacher set, on probes ``probes`` (see ``probe_sets``)."""
        sets, set_of_task = probe_sets(probes, teachers, list(tasks), per_task, source_tasks, chat_template)
        computer = DeltaComputer(model, tokenizer, teachers.layout, sets, layer=layer)
        return cls(computer, set_of_task=set_of_task, **kwargs)

    def context(self, input_set: int) -> DeltaContext:
        if self._context is not None and input_set == 0:
            return self._context
        return delta_context(self.computer, self.base_model, self.model_dir, input_set, self.fingerprint)

    def compute_targets(self, paths, sets, progress=False) -> Tensor:
        return self.computer.teacher_probe_deltas(paths, sets, progress=progress)  # (N, P, H)

    def prepare(self, paths, tasks, cache, batch_size=8, progress=True) -> Tensor:
        """Teacher deltas (N, P, H). First the per-probe base activation of every probe set used is cached
        (written by rank 0) and read back, so every process subtracts the same bytes."""
        for s in sorted(set(self.sets_of(tasks))):
            ctx = self.context(s)
            with together():  # a failure on rank 0 stops every rank, not only rank 0
                if rank() == 0 and cache.get_base_activation(ctx) is None:
                    cache.put_base_activation(ctx, self.computer.base_states(s).cpu())
            stored = cache.get_base_activation(ctx)
            if stored is not None:
                self.computer.set_base_states(s, torch.from_numpy(stored))
        return super().prepare(paths, tasks, cache, batch_size, progress)

    def loss(self, factors: LoraFactors, targets: Tensor, sets: Tensor, step: int) -> SignalResult:
        student = self.computer.probe_deltas(factors, sets)  # (K, P, H)
        mean_student, mean_teacher = student.mean(1), targets.mean(1)  # (K, H)
        result = self.criterion(mean_student, mean_teacher) if self.reduce == "mean" else self.criterion(student, targets)
        return SignalResult(result, (mean_student, mean_teacher))

    @torch.no_grad()
    def deltas(self, factors: LoraFactors, tasks: Sequence[str]) -> Tensor:
        """Probe-averaged Δ (K, H) of K adapters meant for ``tasks`` (evaluation)."""
        return self.computer.deltas(factors, self.sets_of(tasks))
