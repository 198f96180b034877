"""Loss curves of a training run (``loss_curves.png``): every logged loss component, lr and grad norm."""

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
