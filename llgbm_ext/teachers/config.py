"""Settings of a teacher run: what is trained, how, and the budgets ``--quick`` and the defaults stand for.

One trajectory per task: ``warmup_steps`` steps of LoRA training, then ``snapshots`` snapshots, one
every ``snapshot_every`` steps (DnD's data collection saves consecutive checkpoints of one run per
data set). The learning rate warms up linearly over ``lr_warmup`` steps, then follows a cosine to
``min_lr_ratio`` of its peak at the last step.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

from ..errors import LLGBMError
from ..lora.layout import PROJECTIONS

AnswerStyle = Literal["cloze", "option", "letter"]
Objective = Literal["lm", "choice", "lm+choice"]
OBJECTIVES = ("lm", "choice", "lm+choice")
Init = Literal["shared", "per-task"]
INIT_KINDS = ("shared", "per-task")
ValidationFrom = Literal["train", "dataset"]
VALIDATION_FROM = ("train", "dataset")


class TeacherError(LLGBMError):
    """A teacher run cannot start or continue (bad settings, empty data, a run with other settings)."""


@dataclass(frozen=True)
class TeacherConfig:
    """A teacher run.

    Attributes:
        base_model: ``tiny``, ``smollm2-135m``, a model directory or a cached hub id.
        tasks: task names (already expanded: no ``all`` or family names).
        data_dir: directory of DnD task files; None means the embedded synthetic suite.
        rank, alpha: LoRA rank and alpha; None: rank 8 (16 from hidden size 1536 on, as DnD's 1.5B/7B), alpha 2·rank.
        targets: adapted projections.
        answer_style: None picks ``option`` for the synthetic suite (its rank tasks need the listed
            numbers) and ``cloze`` for real tasks (what small models learn; see data.formatting).
        objective: ``lm``: cross-entropy on the gold answer's tokens; ``choice`` (multiple-choice tasks only):
            cross-entropy of the softmax over the options' scores, the rule evaluation decides by (teachers.train);
            ``lm+choice``: their sum, the lm term taken on the gold option's sequence.
        task_objectives: ``TASK=OBJECTIVE`` entries that override ``objective`` for single tasks (e.g.
            ``obqa=choice``); ``objective_of`` gives a task's objective.
        chat_template, use_system: wrap prompts in the tokenizer's chat template (with the system prompt).
        max_length: tokens per training sequence; longer ones lose the beginning of their context.
        batch_size: training sequences per task and step.
        lr, weight_decay, lr_warmup, min_lr_ratio, max_grad_norm: AdamW over the LoRA factors; gradients
            are clipped per task, as if each task were trained alone.
        warmup_steps, snapshot_every, snapshots: the trajectory (see the module docstring).
        tasks_per_group: tasks trained together in one batched forward (K).
        save_every: steps between saved training states (resume points).
        seed: initialisation and batch order.
        init: ``shared`` (default): every task's LoRA starts from one initialisation, recorded in the
            manifest and written to ``<out>/init``; ``per-task``: each task draws its own (ablations).
        max_prompts: condition prompts kept per real task (the synthetic suite has its own).
        eval_limit: test examples scored per task for the base/teacher table (None: all; 0: no evaluation).
        validation: if > 0, that many of each task's training examples are held out of training and scored in
            place of the test split (``teachers.tasks.validation_split``): for choosing settings on data that
            is not the test split.
        validation_from: where ``validation`` examples come from: ``train`` (above) or ``dataset``: the first
            ``validation`` examples of the data set's own validation split where it has one apart from its test
            split (ARC-e, ARC-c, OBQA; training keeps every training example), a slice of train elsewhere. A
            train slice need not look like test: OBQA's lm teacher gained on one and lost on test.
        probes: probe set of the teacher deltas; None: no deltas.
        delta_cache: DeltaCache directory (None: ``<out>/deltas``).
        dtype, device: of the base model.
    """

    base_model: str
    tasks: tuple[str, ...]
    data_dir: str | None = None
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] = PROJECTIONS
    answer_style: AnswerStyle | None = None
    objective: Objective = "lm"
    task_objectives: tuple[str, ...] = ()
    chat_template: bool = False
    use_system: bool = False
    max_length: int = 96
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    lr_warmup: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    warmup_steps: int = 100
    snapshot_every: int = 5
    snapshots: int = 10
    tasks_per_group: int = 32
    save_every: int = 10
    seed: int = 0
    init: Init = "shared"
    max_prompts: int = 256
    eval_limit: int | None = 128
    validation: int = 0
    validation_from: ValidationFrom = "train"
    probes: str | None = "generic"
    delta_cache: str | None = None
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "task_objectives", tuple(self.task_objectives))
        positive = ("max_length", "batch_size", "snapshot_every", "snapshots", "tasks_per_group", "save_every", "max_prompts")
        for name in positive:
            if getattr(self, name) < 1:
                raise TeacherError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "lr_warmup", "validation"):
            if getattr(self, name) < 0:
                raise TeacherError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.rank is not None and self.rank < 1:
            raise TeacherError(f"rank must be at least 1, got {self.rank}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1 or not self.max_grad_norm > 0:
            raise TeacherError("lr and max_grad_norm must be positive, weight_decay >= 0, 0 <= min_lr_ratio <= 1")
        if self.answer_style not in (None, "cloze", "option", "letter"):
            raise TeacherError(f"answer_style must be cloze, option or letter, got {self.answer_style!r}")
        if self.objective not in OBJECTIVES:
            raise TeacherError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for entry in self.task_objectives:
            task, _, objective = str(entry).partition("=")
            if objective not in OBJECTIVES:
                raise TeacherError(f"task objective {entry!r}: write TASK=OBJECTIVE with OBJECTIVE one of "
                                   f"{', '.join(OBJECTIVES)}")
            if task not in self.tasks:
                raise TeacherError(f"task objective {entry!r}: {task!r} is not one of the tasks "
                                   f"({', '.join(self.tasks)})")
        if len({str(e).partition("=")[0] for e in self.task_objectives}) != len(self.task_objectives):
            raise TeacherError(f"task objectives name a task twice: {', '.join(self.task_objectives)}")
        if self.eval_limit is not None and self.eval_limit < 0:
            raise TeacherError(f"eval_limit must not be negative, got {self.eval_limit}")
        if self.validation_from not in VALIDATION_FROM:
            raise TeacherError(f"validation_from must be train or dataset, got {self.validation_from!r}")
        if self.init not in INIT_KINDS:
            raise TeacherError(f"init must be one of {', '.join(INIT_KINDS)}, got {self.init!r}")
        if not self.tasks:
            raise TeacherError("no tasks given")
        if len(set(self.tasks)) != len(self.tasks):
            raise TeacherError(f"tasks repeat: {', '.join(self.tasks)}")

    @property
    def synthetic(self) -> bool:
        return self.data_dir is None

    @property
    def style(self) -> AnswerStyle:
        """The answer style actually used."""
        return self.answer_style or ("option" if self.synthetic else "cloze")

    def objective_of(self, task: str) -> Objective:
        """The objective ``task`` is trained with: its ``task_objectives`` entry, else ``objective``."""
        overrides = dict(str(e).partition("=")[::2] for e in self.task_objectives)
        return overrides.get(task, self.objective)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.snapshots * self.snapshot_every

    def snapshot_steps(self) -> list[int]:
        """The steps after which snapshots are taken (1-based step counts)."""
        return [self.warmup_steps + (i + 1) * self.snapshot_every for i in range(self.snapshots)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tasks=list(self.tasks), targets=list(self.targets), task_objectives=list(self.task_objectives))
        return d

    def training_digest(self) -> dict:
        """The settings a saved training state depends on; a resumed run must have the same."""
        ignored = {"save_every", "eval_limit", "probes", "delta_cache", "max_prompts", "device"}
        if self.objective == "lm":  # runs from before the choice objective existed continue under the same digest
            ignored.add("objective")
        for name in ("validation", "task_objectives"):  # and runs from before these existed
            if not getattr(self, name):
                ignored.add(name)
        if self.validation_from == "train":
            ignored.add("validation_from")
        return {k: v for k, v in self.to_dict().items() if k not in ignored}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.training_digest(), sort_keys=True).encode()).hexdigest()[:16]


# Budgets: the defaults above are the demo's (tiny model, synthetic suite, a few minutes on 2 cores).
QUICK = {"warmup_steps": 30, "snapshot_every": 2, "snapshots": 4, "eval_limit": 32}
"""``--quick``: a CI smoke run (teachers still beat the base model on most synthetic tasks)."""
