"""Loss hook ``delta_term``: DnD's training loss becomes λw·L_weight + λd·L_delta; DnD's forward is untouched.

DnD's loop only sees ``loss = model(source=None, mask=..., condition=..., target=tokens,
noise_enhance=...)`` (contract §2.1, §7). While installed, every DnD generator model built
(``HyperConvDecoderModel`` and its ``_FullCond`` / ``_SuperLarge`` subclasses) gets three PyTorch hooks:

* a forward pre-hook on the model: on a training forward (``model.training``, grad enabled, a
  target, no ``generate``) it notes the mask and, on delta steps, fingerprints the clean target
  rows (``rows.token_fingerprint``; DnD adds its noise to the target in place later);
* a forward hook on the HyperConv decoder ``model.model``: it keeps the prediction
  ``(B, N_tok, H, W)`` and hands DnD a clone, since DnD's criterion writes into its input in place;
* a forward hook on the model that replaces DnD's returned loss by ``BehaviourLoss``:
  ``λw · TokenMSELoss(pred, target)`` (DnD's criterion: its criterion weights, its mask, the
  noised target) ``+ Σ_s λ_s · L_s``, where each behaviour signal s (``llgbm_ext.signals``: Δ, KL)
  runs the LoRAs the prediction encodes (the differentiable DnD-exact ``detokenize``) on the frozen
  base model through ``FunctionalLoRA``, against the cached targets of the checkpoint each row came
  from (``teachers.py``). The hook has no branch per signal: it calls every signal the same way.

Generation (``model.generate`` or ``generate=True``), evaluation forwards and models built before
the hooks were installed are left alone. The base model, the signals and their teacher targets are set
up at the first delta step, on the generator's device (misses split over the ranks, rank 0 writes the
DeltaCache). Signals run with autocast off and the base model in ``config.dtype``, for the student
exactly as for the teachers, whatever mixed precision DnD was launched with.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor, nn

from ..delta.cache import DeltaCache
from ..lora.layout import LoraLayout, get_layout
from ..lora.tokens import detokenize
from ..losses import BehaviourLoss, TokenMSELoss
from ..losses.weight import LossResult
from ..models.registry import load_base_model, resolve_base_model
from ..paths import cache_dir
from ..signals import BehaviourSignal, build_signals
from ..signals.base import rank
from ..training.config import DeltaConfig
from .config import DnDPluginConfig, under_root
from .hooks import HookError, register_hook
from .rows import token_fingerprint
from .teachers import TeacherError, TeacherRows, checkpoint_task, plugin_teacher_set

if TYPE_CHECKING:
    from .hooks import PluginSession

_ARGS = ("source", "mask", "condition", "target")  # DnD's ModelInterface.forward positional order


def _argument(args: tuple, kwargs: dict, name: str):
    index = _ARGS.index(name)
    return args[index] if len(args) > index else kwargs.get(name)


@dataclass
class BehaviourTerm:
    """What the behaviour term needs in one process: the layout, the signals on the frozen base model
    with the targets of every training checkpoint, and which checkpoint a row's teacher is."""

    layout: LoraLayout
    signals: dict[str, BehaviourSignal]
    teachers: TeacherRows

    @classmethod
    def build(cls, config: DnDPluginConfig, dnd_root: Path, checkpoints: Sequence[str], device: torch.device) -> "BehaviourTerm":
        """Load the base model, build the signals and prepare the targets of ``checkpoints`` (via the DeltaCache)."""
        if not checkpoints:
            raise TeacherError("no training checkpoints were registered; the behaviour term has no teachers")
        layout = get_layout(under_root(config.layout, dnd_root))
        dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        base_model = under_root(config.base_model, dnd_root)
        model_dir = resolve_base_model(base_model)
        model, tokenizer = load_base_model(model_dir, dtype=dtype, device=device)
        inputs = under_root(config.train_inputs, dnd_root) if config.train_inputs else None
        teachers = plugin_teacher_set(checkpoints, layout, str(model_dir), inputs, config.needs_train_inputs)
        tasks = [checkpoint_task(p) for p in checkpoints]
        probes = under_root(config.probes, dnd_root)
        delta = DeltaConfig(probes=probes, probes_per_task=config.probes_per_task, reduce=config.reduce)
        signals = build_signals(config.signals, model, tokenizer, teachers, list(dict.fromkeys(tasks)),
                                base_model=str(model_dir), model_dir=model_dir, delta=delta, kl=config.kl,
                                delta_kind=config.delta_kind)
        cache = DeltaCache(under_root(config.cache_dir, dnd_root) if config.cache_dir else cache_dir() / "delta_cache")
        for signal in signals.values():
            signal.prepare(checkpoints, tasks, cache, config.teacher_batch_size, progress=rank() == 0)
        return cls(layout, signals, TeacherRows.of(list(checkpoints), layout))

    def __call__(self, pred: Tensor, candidates: Sequence[Sequence[str]], step: int) -> dict[str, LossResult]:
        """Each signal's loss for the LoRAs a batch of predicted tokens (K, N_tok, H, W) encodes, against
        the teachers of the rows' checkpoints; differentiable."""
        expected = (self.layout.num_tokens, *self.layout.token_size)
        if tuple(pred.shape[1:]) != expected:
            raise HookError(
                f"the generator predicts tokens of shape {tuple(pred.shape[1:])}, layout {self.layout.name!r} "
                f"expects {expected}; set `layout` in the plugin config to the generator's LoRA layout"
            )
        factors = detokenize(pred, self.layout)
        index = self.teachers.index(candidates, pred.device)
        return {name: signal(factors, index, step).loss for name, signal in self.signals.items()}


@dataclass
class _Forward:
    """One training forward in flight: set by the pre-hook, completed by the capture and post hooks."""

    module: nn.Module
    mask: Tensor
    use_delta: bool
    fingerprints: Tensor | None = None
    pred: Tensor | None = None


class DeltaLossHook:
    """The hooks of ``delta_term`` for one session; ``attach(model)`` adds them to a DnD model."""

    def __init__(self, session: "PluginSession"):
        self.session = session
        self.config: DnDPluginConfig = session.config
        self.step = 0  # training forwards seen
        self.term: BehaviourTerm | None = None
        self.losses: dict[tuple[nn.Module, bool], BehaviourLoss] = {}  # (model, use_delta) -> loss
        self._active: _Forward | None = None
        self._handles: list = []
        self._captures: "weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, object]]" = weakref.WeakKeyDictionary()

    def attach(self, model: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._post, with_kwargs=True))

    def detach_all(self) -> None:
        for handle in self._handles + [h for _, h in self._captures.values()]:
            handle.remove()
        self._handles.clear()
        self._captures.clear()

    # -- hooks ---------------------------------------------------------------------------------------

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._active = None
        target = _argument(args, kwargs, "target")
        if not module.training or not torch.is_grad_enabled() or kwargs.get("generate") is not None or target is None:
            return
        if getattr(module, "return_individual_loss", False):
            raise HookError("DnD models built with return_individual_loss=True return a list of losses; not supported")
        use_delta = self.config.uses_delta and self.step % self.config.delta_every == 0
        rows = self._delta_rows(target.shape[0])
        fingerprints = token_fingerprint(target[:rows]) if use_delta else None
        self._active = _Forward(module, _argument(args, kwargs, "mask"), use_delta, fingerprints)
        self._watch_decoder(module)

    def _watch_decoder(self, module: nn.Module) -> None:
        """Keep one capture hook on the module's current HyperConv decoder ``module.model``."""
        decoder = getattr(module, "model", None)
        if not isinstance(decoder, nn.Module):
            raise HookError(f"{type(module).__name__} has no HyperConv decoder at .model to capture")
        known = self._captures.get(module)
        if known is not None and known[0] is decoder:
            return
        if known is not None:
            known[1].remove()
        self._captures[module] = (decoder, decoder.register_forward_hook(self._capture_for(module)))

    def _capture_for(self, owner: nn.Module) -> Callable:
        def capture(decoder: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            active = self._active
            if active is None or active.module is not owner or active.pred is not None:
                return None  # generation, evaluation, or a second decoder call: untouched
            active.pred = output
            return output.clone()  # DnD's criterion overwrites its input in place; ours stays intact

        return capture

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output) -> Tensor | None:
        active, self._active = self._active, None
        if active is None or active.module is not module:
            return None
        if active.pred is None:
            raise HookError(f"{type(module).__name__}.forward did not call its HyperConv decoder .model")
        target = _argument(args, kwargs, "target")  # DnD has added its noise in place by now
        result = self._loss(active, target)
        self.session.metrics.record(result)
        self.step += 1
        return result["loss"]

    # -- the loss ------------------------------------------------------------------------------------

    def _delta_rows(self, batch: int) -> int:
        return min(batch, self.config.delta_rows) if self.config.delta_rows else batch

    def _loss(self, active: _Forward, target: Tensor) -> dict[str, Tensor]:
        pred, module = active.pred, active.module
        weight_target = target.detach().masked_fill(~active.mask.to(target.device), math.nan)  # DnD's mask
        loss = self._multitask(module, active.use_delta, pred.device)
        if not active.use_delta:
            return loss(weight_pred=pred, weight_target=weight_target)
        with torch.autocast(device_type=pred.device.type, enabled=False):
            if self.term is None:
                self.term = BehaviourTerm.build(self.config, self.session.dnd_root, self.session.rows.checkpoints(),
                                                pred.device)
            rows = self._delta_rows(pred.shape[0])
            signals = self.term(pred[:rows], self.session.rows.lookup(active.fingerprints), self.step)
            return loss(weight_pred=pred, weight_target=weight_target, signals=signals)

    def _multitask(self, module: nn.Module, use_delta: bool, device: torch.device) -> BehaviourLoss:
        key = (module, use_delta)
        if key not in self.losses:
            weights = getattr(module, "criterion_weight", None)
            token_loss = TokenMSELoss(None if weights is None else weights.detach().flatten())
            lambdas = self.config.signal_lambdas() if use_delta else {}
            self.losses[key] = BehaviourLoss(token_loss, self.config.lambda_weight, lambdas).to(device)
        return self.losses[key]


@register_hook("delta_term", "loss")
def install(session: "PluginSession") -> Callable[[], None]:
    """Attach the hooks to every DnD generator model constructed while installed."""
    cls = session.resolve_targets().model
    hook = DeltaLossHook(session)
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        hook.attach(self)

    cls.__init__ = init

    def undo() -> None:
        cls.__init__ = original
        hook.detach_all()

    return undo
