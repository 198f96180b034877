"""Curves of a training run: ``loss_curves.png`` (every logged loss component, lr and grad norm) and
``recovery_curves.png`` (recovery of each eval task and their mean over steps, ``eval.every``)."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_path


def plot_metrics(records: list[dict], path: str | os.PathLike) -> Path | None:
    """One panel per loss component (log scale), plus lr and grad norm; None if nothing to plot or no matplotlib."""
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = sorted({k for r in records for k in r if k.startswith(("loss", "cos/"))})
    keys += [k for k in ("lr", "grad_norm") if any(k in r for r in records)]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1)
        if key.startswith("loss") and all(p[1] > 0 for p in points):
            ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def plot_recovery(records: list[dict], path: str | os.PathLike) -> Path | None:
    """Recovery of each eval task (thin) and the mean (thick) over steps; None if none logged or no matplotlib."""
    rows = [r for r in records if "val/recovery/mean" in r]
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = sorted({k for r in rows for k in r if k.startswith("val/recovery/") and k != "val/recovery/mean"})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key in [*keys, "val/recovery/mean"]:
        points = [(r["step"] + 1, r[key]) for r in rows if r.get(key) is not None]
        mean = key == "val/recovery/mean"
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=2.2 if mean else 1, marker="o", ms=3,
                color="black" if mean else None, label=key.removeprefix("val/recovery/"))
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.axhline(1.0, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("step", fontsize=8)
    ax.set_title("recovery on the eval tasks (0 = base model, 1 = teacher)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
