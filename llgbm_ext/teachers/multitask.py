"""The multitask LoRA baseline: one LoRA trained on the mixture of a teacher set's training tasks.

It is what Text-to-LoRA compares generators with: a single adapter that has seen every training task
and none of the held-out ones. It is trained as the teachers are (``GroupTrainer``: PEFT's LoRA, AdamW,
warm-up + cosine, per-adapter clipping), each task in its teachers' answer format and with their
objective (manifest), from the teachers' shared initial adapter when the manifest records one. Every
step draws the same number of sequences from every task, so large tasks do not outweigh small ones.

The adapter is a PEFT directory with the settings it was trained with (``settings.json``) and its
loss per step (``losses.json``); it is trained again only when those settings change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..data.formatting import PromptFormat
from ..data.records import Task
from ..data.teacher_set import TeacherSet
from ..lora.adapters import WEIGHTS_NAME, load_adapter, save_peft_adapter
from ..lora.factors import factors_from_state_dict
from .batches import Batch, EncodedTask, encode_task, make_batch, step_indices
from .config import TeacherConfig, TeacherError
from .train import GroupTrainer, task_losses

NAME = "multitask_lora"
CHOICE_ROWS = 24  # option rows per forward under the choice objective (SmolLM2-135M: a few GB)
LM_CHUNKS = 2  # forwards per step under the lm objective, sequences sorted by length (less padding)
SETTINGS = "settings.json"
LOSSES = "losses.json"


def task_format(teachers: TeacherSet, task: str) -> PromptFormat:
    """The answer format the teachers of ``task`` were trained with (manifest), default cloze/option."""
    record = teachers.tasks.get(task, {}).get("format")
    return PromptFormat(**record) if record else PromptFormat()


def task_objective(teachers: TeacherSet, task: str) -> str:
    """The objective the teachers of ``task`` were trained with (manifest; ``lm`` for manifests without one)."""
    return teachers.tasks.get(task, {}).get("objective", "lm")


def training_task(name: str, data_dir: str | None, validation: int = 0) -> Task:
    """A task's training split: the synthetic suite's, or a DnD-format file in ``data_dir``; less the
    ``validation`` examples its teachers were scored on (``validation_split``)."""
    from ..data.synthetic import TASK_FAMILIES, get_synthetic_task
    from .tasks import validation_split

    if name in TASK_FAMILIES:
        return validation_split(get_synthetic_task(name), validation)
    if data_dir is None:
        raise TeacherError(f"task {name!r} is not synthetic: give data_dir (DnD-format task files)")
    from ..data.dnd_format import load_task

    return validation_split(load_task(Path(data_dir), name, splits=("train",)), validation)


def mixture(tasks: list[EncodedTask], name: str = NAME) -> EncodedTask:
    """The sequences of several tasks as one task, right-padded to one width (task by task, in order)."""
    width = max(t.ids.shape[1] for t in tasks)
    ids = torch.cat([F.pad(t.ids, (0, width - t.ids.shape[1]), value=t.pad_id) for t in tasks])
    mixed = EncodedTask(name, ids, torch.cat([t.lengths for t in tasks]), torch.cat([t.num_target for t in tasks]),
                        tasks[0].pad_id, sum(t.skipped for t in tasks))
    if any(t.option_rows is not None for t in tasks):  # choice objective: option rows counted from the mixture's start
        if any(t.option_rows is None for t in tasks):
            raise TeacherError("the multitask LoRA mixes tasks encoded for the choice objective with others")
        offsets = np.cumsum([0] + [len(t.lengths) for t in tasks]).tolist()
        starts = [t.option_rows[:-1] + o for t, o in zip(tasks, offsets)]
        mixed.option_rows = torch.cat(starts + [torch.tensor([offsets[-1]])])
        mixed.gold = torch.cat([t.gold + o for t, o in zip(tasks, offsets)])
    return mixed


class MixtureTrainer(GroupTrainer):
    """One LoRA on the mixture of ``tasks``; a step takes ``config.batch_size`` sequences of every task,
    drawn per task as a teacher's are (a function of seed, task and step). Tasks of different objectives
    (``config.objective_of``) form one mixture per objective, each run in its own forwards; the step's loss
    is their mean weighted by each objective's share of the tasks (one objective: its loss as is)."""

    def __init__(self, model, layout, tasks: list[EncodedTask], config: TeacherConfig, state_dir):
        objectives = [config.objective_of(t.name) for t in tasks]
        self.parts = {o: [t for t, each in zip(tasks, objectives) if each == o] for o in dict.fromkeys(objectives)}
        mixtures = [mixture(parts) for parts in self.parts.values()]
        super().__init__(model, layout, mixtures, config, state_dir, names=[NAME])

    def indices(self, parts: list[EncodedTask], step: int) -> np.ndarray:
        """Rows of ``step``'s examples in the mixture of ``parts``."""
        offsets = np.cumsum([0] + [len(t) for t in parts[:-1]])
        return np.concatenate([offset + step_indices(len(t), self.config.batch_size, self.config.seed, t.name, step)
                               for offset, t in zip(offsets, parts)])

    def batch(self, step: int, objective: str | None = None) -> Batch:
        """``step``'s examples of the tasks of ``objective`` (default: the first) in one batch."""
        objective = objective or next(iter(self.parts))
        mixed = self.tasks[list(self.parts).index(objective)]
        return make_batch([mixed], [self.indices(self.parts[objective], step)]).to(self.device)

    def backward(self, step: int) -> Tensor:
        """The (1,) loss of ``step``, its gradient accumulated, in chunks whose mean losses are weighted by their
        share of what the loss averages over: the same loss and gradient as one forward. Under the lm objective
        (a mean over answer tokens) the sequences, sorted by length, go through in LM_CHUNKS forwards, each padded
        to its own longest (on the default demo's 49-task mixture, 10% fewer tokens than one forward). Under the
        choice objectives (a mean over examples) the examples go through in chunks of at most CHOICE_ROWS option
        rows (one sequence per option of every task would not fit in memory)."""
        total = torch.zeros(1, device=self.device)
        tasks = sum(len(parts) for parts in self.parts.values())
        for (objective, parts), mixed in zip(self.parts.items(), self.tasks):
            indices = self.indices(parts, step)
            if objective == "lm":
                order = np.argsort(mixed.lengths[torch.from_numpy(indices)].numpy(), kind="stable")
                chunks = [indices[np.sort(c)] for c in np.array_split(order, min(LM_CHUNKS, len(order)))]
                counted = mixed.num_target  # the loss averages over answer tokens
            else:
                options = (mixed.option_rows[1:] - mixed.option_rows[:-1])[torch.from_numpy(indices)]
                chunk = ((torch.cumsum(options, 0) - 1) // CHOICE_ROWS).numpy()  # consecutive, ≤ CHOICE_ROWS rows
                chunks = [indices[chunk == c] for c in np.unique(chunk)]
                counted = torch.ones(len(mixed), dtype=torch.long)  # the loss averages over examples
            whole = int(counted[torch.from_numpy(indices)].sum())
            for part in chunks:
                batch = make_batch([mixed], [part]).to(self.device)
                loss = task_losses(self.model, self.lora, self.factors, batch, objective)
                loss = loss * (len(parts) / tasks) * (int(counted[torch.from_numpy(part)].sum()) / whole)
                loss.sum().backward()
                total += loss.detach()
        return total


def multitask_config(teachers: TeacherSet, tasks: list[str], steps: int, batch: int, seed: int) -> TeacherConfig:
    """Teacher settings of the multitask LoRA: ``steps`` steps of ``batch`` sequences, split equally over
    ``tasks`` (rounded up to a multiple of their number), the teachers' rank, alpha, targets and objectives
    (the most common one, ties to the first task's, with ``task_objectives`` for the others)."""
    if not tasks:
        raise TeacherError(f"{teachers.root}: no training task left for the multitask LoRA")
    objectives = {t: task_objective(teachers, t) for t in tasks}
    counts = list(objectives.values())
    objective = max(dict.fromkeys(counts), key=counts.count)
    layout = teachers.layout
    return TeacherConfig(base_model=teachers.model_name, tasks=tuple(tasks), objective=objective,
                         task_objectives=tuple(f"{t}={o}" for t, o in objectives.items() if o != objective),
                         rank=layout.rank, alpha=layout.alpha, targets=tuple(layout.targets),
                         batch_size=-(-batch // len(tasks)), warmup_steps=0,
                         snapshot_every=steps, snapshots=1, seed=seed, eval_limit=0, probes=None)


def settings(teachers: TeacherSet, config: TeacherConfig) -> dict:
    """What the adapter depends on: training settings, the teacher set, its formats and initial adapter."""
    init = teachers.init_adapter
    if init is not None and not (init / WEIGHTS_NAME).is_file():
        raise TeacherError(f"{init}: missing (the initial adapter listed in {teachers.root}/manifest.json)")
    record = {**config.training_digest(), "teachers": str(Path(teachers.root).resolve()),
              "formats": {t: asdict(task_format(teachers, t)) for t in config.tasks},
              "init": hashlib.sha256((init / WEIGHTS_NAME).read_bytes()).hexdigest()[:16] if init else None}
    return json.loads(json.dumps(record))  # as read back from settings.json


def is_trained(teachers: TeacherSet, config: TeacherConfig, out: str | Path) -> bool:
    """``out`` holds the multitask LoRA of ``config`` (in ``config.dtype``): same settings, weights present."""
    try:
        return (json.loads((Path(out) / SETTINGS).read_text()) == settings(teachers, config)
                and (Path(out) / WEIGHTS_NAME).is_file())
    except (OSError, json.JSONDecodeError):
        return False


def train_multitask_lora(model, tokenizer, teachers: TeacherSet, config: TeacherConfig, out: str | Path,
                         data_dir: str | None = None, progress: bool = True) -> Path:
    """The multitask LoRA of ``config.tasks`` as a PEFT directory ``out``; trained unless ``out`` holds one
    trained with the same settings."""
    out = Path(out)
    param = next(model.parameters())
    config = replace(config, dtype=str(param.dtype).removeprefix("torch."))  # the dtype it is trained in
    if is_trained(teachers, config, out):
        return out
    wanted = settings(teachers, config)
    encoded = [encode_task(training_task(t, data_dir, teachers.tasks.get(t, {}).get("validation", 0)), tokenizer,
                           task_format(teachers, t), config.max_length, tokenizer.pad_token_id, config.objective_of(t))
               for t in config.tasks]
    trainer = MixtureTrainer(model, teachers.layout, encoded, config, out)  # never saves state: minutes, not resumed
    if teachers.init_adapter is not None:
        layout = teachers.layout
        start = factors_from_state_dict(load_adapter(teachers.init_adapter, layout).state_dict, layout)
        with torch.no_grad():
            for proj, pair in trainer.factors.items():
                for t, s in zip(pair, start[proj]):
                    t[0].copy_(s)
    losses = []
    with tqdm(total=config.total_steps, desc=f"{NAME} ({len(config.tasks)} tasks)", unit="step",
              disable=not progress) as bar:
        while trainer.step < config.total_steps:
            losses.append(round(float(trainer.train_step()[0]), 6))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    save_peft_adapter(trainer.adapter(0), out, teachers.layout, base_model_name_or_path=teachers.model_name,
                      extra_json={SETTINGS: wanted, LOSSES: {"loss": losses}})
    return out
