"""Combined objectives: L = λw·L_weight + λd·L_delta, delta-only, and delta-guided (with a DeltaHead).

Each term's entries are logged as ``"<key>/<term>"`` (detached): e.g. ``"loss/weight"``,
``"loss/delta"``, ``"cos/delta"``. A term whose λ is 0 is still computed (without gradient) when its
inputs are given, so it can be monitored; a term whose λ is > 0 must get its inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..lora.factors import LoraFactors
from .delta import DeltaLoss
from .weight import LossError, LossResult


def check_lambdas(loss_name: str, **lambdas: float) -> None:
    for name, value in lambdas.items():
        if not math.isfinite(value) or value < 0:
            raise LossError(f"{loss_name}: {name} must be a finite number >= 0, got {value}")
    if not any(lambdas.values()):
        raise LossError(f"{loss_name}: at least one of {', '.join(lambdas)} must be > 0")


def add_term(out: LossResult, term: str, result: LossResult) -> Tensor:
    """Log every entry of a term's result as ``"<key>/<term>"`` (detached); return its loss."""
    for key, value in result.items():
        out[f"{key}/{term}"] = value.detach()
    return result["loss"]


def weighted_term(
    out: LossResult, term: str, weight: float, loss: nn.Module | None, pred, target, loss_name: str
) -> Tensor | None:
    """``weight · loss(pred, target)``, logged as ``term``; None when the term is off and not given."""
    if (pred is None) != (target is None):
        raise LossError(f"{loss_name}: the {term} term needs both a prediction and a target, got only one")
    if pred is None:
        if weight > 0:
            raise LossError(f"{loss_name}: lambda_{term} = {weight} > 0 but no {term} inputs were given")
        return None
    with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
        value = add_term(out, term, loss(pred, target))
    return weight * value if weight > 0 else None


def total_of(out: LossResult, terms: list[Tensor | None]) -> LossResult:
    """Put the sum of the active terms first, as ``"loss"``."""
    active = [t for t in terms if t is not None]
    return {"loss": sum(active[1:], active[0]), **out}


class BehaviourLoss(nn.Module):
    """``λw·L_weight + Σ_s λ_s·L_s``: a weight-space term and the losses of behaviour signals.

    The signals (``llgbm_ext.signals``: Δ, KL, ...) compute their own ``LossResult``s; this adds them
    with their λs and logs each one's entries as ``"<key>/<signal>"`` (e.g. ``"loss/kl"``,
    ``"cos/delta"``, ``"norm_ratio/delta"``). ``weight_loss`` is any weight-space loss (None when
    ``lambda_weight`` is 0); with ``lambda_weight = 0`` a given weight term is still logged.
    ``lambdas`` may be changed between steps (a warm-up); a signal whose λ is 0 is only logged.
    """

    def __init__(self, weight_loss: nn.Module | None, lambda_weight: float = 1.0,
                 lambdas: dict[str, float] | None = None):
        super().__init__()
        lambdas = dict(lambdas or {})
        check_lambdas(type(self).__name__, lambda_weight=lambda_weight, **{f"lambda_{k}": v for k, v in lambdas.items()})
        if weight_loss is None and lambda_weight > 0:
            raise LossError(f"{type(self).__name__}: lambda_weight = {lambda_weight} > 0 needs a weight_loss")
        self.weight_loss = weight_loss
        self.lambda_weight = float(lambda_weight)
        self.lambdas = {k: float(v) for k, v in lambdas.items()}

    def forward(self, *, weight_pred: Tensor | LoraFactors | None = None,
                weight_target: Tensor | LoraFactors | None = None,
                signals: dict[str, LossResult] | None = None) -> LossResult:
        name = type(self).__name__
        if self.weight_loss is None and weight_pred is not None:
            raise LossError(f"{name}: weight inputs were given but there is no weight_loss")
        out: LossResult = {}
        terms = [weighted_term(out, "weight", self.lambda_weight, self.weight_loss, weight_pred, weight_target, name)]
        for signal, result in (signals or {}).items():
            if signal not in self.lambdas:
                raise LossError(f"{name}: no lambda for signal {signal!r} (known: {', '.join(self.lambdas) or 'none'})")
            value = add_term(out, signal, result)
            terms.append(self.lambdas[signal] * value if self.lambdas[signal] > 0 else None)
        missing = [s for s, lam in self.lambdas.items() if lam > 0 and s not in (signals or {})]
        if missing:
            raise LossError(f"{name}: lambda_{missing[0]} = {self.lambdas[missing[0]]} > 0 but no {missing[0]} inputs were given")
        if all(t is None for t in terms):
            raise LossError(f"{name}: every λ is 0 or its term is missing; nothing to train")
        return total_of(out, terms)


class MultiTaskLoss(BehaviourLoss):
    """``λw·L_weight + λd·L_delta`` with Δ compared by a ``DeltaLoss`` (LLGBM's name; ``BehaviourLoss``
    with the one signal ``delta``).

    With ``lambda_delta = 0`` the delta inputs may be None (weight-only training: no probe forwards).
    Returns ``{"loss", "loss/weight", "loss/delta", "cos/delta", "norm_ratio/delta"}`` (the term keys
    only for terms whose inputs were given). Fixes LLGBM's ``MultiTaskLoss``, whose delta term scaled
    as 1/H (see ``delta.py``) and whose token branch the trainer never used.
    """

    def __init__(self, weight_loss: nn.Module | None, lambda_weight: float = 1.0, lambda_delta: float = 0.1,
                 delta_kind: str = "nmse"):
        super().__init__(weight_loss, lambda_weight, {"delta": lambda_delta})
        self.delta_loss = DeltaLoss(delta_kind)

    @property
    def lambda_delta(self) -> float:
        return self.lambdas["delta"]

    @lambda_delta.setter
    def lambda_delta(self, value: float) -> None:
        self.lambdas["delta"] = float(value)

    def forward(self, *, weight_pred: Tensor | LoraFactors | None = None,
                weight_target: Tensor | LoraFactors | None = None, delta_pred: Tensor | None = None,
                delta_teacher: Tensor | None = None) -> LossResult:
        if (delta_pred is None) != (delta_teacher is None):
            raise LossError("MultiTaskLoss: the delta term needs both a prediction and a target, got only one")
        signals = None
        if delta_pred is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.lambda_delta > 0):
                signals = {"delta": self.delta_loss(delta_pred, delta_teacher)}
        return super().forward(weight_pred=weight_pred, weight_target=weight_target, signals=signals)


class DeltaOnlyLoss(nn.Module):
    """The delta loss alone; returns ``{"loss", "loss/delta", "cos/delta", "norm_ratio/delta"}``."""

    def __init__(self, kind: str = "nmse"):
        super().__init__()
        self.delta_loss = DeltaLoss(kind)

    def forward(self, delta_pred: Tensor, delta_teacher: Tensor) -> LossResult:
        out: LossResult = {}
        return total_of(out, [add_term(out, "delta", self.delta_loss(delta_pred, delta_teacher))])


class DeltaGuidedLoss(nn.Module):
    """Delta supervision through a cheap ``DeltaHead`` plus occasional computed deltas.

    Every step: ``λp·L(Δ_head, Δ_teacher)``, where ``Δ_head = head(generator tokens)``. On steps with a
    computed delta (the trainer runs the probe forwards every N steps) it adds
    ``λc·L(Δ_computed, Δ_teacher)`` (the true behavioural gradient for the generator) and
    ``λcons·L(Δ_head, sg[Δ_computed])``: a consistency term that pulls the head toward the computed
    delta, with the computed side detached so it cannot pull the generator toward the head.

    With behaviour signals (``signals``: their results on a computed step, ``signal_lambdas``: their
    λs), the computed term is ``λc · Σ_s λ_s·L_s`` instead, logged as ``"<key>/<signal>"``, and
    ``delta_computed`` is the Δ signal's probe-averaged student Δ, for the consistency term.

    Fixes LLGBM's ``DeltaGuidedLoss``, which detached the head side of the consistency term and so
    trained the generator toward the head's guess instead of the head toward reality.
    Returns ``"loss"`` and ``"<key>/pred"``, plus ``"<key>/computed"`` (or one entry per signal) and
    ``"<key>/consistency"`` on steps with a computed delta, for key in loss, cos, norm_ratio.
    """

    def __init__(
        self,
        lambda_pred: float = 1.0,
        lambda_computed: float = 1.0,
        lambda_consistency: float = 0.5,
        kind: str = "nmse",
    ):
        super().__init__()
        check_lambdas(
            "DeltaGuidedLoss",
            lambda_pred=lambda_pred, lambda_computed=lambda_computed, lambda_consistency=lambda_consistency,
        )
        self.delta_loss = DeltaLoss(kind)
        self.lambda_pred = float(lambda_pred)
        self.lambda_computed = float(lambda_computed)
        self.lambda_consistency = float(lambda_consistency)

    def forward(self, delta_head: Tensor, delta_teacher: Tensor, delta_computed: Tensor | None = None,
                signals: dict[str, LossResult] | None = None,
                signal_lambdas: dict[str, float] | None = None) -> LossResult:
        out: LossResult = {}
        name = "DeltaGuidedLoss"
        terms = [weighted_term(out, "pred", self.lambda_pred, self.delta_loss, delta_head, delta_teacher, name)]
        if signals is not None and delta_computed is None:
            raise LossError(f"{name}: signal results need delta_computed (the Δ signal's student Δ)")
        if delta_computed is not None:
            if signals is None:
                computed = weighted_term(out, "computed", self.lambda_computed, self.delta_loss, delta_computed,
                                         delta_teacher, name)
            else:
                parts = [(signal_lambdas or {}).get(s, 1.0) * add_term(out, s, r) for s, r in signals.items()]
                computed = self.lambda_computed * sum(parts[1:], parts[0]) if self.lambda_computed > 0 else None
            terms += [
                computed,
                weighted_term(
                    out, "consistency", self.lambda_consistency, self.delta_loss,
                    delta_head, delta_computed.detach(), name,
                ),
            ]
        if all(t is None for t in terms):
            raise LossError(
                f"{name}: lambda_pred is 0, so a step without delta_computed has nothing to train"
            )
        return total_of(out, terms)
