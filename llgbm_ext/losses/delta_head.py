"""DeltaHead: a cheap predictor of an adapter's delta-activation Δ (H,) from the generator's LoRA tokens.

Reads the generator's OUTPUT, DnD tokens (..., N, Htok, Wtok) (factors: ``lora.tokens.tokenize``
them first), so it can learn the map adapter -> behaviour. LLGBM's delta head read the text
embeddings instead, so it could only learn prompt -> teacher Δ and said nothing about the adapter
the generator actually produced.

Architecture, per token n: ``e_n = W·flatten(token_n) + pos_n`` (one projection shared by all tokens,
Htok·Wtok -> dim, plus a learned position embedding so the layer / projection / chunk of a token
matters), then ``GELU(LayerNorm(e_n))``, a mean over tokens, and an MLP dim -> mlp_dim -> H. Parameters:
Htok·Wtok·dim + N·dim + dim·mlp_dim + mlp_dim·H (about 1.2 M for Qwen2.5-0.5B: N = 4296 tokens of
10×130, H = 896), never N·Htok·Wtok·H (5·10⁹).

``backprop_to_generator`` (default False) decides whether the head's losses reach the generator.
The head is fitted both to the teacher Δ (L_pred) and to the computed Δ (consistency), so its input
gradient is not the Jacobian of the true map tokens -> Δ; letting L_pred flow into the generator
lets generator and head co-adapt to lower L_pred without changing the adapter's behaviour. With
False the generator's delta signal comes only from computed deltas (λ_computed) and the head is a
free-running, monitored estimate of Δ. Set True to use the head as a learned surrogate on steps
without probe forwards, once its consistency loss shows it tracks the computed Δ.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..lora.layout import LoraLayout
from .weight import LossError


class DeltaHead(nn.Module):
    """Tokens (..., N, Htok, Wtok) of a layout -> predicted Δ (..., hidden_size)."""

    def __init__(self, layout: LoraLayout, dim: int = 128, mlp_dim: int = 512, backprop_to_generator: bool = False):
        super().__init__()
        self.num_tokens = layout.num_tokens
        self.token_size = tuple(layout.token_size)
        self.backprop_to_generator = backprop_to_generator
        self.token_proj = nn.Linear(self.token_size[0] * self.token_size[1], dim)
        self.position = nn.Parameter(torch.randn(self.num_tokens, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, layout.hidden_size))

    def forward(self, tokens: Tensor) -> Tensor:
        if tuple(tokens.shape[-3:]) != (self.num_tokens, *self.token_size):
            raise LossError(
                f"DeltaHead: tokens of shape {tuple(tokens.shape)} do not match the layout: expected "
                f"(..., {self.num_tokens}, {self.token_size[0]}, {self.token_size[1]})"
            )
        if not self.backprop_to_generator:
            tokens = tokens.detach()
        x = torch.nan_to_num(tokens, nan=0.0).flatten(-2).to(self.token_proj.weight.dtype)  # (..., N, Htok*Wtok)
        x = F.gelu(self.norm(self.token_proj(x) + self.position))  # (..., N, dim)
        return self.mlp(x.mean(dim=-2))  # (..., H)
