"""The teachers of DnD's training checkpoints: which checkpoint a batch row is, and what the signals compare with.

Every training file ``data/<family>/<Dataset>/<step>.safetensors`` is a teacher adapter of task
``<Dataset>``. Its targets (the Δ on the probes, the top-k next-token distributions, ...) come from
the behaviour signals' ``prepare`` (``llgbm_ext.signals``): keyed in the ``DeltaCache`` by the
adapter's content (tensors and LoRA scaling, not the path) and the context (base-model fingerprint,
input hash, settings), so a renamed or copied file hits and a changed base or probe set misses.
Misses are split over the ranks and written by rank 0; every rank then reads the same bytes.

Task-grounded probes (``probes: task | mixed``) and the ``kl`` signal need each task's training
inputs: ``<train_inputs>/<Dataset>.json`` in the format ``llgbm teachers`` writes per task
(``{"format": {...}, "inputs": [{"context", "answer"}, ...]}``, train split only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..data.teacher_set import TeacherSet
from ..delta.teacher import adapter_ids
from ..errors import LLGBMError
from ..lora.layout import LoraLayout


class TeacherError(LLGBMError):
    """Teacher targets are missing or ambiguous for a batch row."""


def checkpoint_task(path: str) -> str:
    """The task of a DnD checkpoint: its data set folder ``data/<family>/<Dataset>/<step>.safetensors``."""
    return Path(path).parent.name


def plugin_teacher_set(checkpoints: Sequence[str], layout: LoraLayout, base_model: str,
                       train_inputs: str | None, required: bool) -> TeacherSet:
    """The checkpoints as a teacher set for the signals: one task per data set folder, with its training
    inputs from ``<train_inputs>/<Dataset>.json`` (``required``: a missing file is an error)."""
    if required and not train_inputs:
        raise TeacherError("the plugin config asks for task-grounded probes or the kl signal: set train_inputs "
                           "to a folder of <Dataset>.json training inputs")
    tasks: dict[str, dict] = {}
    for task in dict.fromkeys(checkpoint_task(p) for p in checkpoints):
        info: dict = {}
        if train_inputs:
            path = Path(train_inputs) / f"{task}.json"
            if required and not path.is_file():
                raise TeacherError(f"{path}: missing; data set {task} has no training inputs for task-grounded "
                                   "probes or the kl signal")
            if path.is_file():
                try:
                    info["format"] = json.loads(path.read_text(encoding="utf-8")).get("format")
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                    raise TeacherError(f"{path}: not a training-inputs JSON file ({e})") from None
                info["train_inputs"] = str(path.resolve())
        tasks[task] = info
    return TeacherSet(Path(train_inputs or "."), base_model, layout, [], tasks)


@dataclass
class TeacherRows:
    """Checkpoint paths -> positions in the list the signals were prepared on (identical files share one)."""

    id_of: dict[str, str]  # path -> adapter content id
    index_of: dict[str, int]  # adapter id -> position of its first path

    @classmethod
    def of(cls, paths: Sequence[str], layout: LoraLayout) -> "TeacherRows":
        ids = adapter_ids(paths, layout)
        index_of: dict[str, int] = {}
        for i, a in enumerate(ids):
            index_of.setdefault(a, i)
        return cls(dict(zip(paths, ids)), index_of)

    def index(self, candidates: Sequence[Sequence[str]], device: torch.device) -> Tensor:
        """(B,) the teacher of each batch row, given the checkpoint path(s) that row matched."""
        rows = []
        for i, paths in enumerate(candidates):
            ids = {self.id_of.get(p) for p in paths}
            if None in ids:
                raise TeacherError(f"batch row {i}: no teacher targets for {sorted(p for p in paths if p not in self.id_of)[0]}")
            if len(ids) > 1:
                raise TeacherError(f"batch row {i}: its tokens match different checkpoints {sorted(paths)}")
            rows.append(self.index_of[ids.pop()])
        return torch.tensor(rows, device=device)
