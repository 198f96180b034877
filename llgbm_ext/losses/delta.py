"""Delta losses: compare predicted and teacher delta-activations Δ of shape (..., H).

Four kinds, each averaged over the leading (batch, probe) dims:
* ``"nmse"``    ``‖p/|p| − t/|t|‖²`` summed over H, i.e. 2 − 2·cos; range [0, 4].
* ``"cosine"``  1 − cos; range [0, 2]. Half of "nmse": the same gradient direction, half the size.
* ``"mse"``     ``‖p − t‖² / ‖t‖²``, the relative squared error; 0 when equal, 1 for p = 0. Unlike the
                first two it also supervises the magnitude of Δ, but a wrong norm and a wrong direction
                trade against each other in one number.
* ``"dirnorm"`` ``(2 − 2·cos) + log²(‖p‖ / ‖t‖)``: the direction term of "nmse" plus a separate,
                scale-free term for the magnitude, so a Δ half or twice the teacher's costs the same
                whatever the direction (the "norm_ratio" entry reports ‖p‖ / ‖t‖).

All four are dimensionless and do not depend on the hidden size H, so λ weights carry over between
base models. LLGBM's normalised MSE was ``mse_loss(normalize(p), normalize(t))`` = (2 − 2·cos)/H, about
1e-3 for H = 896, which made λ_delta depend on the model size (fixed here: "nmse" sums over H).

Zero vectors give finite values and gradients: norms are clamped at ``eps`` (the direction of a zero
Δ is undefined, so its gradient is of order 1/eps; clip gradients as usual).
"""

from __future__ import annotations

from torch import Tensor, nn

from .weight import LossError, LossResult, compute_dtype

DELTA_LOSS_KINDS = ("nmse", "cosine", "mse", "dirnorm")


class DeltaLoss(nn.Module):
    """One delta loss; returns ``{"loss", "cos", "norm_ratio"}`` (the last two: detached means of
    cos(p, t) and |p|/|t|, for logging)."""

    def __init__(self, kind: str = "nmse", eps: float = 1e-8):
        super().__init__()
        if kind not in DELTA_LOSS_KINDS:
            raise LossError(f"delta loss kind must be one of {list(DELTA_LOSS_KINDS)}, got {kind!r}")
        self.kind = kind
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor) -> LossResult:
        if pred.shape != target.shape or pred.dim() < 1:
            raise LossError(
                f"delta loss: predicted delta {tuple(pred.shape)} and teacher delta {tuple(target.shape)} "
                "must have the same shape (..., H)"
            )
        dtype = compute_dtype(pred)
        p, t = pred.to(dtype), target.to(dtype)
        p_norm = p.norm(dim=-1).clamp_min(self.eps)
        t_norm = t.norm(dim=-1).clamp_min(self.eps)
        cos = (p * t).sum(dim=-1) / (p_norm * t_norm)
        if self.kind == "nmse":
            per_delta = (p / p_norm[..., None] - t / t_norm[..., None]).square().sum(dim=-1)
        elif self.kind == "cosine":
            per_delta = 1.0 - cos
        elif self.kind == "dirnorm":
            per_delta = 2.0 - 2.0 * cos + (p_norm.log() - t_norm.log()).square()
        else:
            per_delta = (p - t).square().sum(dim=-1) / t_norm.square()
        return {
            "loss": per_delta.mean(),
            "cos": cos.detach().mean(),
            "norm_ratio": (p_norm / t_norm).detach().mean(),
        }
