"""The tasks a teacher run trains on: real DnD task files or the synthetic suite, and where DnD files them.

Task names are as users type them: ``arc_e boolq gsm8k …`` with ``--data-dir`` (DnD's file names come
from ``data.dnd_format``), or synthetic names (``kind_3``), family names (``kind`` = every member),
``v1``/``v2``/``v3`` (every task of a suite version) or ``all`` (the default suite, v3). DnD keeps one folder
of checkpoints per data set, ``data/<family>/<Dataset>/``: real tasks go
under ``common_sense_reasoning`` (multiple choice, True/False) or ``math`` (exact answers) with DnD's
data set name, synthetic ones under ``synthetic-<family>`` with the task name.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..data.dnd_format import TASKS, load_task, split_paths, task_spec
from ..data.records import Task
from ..data.synthetic import DEFAULT_SUITE, FAMILIES, SUITES, TASK_FAMILIES, SuiteConfig, get_synthetic_task
from .config import TeacherError

SUITE_NAMES = {f"v{v}": v for v in SUITES}  # --tasks v1: every task of suite v1
REAL_FAMILIES = {"mc": "common_sense_reasoning", "bool": "common_sense_reasoning", "exact": "math"}


@dataclass
class TeacherTask:
    """A task with its DnD folder and the condition prompts the manifest lists."""

    task: Task
    family: str  # the task's family: the synthetic family, or DnD's family folder for real tasks
    dnd_folder: str  # data/<family>/<Dataset>, relative to the output directory
    prompts: list[str]
    held_out: int = 0  # training examples held out of training and scored instead of test (validation_split)
    scored: str = "test"  # what task.test holds: "test", "train slice" or "validation split"

    @property
    def name(self) -> str:
        return self.task.name


def expand_task_names(names: list[str], data_dir: str | None) -> list[str]:
    """``all`` and synthetic family names expanded, real names normalised (``ARC-e`` -> ``arc_e``); order kept."""
    out: list[str] = []
    for name in names:
        if data_dir is None:
            if name == "all":
                found = list(SUITES[DEFAULT_SUITE])
            elif name in SUITE_NAMES:
                found = list(SUITES[SUITE_NAMES[name]])
            elif name in FAMILIES:
                found = [FAMILIES[name].task_name(p) for p in FAMILIES[name].params]
            elif name in TASK_FAMILIES:
                found = [name]
            else:
                raise TeacherError(f"--tasks: unknown synthetic task {name!r}: use all (suite v{DEFAULT_SUITE}), "
                                   f"{', '.join(SUITE_NAMES)}, a family "
                                   f"({', '.join(FAMILIES)}) or a member such as kind_3")
        elif name == "all":
            found = [s.name for s in TASKS.values() if any(p.is_file() for p in split_paths(data_dir, s, "train"))]
            if not found:
                raise TeacherError(f"--data-dir {data_dir}: no training file of any known task ({', '.join(TASKS)})")
        else:
            found = [task_spec(name).name]
        out += [t for t in found if t not in out]
    return out


def validation_split(task: Task, examples: int) -> Task:
    """``task`` with ``examples`` of its training examples as its test split and the rest as its training split.

    For choosing teacher settings without looking at the test split. The examples are a fixed draw per task
    (the same for every seed and run); the rest keep their order, and the condition prompts come from them."""
    if examples == 0:
        return task
    if examples >= len(task.train):
        raise TeacherError(f"validation {examples}: task {task.name} has only {len(task.train)} training examples")
    draw = np.random.Generator(np.random.PCG64(zlib.crc32(f"validation {task.name}".encode())))
    order = draw.permutation(len(task.train))
    held = np.zeros(len(task.train), dtype=bool)
    held[order[:examples]] = True
    train = [e for e, h in zip(task.train, held) if not h]
    prompts = {e.prompt for e in train}
    return replace(task, train=train, test=[e for e, h in zip(task.train, held) if h],
                   conditions=[c for c in task.conditions if c in prompts])


def has_validation_file(data_dir: str | None, name: str) -> bool:
    """Whether a real task has its own validation split in ``data_dir`` (``ARC-e_validation.json``)."""
    return data_dir is not None and any(p.is_file() for p in split_paths(data_dir, task_spec(name), "validation"))


def load_teacher_tasks(names: tuple[str, ...], data_dir: str | None, max_prompts: int,
                       with_test: bool = True, validation: int = 0,
                       validation_from: str = "train") -> list[TeacherTask]:
    """Load every task; real tasks with their test split if ``with_test`` (it scores base and teacher).
    With ``validation`` > 0, validation examples instead: with ``validation_from="dataset"`` the first
    ``validation`` of the task's own validation split where it has one, else a slice of the training split
    (``validation_split``)."""
    tasks = []
    for name in names:
        if data_dir is None:
            task = validation_split(get_synthetic_task(name, SuiteConfig()), validation)
            family = task.family or name
            tasks.append(TeacherTask(task, family, f"data/synthetic-{family}/{name}", list(task.conditions),
                                     held_out=validation, scored="train slice" if validation else "test"))
            continue
        own = bool(validation) and validation_from == "dataset" and has_validation_file(data_dir, name)
        splits = ("train", "validation") if own else ("train", "test") if with_test and not validation else ("train",)
        task = load_task(Path(data_dir), name, splits=splits)
        held = 0 if own else validation
        if own:
            task = replace(task, test=task.validation[:validation], validation=[])
        else:
            task = validation_split(task, held)
        scored = "validation split" if own else "train slice" if held else "test"
        family = REAL_FAMILIES[task.kind]
        tasks.append(TeacherTask(task, family, f"data/{family}/{task_spec(name).dnd_name}",
                                 task.conditions[:max_prompts], held_out=held, scored=scored))
    return tasks
