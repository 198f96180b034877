"""Summaries of a set of deltas: norms, task-by-task cosines, and a 2-D map coloured by task."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_path


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def task_cosines(deltas: np.ndarray, tasks: list[str]) -> tuple[list[str], np.ndarray]:
    """(task names, matrix C) with C[i, j] = mean cosine between the deltas of task i and of task j
    (the diagonal excludes each delta's cosine with itself; a single-delta task's diagonal is 1)."""
    names = sorted(set(tasks))
    unit = _unit(np.asarray(deltas, dtype=np.float64))
    cos = unit @ unit.T  # (N, N)
    labels = np.array(tasks)
    matrix = np.zeros((len(names), len(names)))
    for i, a in enumerate(names):
        rows = labels == a
        for j, b in enumerate(names):
            block = cos[np.ix_(rows, labels == b)]
            if i == j and block.shape[0] > 1:
                n = block.shape[0]
                matrix[i, j] = (block.sum() - np.trace(block)) / (n * n - n)
            else:
                matrix[i, j] = block.mean()
    return names, matrix


def embed_2d(deltas: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates: PCA of the unit-normalised deltas, or t-SNE (scikit-learn) on cosine distance."""
    unit = _unit(np.asarray(deltas, dtype=np.float64))
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = max(1.0, min(30.0, (len(unit) - 1) / 3))
        return TSNE(2, metric="cosine", init="random", perplexity=perplexity, random_state=seed).fit_transform(unit)
    centred = unit - unit.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T if vt.shape[0] >= 2 else np.pad(centred @ vt[:1].T, ((0, 0), (0, 1)))


def format_summary(paths: list[str], tasks: list[str], deltas: np.ndarray) -> str:
    """Text: one line per adapter (task, norm) and the task-by-task cosine matrix."""
    norms = np.linalg.norm(deltas, axis=-1)
    width = max(len(t) for t in tasks)
    lines = [f"{'task':<{width}}  {'|Δ|':>8}  adapter"]
    lines += [f"{t:<{width}}  {n:8.4f}  {p}" for p, t, n in zip(paths, tasks, norms)]
    names, matrix = task_cosines(deltas, tasks)
    w = max(6, max(len(n) for n in names))
    lines += ["", "mean cosine between tasks' deltas (diagonal: within a task)", " " * w + "".join(f" {n[:w]:>{w}}" for n in names)]
    lines += [f"{a:<{w}}" + "".join(f" {v:>{w}.3f}" for v in row) for a, row in zip(names, matrix)]
    return "\n".join(lines)


def plot_summary(deltas: np.ndarray, tasks: list[str], out: str | os.PathLike, method: str = "pca") -> list[Path]:
    """Write ``delta_map.png`` (2-D map coloured by task) and ``delta_cosines.png`` (heat map) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    xy = embed_2d(deltas, method)
    names = sorted(set(tasks))
    fig, ax = plt.subplots(figsize=(6, 5))
    for k, name in enumerate(names):
        rows = np.array(tasks) == name
        ax.scatter(xy[rows, 0], xy[rows, 1], s=18, label=name, color=plt.cm.tab20(k % 20))
    ax.set_title(f"teacher deltas ({method.upper()} of unit vectors)")
    ax.legend(fontsize=7, markerscale=0.8, loc="best", ncol=1 + len(names) // 12)
    written = [_save(fig, out / "delta_map.png")]
    names, matrix = task_cosines(deltas, tasks)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(names), 1 + 0.4 * len(names)))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8, label="mean cosine")
    ax.set_title("delta cosines by task")
    written.append(_save(fig, out / "delta_cosines.png"))
    plt.close("all")
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
