"""Stacked LoRA factors: the in-memory form that tokens, generators and the functional LoRA share.

``factors[proj] = (A, B)`` with ``A: (..., L, r, in)`` and ``B: (..., L, out, r)`` for every target
projection of a layout; leading dims (if any) index adapters in a batch. A PEFT state dict is the
on-disk form with one tensor per layer and factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import LoraLayout, peft_key

LoraFactors = dict[str, tuple[Tensor, Tensor]]


def factors_from_state_dict(state_dict: dict[str, Tensor], layout: LoraLayout) -> LoraFactors:
    """Stack a (validated) PEFT state dict into per-projection factors of shape (L, r, in), (L, out, r)."""
    return {
        proj: tuple(
            torch.stack([state_dict[peft_key(i, proj, factor)] for i in range(layout.num_layers)])
            for factor in ("A", "B")
        )
        for proj in layout.targets
    }


def state_dict_from_factors(factors: LoraFactors, layout: LoraLayout) -> dict[str, Tensor]:
    """Split the factors of ONE adapter (no leading batch dims) into a PEFT state dict."""
    state_dict = {}
    for proj in layout.targets:
        a, b = factors[proj]
        if a.dim() != 3:
            raise ValueError(f"state_dict_from_factors takes one adapter; {proj} lora_A has shape {tuple(a.shape)}")
        a, b = a.contiguous(), b.contiguous()  # one copy per projection; the per-layer tensors are views
        for i in range(layout.num_layers):
            state_dict[peft_key(i, proj, "A")] = a[i]
            state_dict[peft_key(i, proj, "B")] = b[i]
    return state_dict


def random_factors(
    layout: LoraLayout, *batch: int, generator: torch.Generator | None = None, std: float = 0.02
) -> LoraFactors:
    """Random (non-zero) factors, e.g. for tests and benchmarks: both A and B drawn from N(0, std²)."""
    out = {}
    for proj in layout.targets:
        a_shape, b_shape = layout.factor_shapes(proj)
        a = torch.randn(*batch, layout.num_layers, *a_shape, generator=generator) * std
        b = torch.randn(*batch, layout.num_layers, *b_shape, generator=generator) * std
        out[proj] = (a, b)
    return out
