"""Trainer hook ``log_terms``: the loss terms appear where DnD logs its loss.

The value DnD's loop receives as ``loss`` is already the combined λw·L_weight + λd·L_delta, so DnD's
own ``train_loss`` (wandb) and ``step:N Loss: x`` (print) show the total unchanged. The separate
terms are added to those same two places:

* wandb (DnD's ``use_wandb``): the script's ``wandb.log({"train_loss": ..., ...})`` call of a step
  also carries ``llgbm/loss``, ``llgbm/loss_weight``, ``llgbm/loss_delta``, ``llgbm/cos_delta`` and
  ``llgbm/norm_ratio_delta`` of that step (``wandb.log`` is wrapped once the script has imported wandb);
* print (otherwise): DnD's line ``step:N Loss: x`` gets `` | llgbm L: … L_weight: … L_delta: … cos_delta: …``
  appended, the means over the steps since its previous such line (``print`` is wrapped; any other
  output passes through untouched).

Values are this process's, like DnD's own loss; DnD logs on the main process only. Steps without a
delta term (``delta_every`` > 1) contribute to the weight means only.
"""

from __future__ import annotations

import builtins
import re
import sys
from typing import TYPE_CHECKING, Callable

import torch

from .hooks import register_hook

if TYPE_CHECKING:
    from .hooks import PluginSession

DND_LOSS_LINE = re.compile(r"step:\d+ Loss: \S+")  # DnD's print when wandb is off
_SHORT = {"loss": "L", "loss/weight": "L_weight", "loss/delta": "L_delta", "cos/delta": "cos_delta",
          "norm_ratio/delta": "norm_ratio_delta"}


def wandb_key(key: str) -> str:
    """``loss/delta`` -> ``llgbm/loss_delta``; ``loss`` -> ``llgbm/loss``."""
    return "llgbm/" + key.replace("/", "_")


class StepMetrics:
    """The loss terms of recent training steps of this process."""

    def __init__(self):
        self.latest: dict[str, float] = {}
        self.listeners: list[Callable[[dict[str, float]], None]] = []
        self._window: list[dict[str, float]] = []

    def record(self, result: dict[str, torch.Tensor]) -> None:
        """Store one step's ``LossResult`` (one device sync for all its entries)."""
        values = torch.stack([v.detach().float().reshape(()) for v in result.values()]).tolist()
        self.latest = dict(zip(result, values))
        self._window.append(self.latest)
        for listener in self.listeners:
            listener(self.latest)

    def window_means(self) -> dict[str, float]:
        """Per key, the mean over the steps recorded since the last call (which starts a new window)."""
        window, self._window = self._window, []
        keys = dict.fromkeys(k for step in window for k in step)
        return {k: sum(s[k] for s in window if k in s) / sum(1 for s in window if k in s) for k in keys}


def format_terms(means: dict[str, float]) -> str:
    return "llgbm " + " ".join(f"{_SHORT.get(k, k)}: {v:.6f}" for k, v in means.items())


@register_hook("log_terms", "trainer")
def install(session: "PluginSession") -> Callable[[], None]:
    """Wrap ``print`` now and ``wandb.log`` as soon as the script has imported wandb."""
    metrics = session.metrics
    original_print = builtins.print
    wrapped_wandb: list[tuple[object, Callable]] = []  # (wandb module, its original log)

    def print_with_terms(*args, **kwargs):
        if len(args) == 1 and isinstance(args[0], str) and DND_LOSS_LINE.fullmatch(args[0]):
            means = metrics.window_means()
            if means:
                args = (f"{args[0]} | {format_terms(means)}",)
        return original_print(*args, **kwargs)

    def wrap_wandb(_latest: dict[str, float]) -> None:
        wandb = sys.modules.get("wandb")
        if wrapped_wandb or wandb is None or not callable(getattr(wandb, "log", None)):
            return
        original_log = wandb.log

        def log(data=None, *args, **kwargs):
            if isinstance(data, dict) and "train_loss" in data:
                data = {**data, **{wandb_key(k): v for k, v in metrics.latest.items()}}
            return original_log(data, *args, **kwargs)

        wandb.log = log
        wrapped_wandb.append((wandb, original_log))

    builtins.print = print_with_terms
    metrics.listeners.append(wrap_wandb)

    def undo() -> None:
        builtins.print = original_print
        metrics.listeners.remove(wrap_wandb)
        for wandb, original_log in wrapped_wandb:
            wandb.log = original_log

    return undo
