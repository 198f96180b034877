"""The hook registry: named dataset, loss and trainer hooks that make DnD's own training scripts train
with λw·L_weight + λd·L_delta, without editing any DnD file.

A hook is an ``install(session) -> undo`` function registered under a name and a kind:

  dataset  ``row_ids``      tags each batch row with the checkpoint it came from (``rows.py``)
  loss     ``delta_term``   turns DnD's loss into λw·L_weight + λd·L_delta (``loss.py``)
  trainer  ``log_terms``    adds the loss terms where DnD logs its loss (``metrics.py``)

``installed_hooks(session)`` installs the session's hooks (all of them by default, in the order
above) and undoes them in reverse order on exit, also on errors, so DnD's classes and the
interpreter's globals are exactly as before. Hooks share state through the ``PluginSession``.
Install hooks before the DnD script builds its datasets and models; ``runner.py`` does this.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import LLGBMError
from .config import DnDPluginConfig

if TYPE_CHECKING:
    from .metrics import StepMetrics
    from .rows import RowRegistry

HOOK_KINDS = ("dataset", "loss", "trainer")
_BUILTIN_MODULES = ("rows", "loss", "metrics")  # each registers its hook on import


class HookError(LLGBMError):
    """A hook is unknown, or DnD does not offer what a hook attaches to."""


@dataclass(frozen=True)
class HookSpec:
    name: str
    kind: str
    install: Callable[["PluginSession"], Callable[[], None]]


HOOKS: dict[str, HookSpec] = {}


def register_hook(name: str, kind: str) -> Callable:
    """Decorator registering ``install(session) -> undo`` as hook ``name`` of ``kind``."""
    if kind not in HOOK_KINDS:
        raise HookError(f"hook {name!r}: kind must be one of {HOOK_KINDS}, got {kind!r}")

    def register(install: Callable[["PluginSession"], Callable[[], None]]) -> Callable:
        HOOKS[name] = HookSpec(name, kind, install)
        return install

    return register


def builtin_hooks() -> list[str]:
    """Names of all registered hooks, dataset hooks first, then loss, then trainer hooks."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return sorted(HOOKS, key=lambda name: HOOK_KINDS.index(HOOKS[name].kind))


@dataclass
class DnDTargets:
    """The DnD classes the hooks attach to: the dataset whose ``collate_fn_train`` drops checkpoint
    paths, and the model base class whose ``model`` attribute is the HyperConv decoder."""

    dataset: type
    model: type


def dnd_targets() -> DnDTargets:
    """DnD's ``Text2Qwen25LoRA_FullCondDataset`` (and so its subclasses) and ``HyperConvDecoderModel``
    (base of ``_FullCond`` and ``_SuperLarge``); the DnD root must be on ``sys.path``."""
    try:
        from workspace.dnd.dataset.register import Text2Qwen25LoRA_FullCondDataset
        from workspace.dnd.model.decoderonly import HyperConvDecoderModel
    except ImportError as e:
        raise HookError(f"cannot import DnD's workspace.dnd package ({e}); is the DnD root on sys.path?") from None
    return DnDTargets(dataset=Text2Qwen25LoRA_FullCondDataset, model=HyperConvDecoderModel)


@dataclass
class PluginSession:
    """What the hooks of one run share.

    Attributes:
        config: the plugin settings.
        dnd_root: DnD's repository root (relative settings are resolved against it).
        targets: the classes to hook; None = DnD's own (imported on first use).
        rows: filled by the dataset hook (``rows.RowRegistry``), read by the loss hook.
        metrics: filled by the loss hook (``metrics.StepMetrics``), read by the trainer hook.
    """

    config: DnDPluginConfig
    dnd_root: Path
    targets: DnDTargets | None = None
    rows: "RowRegistry | None" = None
    metrics: "StepMetrics | None" = None

    def __post_init__(self):
        from .metrics import StepMetrics
        from .rows import RowRegistry

        self.dnd_root = Path(self.dnd_root)
        self.rows = RowRegistry() if self.rows is None else self.rows
        self.metrics = StepMetrics() if self.metrics is None else self.metrics

    def resolve_targets(self) -> DnDTargets:
        if self.targets is None:
            self.targets = dnd_targets()
        return self.targets


@contextlib.contextmanager
def installed_hooks(session: PluginSession) -> Iterator[PluginSession]:
    """Install the session's hooks (``config.hooks``, or all) for the duration of the block."""
    known = builtin_hooks()
    names = list(session.config.hooks) or known
    unknown = [n for n in names if n not in HOOKS]
    if unknown:
        raise HookError(f"unknown hook {unknown[0]!r}: registered hooks are {known}")
    if "delta_term" in names and "row_ids" not in names and session.config.uses_delta:
        raise HookError("hook 'delta_term' needs 'row_ids' when lambda_delta > 0 (teachers are found by batch row)")
    undo: list[Callable[[], None]] = []
    try:
        for name in names:
            undo.append(HOOKS[name].install(session))
        yield session
    finally:
        for step in reversed(undo):
            step()
