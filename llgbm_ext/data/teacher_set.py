"""Teacher sets: the adapters a generator learns from, as ``llgbm teachers`` writes them.

Layout of a teacher directory (LLGBM's ``checkpoints/`` layout plus DnD's flat folders)::

    <dir>/manifest.json
    <dir>/<task>/<task>_<idx>/adapter_model.safetensors   PEFT adapter (one snapshot of one trajectory)
    <dir>/<task>/<task>_<idx>/adapter_config.json
    <dir>/<task>/<task>_<idx>/prompts.json                {"prompts": [...], "task": "<task>"}
    <dir>/<task>/train_inputs.json                        {"inputs": [{"context", "answer"}, ...]} (train split)
    <dir>/data/<family>/<Dataset>/<step>.safetensors      the same snapshots in DnD's flat format
    <dir>/init/adapter_model.safetensors                  the initialisation every task started from (shared init)

``manifest.json``::

    {"format": "llgbm_ext.teachers/1",
     "model_name": "<base model>", "lora_config": {"rank": 8, "alpha": 16, "targets": [...]},
     "init": {"kind": "shared", "seed": 0, "path": "init"},   (optional; "per-task" has no path)
     "layout": {...LoraLayout.to_dict()...},
     "tasks": {"<task>": {"kind": "mc", "family": "...", "prompts": [...condition prompts...],
                          "dnd_folder": "data/<family>/<Dataset>", "train_inputs": "<task>/train_inputs.json",
                          ...quality numbers...}},
     "adapters": [{"name": "<task>_<idx>", "task": "<task>", "path": "<task>/<task>_<idx>",
                   "step": 40, "dnd_file": "data/<family>/<Dataset>/40.safetensors", "loss": 0.3}]}

Paths are relative to ``<dir>``. ``model_name``, ``lora_config`` and ``adapters[].{name, task, path}``
are LLGBM's keys, so LLGBM tools can read the list of adapters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_text
from ..errors import LLGBMError
from ..lora.layout import LoraLayout

FORMAT = "llgbm_ext.teachers/1"
MANIFEST = "manifest.json"


class TeacherSetError(LLGBMError):
    """A teacher directory or its manifest is missing or malformed."""


@dataclass(frozen=True)
class TeacherEntry:
    """One teacher adapter (a snapshot of a task's LoRA training run)."""

    name: str
    task: str
    path: Path  # absolute PEFT adapter directory
    step: int = 0


@dataclass
class TeacherSet:
    """A loaded teacher directory."""

    root: Path
    model_name: str
    layout: LoraLayout
    entries: list[TeacherEntry]
    tasks: dict[str, dict] = field(default_factory=dict)
    init: dict = field(default_factory=dict)

    @property
    def init_adapter(self) -> Path | None:
        """The shared initial adapter every teacher started from (PEFT directory), if the run recorded one."""
        path = self.init.get("path")
        return self.root / path if path else None

    def task_names(self) -> list[str]:
        """Tasks in manifest order."""
        return list(self.tasks)

    def prompts(self, task: str) -> list[str]:
        """The condition prompts of a task."""
        return list(self.tasks[task].get("prompts", []))

    def train_inputs(self, task: str) -> list[dict]:
        """The task's training inputs in its teachers' answer format: ``[{"context", "answer"}, ...]``
        (``<task>/train_inputs.json``, train split only), for task-grounded probes and output matching."""
        relative = self.tasks.get(task, {}).get("train_inputs")
        where = self.root / MANIFEST
        if not relative:
            raise TeacherSetError(f"{where}: task {task!r} has no training inputs recorded (teachers written by an "
                                  "older version or without data); train the teachers again with `llgbm teachers`")
        path = self.root / relative
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            inputs = [{"context": str(r["context"]), "answer": str(r["answer"])} for r in data["inputs"]]
        except FileNotFoundError:
            raise TeacherSetError(f"{path}: missing (listed for task {task!r} in {where})") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise TeacherSetError(f"{path}: malformed training inputs ({type(e).__name__}: {e})") from None
        if not inputs:
            raise TeacherSetError(f"{path}: task {task!r} has no training inputs")
        return inputs

    def select(self, include: list[str] | None = None, exclude: list[str] | None = None) -> "TeacherSet":
        """The same set restricted to some tasks (e.g. without the held-out ones)."""
        unknown = [t for t in (include or []) + (exclude or []) if t not in self.tasks]
        if unknown:
            raise TeacherSetError(f"{self.root / MANIFEST}: unknown task {unknown[0]!r} (tasks: {', '.join(self.tasks)})")
        keep = [t for t in self.tasks if (include is None or t in include) and t not in (exclude or [])]
        return TeacherSet(self.root, self.model_name, self.layout, [e for e in self.entries if e.task in keep],
                          {t: self.tasks[t] for t in keep}, self.init)


def load_teacher_set(root: str | os.PathLike) -> TeacherSet:
    """Read ``<root>/manifest.json``; errors name the file and the key."""
    root = Path(root)
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TeacherSetError(f"{path}: no teacher manifest (train teachers with `llgbm teachers`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TeacherSetError(f"{path}: not valid JSON ({e})") from None
    try:
        layout = LoraLayout.from_dict(data["layout"])
        tasks = dict(data["tasks"])
        entries = [
            TeacherEntry(str(a["name"]), str(a["task"]), root / a["path"], int(a.get("step", 0)))
            for a in data["adapters"]
        ]
        model_name = str(data["model_name"])
        init = dict(data.get("init") or {})
    except (KeyError, TypeError, ValueError) as e:
        raise TeacherSetError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    missing = next((e for e in entries if e.task not in tasks), None)
    if missing:
        raise TeacherSetError(f"{path}: adapter {missing.name!r} names task {missing.task!r}, which has no entry in 'tasks'")
    if not entries:
        raise TeacherSetError(f"{path}: lists no adapters")
    return TeacherSet(root, model_name, layout, entries, tasks, init)


def write_manifest(root: str | os.PathLike, model_name: str, layout: LoraLayout, tasks: dict[str, dict],
                   adapters: list[dict], init: dict | None = None) -> Path:
    """Write ``<root>/manifest.json`` atomically (adapters: dicts with name, task, path relative to root, ...;
    ``init``: how the teachers were initialised)."""
    manifest = {
        "format": FORMAT,
        "model_name": model_name,
        "lora_config": {"rank": layout.rank, "alpha": layout.alpha, "targets": list(layout.targets)},
        **({"init": init} if init else {}),
        "layout": layout.to_dict(),
        "tasks": tasks,
        "adapters": adapters,
    }
    path = Path(root) / MANIFEST
    write_text(path, json.dumps(manifest, indent=1) + "\n")
    return path
