"""Behavioural checks of generated adapters in delta space: like their own task's teachers, and only theirs?

Given Δ of generated adapters (one row each, labelled with the task they were generated for) and Δ
of teacher adapters (many per task), every generated Δ is compared by cosine with each teacher task:

  * ``cos_own``: cosine with its own task's teachers;
  * ``cos_others``: the mean over the *other* tasks of the cosine with that task's teachers (each task
    counts once, however many teachers it has);
  * ``specificity = cos_own − cos_others``;
  * ``top1``: whether the nearest teacher task is its own.

``cos_own`` alone is not enough: teachers that share an answer format have Δ cosines up to 0.97 with
each other, so a generator that outputs "the average teacher" scores a high ``cos_own`` for every
task. Specificity and top-1 only reward a Δ that points at its own task rather than at all of them.

The teacher side of a task is either the mean Δ of its teachers (``reference="task_mean"``) or its
teachers one by one (``"per_adapter"``: the task's cosine is the mean cosine with its teachers, and
the nearest task is the task of the single nearest teacher).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from .scoring import EvalError

Reference = Literal["task_mean", "per_adapter"]


def _matrix(values: Tensor | np.ndarray, what: str) -> Tensor:
    x = torch.as_tensor(np.asarray(values) if not isinstance(values, Tensor) else values).detach().float().cpu()
    if x.dim() != 2 or x.shape[0] == 0:
        raise EvalError(f"{what}: expected a non-empty (N, H) matrix of deltas, got shape {tuple(x.shape)}")
    return x


def cosine_matrix(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
    """Cosines between the rows of a (N, H) and b (M, H): (N, M) fp32; a zero row has cosine 0."""
    a, b = _matrix(a, "a"), _matrix(b, "b")
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def task_means(deltas: Tensor | np.ndarray, tasks: Sequence[str]) -> tuple[list[str], Tensor]:
    """Mean Δ per task: (task names in order of first appearance, (T, H))."""
    deltas = _matrix(deltas, "deltas")
    if len(tasks) != deltas.shape[0]:
        raise EvalError(f"{len(tasks)} task labels for {deltas.shape[0]} deltas")
    names = list(dict.fromkeys(tasks))
    index = torch.tensor([names.index(t) for t in tasks])
    sums = torch.zeros(len(names), deltas.shape[1]).index_add_(0, index, deltas)
    return names, sums / torch.bincount(index, minlength=len(names))[:, None].float()


@dataclass
class AdapterBehaviour:
    """One generated adapter against the teacher tasks."""

    label: str
    task: str
    cos_own: float
    cos_others: float
    specificity: float
    nearest_task: str
    top1: bool


@dataclass
class TaskBehaviour:
    """The generated adapters of one task, averaged."""

    task: str
    adapters: int
    cos_own: float
    cos_others: float
    specificity: float
    top1: float  # fraction of the task's generated adapters whose nearest teacher task is their own


@dataclass
class BehaviourReport:
    """Per-adapter and per-task rows, overall means (over adapters and over tasks) and the (N, T)
    cosines of every generated adapter with every teacher task (columns ``teacher_tasks``)."""

    reference: str
    teacher_tasks: list[str]
    cosines: Tensor  # (N generated, T teacher tasks)
    adapters: list[AdapterBehaviour]
    tasks: list[TaskBehaviour]
    overall: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "reference": self.reference,
            "teacher_tasks": self.teacher_tasks,
            "cosines": self.cosines.tolist(),
            "adapters": [asdict(a) for a in self.adapters],
            "tasks": [asdict(t) for t in self.tasks],
            "overall": self.overall,
        }


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def delta_specificity(
    generated: Tensor | np.ndarray,
    generated_tasks: Sequence[str],
    teachers: Tensor | np.ndarray,
    teacher_tasks: Sequence[str],
    reference: Reference = "task_mean",
    labels: Sequence[str] | None = None,
) -> BehaviourReport:
    """Compare generated Δ (N, H) with teacher Δ (M, H); see the module docstring for the measures."""
    generated, teachers = _matrix(generated, "generated"), _matrix(teachers, "teachers")
    if len(generated_tasks) != generated.shape[0]:
        raise EvalError(f"{len(generated_tasks)} task labels for {generated.shape[0]} generated deltas")
    if generated.shape[1] != teachers.shape[1]:
        raise EvalError(f"generated deltas have width {generated.shape[1]}, teacher deltas {teachers.shape[1]}")
    labels = list(labels) if labels is not None else [f"generated{i}" for i in range(generated.shape[0])]
    names, means = task_means(teachers, teacher_tasks)
    if len(names) < 2:
        raise EvalError("specificity needs teachers of at least two tasks")
    unknown = sorted(set(generated_tasks) - set(names))
    if unknown:
        raise EvalError(f"no teachers for the task(s) of generated adapters: {', '.join(unknown)}")

    if reference == "task_mean":
        cosines = cosine_matrix(generated, means)  # (N, T)
        nearest = cosines.argmax(1).tolist()
    elif reference == "per_adapter":
        per_teacher = cosine_matrix(generated, teachers)  # (N, M)
        _, cosines = task_means(per_teacher.T, teacher_tasks)  # (T, N): mean cosine over each task's teachers
        cosines = cosines.T
        nearest = [names.index(teacher_tasks[j]) for j in per_teacher.argmax(1).tolist()]
    else:
        raise EvalError(f"reference must be 'task_mean' or 'per_adapter', got {reference!r}")

    own = torch.tensor([names.index(t) for t in generated_tasks])  # (N,)
    cos_own = cosines.gather(1, own[:, None])[:, 0]  # (N,)
    cos_others = (cosines.sum(1) - cos_own) / (len(names) - 1)  # (N,)
    rows = [
        AdapterBehaviour(label, task, float(co), float(ct), float(co - ct), names[n], n == int(o))
        for label, task, co, ct, n, o in zip(labels, generated_tasks, cos_own, cos_others, nearest, own)
    ]
    tasks = []
    for task in dict.fromkeys(generated_tasks):
        mine = [r for r in rows if r.task == task]
        tasks.append(TaskBehaviour(task, len(mine), _mean([r.cos_own for r in mine]), _mean([r.cos_others for r in mine]),
                                   _mean([r.specificity for r in mine]), _mean([float(r.top1) for r in mine])))
    overall = {
        "adapters": len(rows),
        "cos_own": _mean([r.cos_own for r in rows]),
        "cos_others": _mean([r.cos_others for r in rows]),
        "specificity": _mean([r.specificity for r in rows]),
        "top1": _mean([float(r.top1) for r in rows]),
        "specificity_task_macro": _mean([t.specificity for t in tasks]),
        "top1_task_macro": _mean([t.top1 for t in tasks]),
    }
    return BehaviourReport(reference, names, cosines, rows, tasks, overall)
