"""Output matching: KL(teacher ‖ student) of next-token distributions, from the teacher's cached top-k.

The teacher's distribution at a position is stored as its top-k log-probabilities, their token ids
and the log-probability of everything else (the "rest" bucket), so a cache holds 2k + 1 numbers per
position instead of a vocabulary. The loss is the exact KL divergence between the two distributions
coarsened to those k + 1 buckets:

    KL = Σ_i p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest)

where q is the student's full softmax gathered at the teacher's k ids, and q_rest = 1 − Σ q_i, taken
as a logsumexp over the other logits (no cancellation). It is 0 when the student's distribution
equals the teacher's, ≥ 0 always, and with k = V it is the full KL. This is the signal of context
distillation (Doc-to-LoRA) and the behavioural analogue of Text-to-LoRA's SFT: it supervises what
the adapted model says, not a summary of its hidden states.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .weight import LossError, LossResult


def teacher_topk(logits: Tensor, k: int) -> Tensor:
    """The cache form of teacher logits (..., V): (..., 2k + 1) float32 = [top-k log-probs, rest log-prob,
    top-k ids (exact as float32 for vocabularies below 2**24)]."""
    if not 1 <= k <= logits.shape[-1]:
        raise LossError(f"top_k must be in [1, vocabulary size {logits.shape[-1]}], got {k}")
    if logits.shape[-1] >= 2**24:
        raise LossError(f"a vocabulary of {logits.shape[-1]} ids cannot be stored exactly as float32 ids")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top, ids = logprobs.topk(k, dim=-1)
    rest = logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True) if k < logits.shape[-1] \
        else torch.full_like(top[..., :1], float("-inf"))
    return torch.cat([top, rest.clamp_min(-1e4), ids.float()], dim=-1)  # -1e4: an empty rest, kept finite


def split_topk(target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(top-k log-probs, rest log-prob, ids) of a ``teacher_topk`` array (..., 2k + 1)."""
    k = (target.shape[-1] - 1) // 2
    if target.shape[-1] != 2 * k + 1 or k < 1:
        raise LossError(f"teacher top-k targets need 2k + 1 values per position, got {target.shape[-1]}")
    return target[..., :k], target[..., k], target[..., k + 1:].long()


class TopKKLLoss(nn.Module):
    """KL(teacher ‖ student) over positions; see the module docstring.

    ``forward(student_logits (..., V), target (..., 2k + 1), mask (...) bool)`` returns
    ``{"loss": mean KL over masked positions, "agreement": share of masked positions where the
    student's most likely token is the teacher's}``.
    """

    def forward(self, student_logits: Tensor, target: Tensor, mask: Tensor) -> LossResult:
        if student_logits.shape[:-1] != target.shape[:-1] or mask.shape != target.shape[:-1]:
            raise LossError(f"KL: student logits {tuple(student_logits.shape)}, teacher targets {tuple(target.shape)} "
                            f"and mask {tuple(mask.shape)} must agree in their leading dims")
        if not mask.any():
            raise LossError("KL: no answer position to compare (empty mask)")
        t_top, t_rest, ids = split_topk(target.float())
        logits = student_logits.float()
        total = logits.logsumexp(-1)  # (...)
        s_top = logits.gather(-1, ids) - total[..., None]  # (..., k)
        s_rest = logits.scatter(-1, ids, float("-inf")).logsumexp(-1) - total  # (...)
        p_top, p_rest = t_top.exp(), t_rest.exp()
        rest_term = torch.where(p_rest > 0, p_rest * (t_rest - s_rest.clamp_min(-1e4)), torch.zeros_like(p_rest))
        kl = (p_top * (t_top - s_top)).sum(-1) + rest_term  # (...)
        agree = logits.argmax(-1) == ids[..., 0]
        m = mask.to(kl.dtype)
        return {"loss": (kl * m).sum() / m.sum(), "agreement": (agree.to(m.dtype) * m).sum().detach() / m.sum()}
