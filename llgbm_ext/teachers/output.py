"""What a teacher run writes: snapshots in both layouts, per-task loss logs, and the manifest.

Every snapshot is a PEFT directory ``<out>/<task>/<task>_<idx>/`` (with ``prompts.json``) and, under
the same bytes (a hard link where the file system allows, else a copy), DnD's flat
``<out>/data/<family>/<Dataset>/<step>.safetensors``. The manifest format is ``data.teacher_set``'s.
Loss logs are ``<out>/<task>/loss.jsonl``, one line ``{"step", "loss", "lr"}`` per optimizer step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import Tensor

from ..atomic import atomic_path, write_text
from ..data.formatting import PromptFormat
from ..data.teacher_set import write_manifest
from ..lora.adapters import WEIGHTS_NAME, save_peft_adapter
from ..lora.layout import LoraLayout
from .config import TeacherConfig
from .tasks import TeacherTask

LOSS_LOG = "loss.jsonl"
TRAIN_INPUTS = "train_inputs.json"
TRAIN_INPUTS_KEPT = 256  # training inputs per task kept for task-grounded probes and output matching


def adapter_name(task: str, index: int) -> str:
    return f"{task}_{index:03d}"


def adapter_path(task: str, index: int) -> str:
    """PEFT directory of snapshot ``index``, relative to the output directory."""
    return f"{task}/{adapter_name(task, index)}"


def dnd_file(task: TeacherTask, step: int) -> str:
    """DnD flat file of the snapshot taken after ``step``, relative to the output directory."""
    return f"{task.dnd_folder}/{step}.safetensors"


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` a hard link to ``source`` (a copy across file systems), replacing it atomically."""
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def write_snapshot(out: Path, task: TeacherTask, index: int, step: int, state_dict: dict[str, Tensor],
                   layout: LoraLayout, model_name: str) -> None:
    """One snapshot in both layouts."""
    peft_dir = out / adapter_path(task.name, index)
    save_peft_adapter(state_dict, peft_dir, layout, base_model_name_or_path=model_name,
                      extra_json={"prompts.json": {"task": task.name, "prompts": task.prompts}})
    link_or_copy(peft_dir / WEIGHTS_NAME, out / dnd_file(task, step))


def write_train_inputs(out: Path, task: TeacherTask, contexts: list[str], targets: list[str], fmt: PromptFormat) -> str:
    """The task's first training inputs in the teachers' answer format, ``<task>/train_inputs.json``:
    what task-grounded probes and the KL signal run the base model on (train split only). Returns the
    path relative to ``out``."""
    relative = f"{task.name}/{TRAIN_INPUTS}"
    inputs = [{"context": c, "answer": t} for c, t in zip(contexts[:TRAIN_INPUTS_KEPT], targets[:TRAIN_INPUTS_KEPT])]
    write_text(out / relative, json.dumps({"task": task.name, "format": format_record(fmt), "inputs": inputs},
                                          indent=1) + "\n")
    return relative


# --- loss logs -----------------------------------------------------------------------------------
def read_losses(out: Path, task: str) -> list[dict]:
    """The complete lines of a task's loss log (a run killed mid-write may leave a partial last line)."""
    path = out / task / LOSS_LOG
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def truncate_losses(out: Path, task: str, steps_done: int) -> None:
    """Keep the log lines of steps up to ``steps_done`` (those a resumed run will not repeat)."""
    kept = [r for r in read_losses(out, task) if r["step"] <= steps_done]
    write_text(out / task / LOSS_LOG, "".join(json.dumps(r) + "\n" for r in kept))


def append_losses(out: Path, tasks: list[str], step: int, losses: list[float], lr: float) -> None:
    for task, loss in zip(tasks, losses):
        with open(out / task / LOSS_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "loss": round(loss, 6), "lr": lr}) + "\n")


def snapshot_loss(records: list[dict], step: int, every: int) -> float | None:
    """Mean training loss of the ``every`` steps that led to the snapshot after ``step``."""
    window = [r["loss"] for r in records if step - every < r["step"] <= step]
    return sum(window) / len(window) if window else None


# --- manifest ------------------------------------------------------------------------------------
def format_record(fmt: PromptFormat) -> dict:
    """The prompt format, so evaluation and generators can score with the text teachers were trained on."""
    return {"answer_style": fmt.answer_style, "chat_template": fmt.chat_template, "use_system": fmt.use_system,
            "separator": fmt.separator}


def manifest_entries(out: Path, tasks: list[TeacherTask], config: TeacherConfig, fmt: PromptFormat,
                     quality: dict[str, dict]) -> tuple[dict, list[dict]]:
    """(tasks, adapters) of the manifest; ``quality`` adds per-task numbers (accuracies, sizes)."""
    info, adapters = {}, []
    for task in tasks:
        records = read_losses(out, task.name)
        info[task.name] = {"kind": task.task.kind, "family": task.family, "prompts": task.prompts,
                           "dnd_folder": task.dnd_folder, "format": format_record(fmt),
                           "objective": config.objective_of(task.name),
                           "licence": task.task.licence,
                           "train_examples": len(task.task.train), "test_examples": len(task.task.test),
                           **({"validation": task.held_out} if task.held_out else {}),
                           **({"scored": task.scored} if task.scored != "test" else {}),
                           **quality.get(task.name, {})}
        for index, step in enumerate(config.snapshot_steps()):
            adapters.append({"name": adapter_name(task.name, index), "task": task.name,
                             "path": adapter_path(task.name, index), "step": step, "dnd_file": dnd_file(task, step),
                             "loss": snapshot_loss(records, step, config.snapshot_every)})
    return info, adapters


INIT_DIR = "init"


def init_record(config: TeacherConfig) -> dict:
    """The manifest's ``init`` entry: how the teachers were initialised, and where the shared start is."""
    return {"kind": config.init, "seed": config.seed, **({"path": INIT_DIR} if config.init == "shared" else {})}


def write_initial_adapter(out: Path, layout: LoraLayout, config: TeacherConfig, model_name: str) -> None:
    """The shared initial adapter as a PEFT directory ``<out>/init`` (nothing for per-task inits); written
    once (a run continued in the same folder has the same settings, so the same initialisation)."""
    from .train import initial_adapter

    if config.init == "shared" and not (out / INIT_DIR / WEIGHTS_NAME).is_file():
        save_peft_adapter(initial_adapter(layout, config.seed), out / INIT_DIR, layout, base_model_name_or_path=model_name)


def write_teacher_manifest(out: Path, model_name: str, layout: LoraLayout, tasks: list[TeacherTask],
                           config: TeacherConfig, fmt: PromptFormat, quality: dict[str, dict]) -> Path:
    info, adapters = manifest_entries(out, tasks, config, fmt, quality)
    return write_manifest(out, model_name, layout, info, adapters, init_record(config))
