"""Losses for prompt-to-LoRA generators: weight space, delta (behaviour) space, and their combinations.

Convention (every loss here): ``forward`` returns a ``LossResult = dict[str, Tensor]`` whose
``"loss"`` entry is the differentiable scalar to backpropagate; every other entry is a detached
scalar for logging. A combined loss logs each term's entries as ``"<key>/<term>"`` (unweighted), e.g.
``{"loss", "loss/weight", "loss/delta", "cos/delta", "norm_ratio/delta"}``. Bad shapes, ranks or keys
raise ``LossError`` (a ``ValueError`` and an ``LLGBMError``) naming the projection or argument.

  weight.py      TokenMSELoss (DnD's criterion), WeightLoss (raw A/B MSE), DeltaWLoss (ΔW MSE in low rank)
  delta.py       DeltaLoss: "nmse", "cosine", "mse", "dirnorm" on deltas (..., H), independent of H
  kl.py          TopKKLLoss: KL(teacher ‖ student) of next-token distributions from the teacher's cached top-k
  combined.py    BehaviourLoss (weights + behaviour signals), MultiTaskLoss, DeltaOnlyLoss, DeltaGuidedLoss
  delta_head.py  DeltaHead: predicts Δ from the generator's tokens, for DeltaGuidedLoss
"""

from .combined import BehaviourLoss, DeltaGuidedLoss, DeltaOnlyLoss, MultiTaskLoss
from .delta import DELTA_LOSS_KINDS, DeltaLoss
from .delta_head import DeltaHead
from .kl import TopKKLLoss, teacher_topk
from .weight import DeltaWLoss, LossError, LossResult, TokenMSELoss, WeightLoss, lowrank_sq_distance

__all__ = [
    "BehaviourLoss",
    "DELTA_LOSS_KINDS",
    "DeltaGuidedLoss",
    "DeltaHead",
    "DeltaLoss",
    "DeltaOnlyLoss",
    "DeltaWLoss",
    "LossError",
    "LossResult",
    "MultiTaskLoss",
    "TokenMSELoss",
    "TopKKLLoss",
    "WeightLoss",
    "lowrank_sq_distance",
    "teacher_topk",
]
