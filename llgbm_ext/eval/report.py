"""Evaluation results on disk: a JSON file, markdown tables and PNG plots, all written atomically.

Models are grouped by what they are (the base model, trained adapters, generated adapters) and by the
task an adapter belongs to, so a run over many teachers reads as one row per (kind, task), each cell
the mean accuracy of the group on a task; an adapter's own task is marked in bold. Plotting needs
matplotlib (Agg backend, no display); without it the plots are skipped with a one-line message.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ..atomic import atomic_path, write_text
from .behaviour import BehaviourReport
from .scoring import TaskResult

Role = Literal["base", "adapter", "generated"]


@dataclass(frozen=True)
class ModelInfo:
    """An evaluated model: its label in the results, what it is, and (adapters) its task and file."""

    label: str
    role: Role
    task: str | None = None
    path: str | None = None

    @property
    def group(self) -> str:
        return "base" if self.role == "base" else f"{self.role} [{self.task or '?'}]"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    if hasattr(value, "__fspath__"):
        return os.fspath(value)
    return value


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Atomically write ``payload`` as indented JSON (NaN and infinities become null)."""
    write_text(path, json.dumps(_jsonable(payload), indent=2, default=str) + "\n")
    return Path(path)


def _percent(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{100 * value:.1f}"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def group_accuracies(models: Sequence[ModelInfo], results: Sequence[TaskResult]) -> dict[str, dict[str, float]]:
    """group -> task -> mean accuracy of the group's models on that task (groups in model order)."""
    by_model = {(r.model, r.task): r.accuracy for r in results}
    tasks = list(dict.fromkeys(r.task for r in results))
    groups: dict[str, list[str]] = {}
    for m in models:
        groups.setdefault(m.group, []).append(m.label)
    return {
        group: {t: _mean([by_model[(label, t)] for label in labels if (label, t) in by_model]) for t in tasks}
        for group, labels in groups.items()
    }


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A markdown table; the first ``text_columns`` columns left-aligned, the rest (numbers) right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def accuracy_markdown(models: Sequence[ModelInfo], results: Sequence[TaskResult], per_model: bool = False) -> str:
    """Accuracy (%) per model group (or per model) and task; a group's own task in bold."""
    tasks = list(dict.fromkeys(r.task for r in results))
    counts: dict[str, int] = {}
    for m in models:
        counts[m.group] = counts.get(m.group, 0) + 1
    own = {m.group: m.task for m in models}
    rows = []
    if per_model:
        by_model = {(r.model, r.task): r for r in results}
        for m in models:
            cells = []
            for t in tasks:
                r = by_model.get((m.label, t))
                cell = "–" if r is None else f"{_percent(r.accuracy)} ({r.correct}/{r.total})"
                cells.append(f"**{cell}**" if t == m.task else cell)
            rows.append([m.label, m.role, m.task or ""] + cells)
        return _table(["model", "kind", "task"] + tasks, rows, text_columns=3)
    for group, accuracy in group_accuracies(models, results).items():
        cells = [f"**{_percent(accuracy[t])}**" if t == own[group] else _percent(accuracy[t]) for t in tasks]
        rows.append([group, str(counts[group])] + cells)
    return _table(["models", "n"] + tasks, rows)


def behaviour_markdown(report: BehaviourReport) -> str:
    """Per-task delta cosines, specificity and top-1 of generated adapters, plus the overall means."""
    rows = [[t.task, str(t.adapters), f"{t.cos_own:.3f}", f"{t.cos_others:.3f}", f"{t.specificity:+.3f}", _percent(t.top1)]
            for t in report.tasks]
    o = report.overall
    rows.append(["**all**", str(o["adapters"]), f"{o['cos_own']:.3f}", f"{o['cos_others']:.3f}",
                 f"{o['specificity']:+.3f}", _percent(o["top1"])])
    return _table(["task", "n", "cos own", "cos others", "specificity", "top-1 %"], rows)


# --- plots ---------------------------------------------------------------------------------------
def _pyplot():
    """matplotlib.pyplot with the Agg backend, or None (and a message) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return None
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def plot_accuracy(path: str | os.PathLike, models: Sequence[ModelInfo], results: Sequence[TaskResult]) -> Path | None:
    """Bars per task: the base model, trained and generated adapters on their own task, and adapters
    of other tasks (a specificity control). Returns the PNG path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    tasks = list(dict.fromkeys(r.task for r in results))
    role = {m.label: m for m in models}
    series: dict[str, list[float]] = {}
    for name, keep in (
        ("base", lambda m, t: m.role == "base"),
        ("adapters (own task)", lambda m, t: m.role == "adapter" and m.task == t),
        ("generated (own task)", lambda m, t: m.role == "generated" and m.task == t),
        ("adapters of other tasks", lambda m, t: m.role != "base" and m.task != t),
    ):
        values = [_mean([r.accuracy for r in results if r.task == t and keep(role[r.model], t)]) for t in tasks]
        if any(math.isfinite(v) for v in values):
            series[name] = values
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(tasks) * max(1, len(series)) / 2), 3.5))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(tasks))
    for j, (name, values) in enumerate(series.items()):
        ax.bar(x + (j - (len(series) - 1) / 2) * width, [100 * v if math.isfinite(v) else 0 for v in values], width, label=name)
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("accuracy per task")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_heatmap(
    path: str | os.PathLike, matrix, row_labels: Sequence[str], col_labels: Sequence[str], title: str
) -> Path | None:
    """A heat map of a cosine matrix (values in [-1, 1]) with the values written in the cells if small."""
    plt = _pyplot()
    if plt is None:
        return None
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.5 + 0.55 * len(col_labels), 1.2 + 0.4 * len(row_labels)))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    if matrix.size <= 400:
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="cosine")
    ax.set_title(title)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def results_payload(
    config: dict, models: Sequence[ModelInfo], results: Sequence[TaskResult], tasks: Sequence[dict],
    behaviour: dict | None, notes: Sequence[str], timing: dict, with_examples: bool = True,
) -> dict:
    """The JSON document of one evaluation run (per-example predictions unless ``with_examples`` is False)."""
    return {
        "config": config,
        "tasks": list(tasks),
        "models": [asdict(m) for m in models],
        "summary": group_accuracies(models, results),
        "results": [r.to_dict(with_examples) for r in results],
        "behaviour": behaviour,
        "notes": list(notes),
        "timing": timing,
    }
