"""Recovery on left-out tasks during training: does the generator carry over, and from which step on?

Every ``eval.every`` steps the trainer generates one adapter per task of ``eval.tasks`` (from a fixed
draw of the task's condition prompts, the same at every evaluation), scores it as the comparisons do
(accuracy on the first ``eval.limit`` test examples, in the teachers' answer format) and logs

    val/accuracy/<task>, val/recovery/<task> = (accuracy − base) / (teacher − base), val/recovery/mean

(recovery is null where the teacher is within one test example of the base model: nothing to recover).
The base model's and the teachers' accuracies are computed once per run and cached in
``<run>/eval_reference.json``. The evaluation draws no random numbers and runs the generator in eval
mode without gradients, so the trained weights are those of a run without it.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_text
from ..data.teacher_set import TeacherSet
from ..errors import LLGBMError
from ..eval.tasks import task_with_test_split
from ..eval.uncertainty import recovery
from .config import EvalConfig

REFERENCE = "eval_reference.json"


def check_eval_tasks(cfg: EvalConfig, teachers: TeacherSet, trained: list[str]) -> None:
    """Refuse eval tasks without teachers, or that the generator trains on (one-line errors)."""
    for task in cfg.tasks:
        if task not in teachers.tasks:
            raise LLGBMError(f"eval.tasks: {task!r} has no teachers in {teachers.root / 'manifest.json'}")
        if task in trained:
            raise LLGBMError(f"eval.tasks: {task!r} is a training task of this run; leave it out with data.held_out "
                             "(or set eval.every=0)")





class Validator:
    """Scores generated adapters of the eval tasks on a frozen base model (main process only)."""

    def __init__(self, cfg: EvalConfig, teachers: TeacherSet, model: nn.Module, tokenizer, num_prompts: int,
                 seed: int, out: Path):
        from ..delta.functional import FunctionalLoRA
        from ..teachers.multitask import task_format
        from .generate import sample_prompts

        self.cfg, self.teachers, self.model, self.tokenizer = cfg, teachers, model, tokenizer
        self.tasks = {name: task_with_test_split(name, cfg.data_dir, "eval.data_dir") for name in cfg.tasks}
        self.formats = {name: task_format(teachers, name) for name in cfg.tasks}
        self.lora = FunctionalLoRA(model, teachers.layout)
        self.prompts = [sample_prompts(teachers.prompts(t), num_prompts, 1, seed + 1000 * i)[0]
                        for i, t in enumerate(cfg.tasks)]
        self.reference = self._reference(out / REFERENCE)

    def _accuracies(self, factors) -> dict[str, tuple[list[float], int]]:
        """Per task: accuracy of the base model (``factors`` None) or of adapter i for task i, and examples."""
        from ..eval.scoring import AdapterBatch, ScoringConfig, evaluate_task

        scores = {}
        for i, (name, task) in enumerate(self.tasks.items()):
            one = None if factors is None else AdapterBatch(self.lora, {p: (a[i : i + 1], b[i : i + 1])
                                                                       for p, (a, b) in factors.items()})
            scoring = ScoringConfig(fmt=self.formats[name], progress=False)
            results = evaluate_task(self.model, self.tokenizer, task, scoring, one, limit=self.cfg.limit)
            scores[name] = (results[0].accuracy, results[0].total)
        return scores

    def _reference(self, path: Path) -> dict[str, dict]:
        """Base and teacher (last snapshot) accuracy per task, from ``path`` when it was written for these settings."""
        from ..delta.deltas import load_teacher_factors

        last = [max((e for e in self.teachers.entries if e.task == t), key=lambda e: e.step).path for t in self.tasks]
        key = {"teachers": [str(p) for p in last], "limit": self.cfg.limit}
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LLGBMError(f"{path}: not valid JSON ({e}); delete it to compute it again") from None
            if saved.get("key") == key:
                return saved["tasks"]
        param = next(self.model.parameters())
        with torch.no_grad():
            base = self._accuracies(None)
            teacher = self._accuracies(load_teacher_factors(last, self.teachers.layout, param.dtype, param.device))
        tasks = {t: {"base": base[t][0], "teacher": teacher[t][0], "examples": base[t][1]} for t in self.tasks}
        write_text(path, json.dumps({"key": key, "tasks": tasks}, indent=1) + "\n")
        return tasks

    def __call__(self, generator: nn.Module, encoder, level: str, device) -> dict[str, float | None]:
        """Generate and score one adapter per task; the logged values (generator left in eval mode)."""
        generator.eval()
        with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
            condition = encoder.condition(self.prompts, level, device)
            factors = {p: (a.to(next(self.model.parameters()).dtype), b.to(next(self.model.parameters()).dtype))
                       for p, (a, b) in generator.lora_factors(condition).items()}
            scores = self._accuracies(factors)
        logs: dict[str, float | None] = {}
        for task, (accuracy, examples) in scores.items():
            ref = self.reference[task]
            logs[f"val/accuracy/{task}"] = accuracy
            logs[f"val/recovery/{task}"] = recovery(accuracy, ref["base"], ref["teacher"], examples)
        logs["val/accuracy/mean"] = statistics.fmean(a for a, _ in scores.values())
        defined = [v for k, v in logs.items() if k.startswith("val/recovery/") and v is not None and math.isfinite(v)]
        logs["val/recovery/mean"] = statistics.fmean(defined) if defined else None
        return logs
