"""SimpleGenerator: pooled prompt embeddings -> DnD tokens with a small per-token hypernetwork.

The N prompt embeddings of a task are averaged (order-free, any N) and mapped by an MLP to a task
vector ``t``. Every LoRA token n has a learned embedding ``e_n``; its (H, W) cells are a shared
linear read-out of ``gelu(LayerNorm(t + e_n))``. The parameter count is
``C·D + D² + N_tok·D + D·H·W`` (about 0.2 M for the ``tiny`` layout at D = 128), against DnD's
HyperConv whose last convolution alone holds 713 M parameters at 0.5B. It serves small layouts and
fast experiments; the behaviour of the generated adapter, not an exact copy of teacher weights, is
what the delta loss asks for.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SimpleGenerator(nn.Module):
    """Condition (B, N, C) of pooled prompt embeddings -> tokens (B, N_tok, H, W)."""

    def __init__(self, embed_dim: int, num_tokens: int, token_size: tuple[int, int], hidden_size: int = 128):
        super().__init__()
        self.embed_dim = embed_dim
        self.token_size = tuple(token_size)
        self.task = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )
        self.token_embedding = nn.Parameter(torch.randn(num_tokens, hidden_size))
        self.norm = nn.LayerNorm(hidden_size)
        self.output_layer = nn.Linear(hidden_size, self.token_size[0] * self.token_size[1])

    def forward(self, condition: Tensor) -> Tensor:
        if condition.dim() != 3 or condition.shape[-1] != self.embed_dim:
            raise ValueError(
                f"SimpleGenerator condition must be (B, N, {self.embed_dim}) pooled prompt embeddings, "
                f"got {tuple(condition.shape)}"
            )
        task = self.task(condition.mean(dim=1))  # (B, D)
        per_token = nn.functional.gelu(self.norm(task[:, None, :] + self.token_embedding))  # (B, N_tok, D)
        return self.output_layer(per_token).unflatten(-1, self.token_size)
