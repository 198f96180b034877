"""HyperConv: DnD's prompt-to-LoRA decoder, written from its description (contract §1.2).

Every tensor is 4-D ``(B, L, H, W)``. ``L`` is a channel-like axis: the number of prompts at the
input, the number of LoRA tokens at the output. A stack of layers walks a list of feature triples
``(L, H, W)`` from the condition ``(N, L_text, C)`` (N prompts × L_text text tokens × C features) to
DnD's token tensor ``(N_tok, H_tok, W_tok)``:

* ``HyperConv3d`` reshapes (H, W) -> (H', W') at fixed L with two branches of 2-D convolutions, each
  convolving one axis's sizes as channels over the plane of the two other axes: width first
  (W -> W', then H -> H'; linear) and height first (H -> H', then W -> W'; tanh). The output is
  ``(width_first + height_first + bias) / 3`` after a LayerNorm over (H, W) at the input.
* ``HyperConvLayer`` follows it with a convolution ``L -> L'`` over the (H', W') plane.
* ``HyperConvBlock`` chains one layer per consecutive pair of triples (residual where shapes match).

Module and parameter names equal DnD's, so a DnD ``HyperConvDecoder`` state dict loads unchanged
(``decoder.module_list.{i}.linear1.{norm,conv1w,conv1h,conv2h,conv2w,bias}``, ``...linear2``), and the
forward pass equals DnD's (checked against DnD's own module in the tests when ``dnd_repo`` is present).
DnD's 0.5B configuration has ≈1.113 B parameters, 713 M of them in the last ``linear2``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

Features = tuple[int, int, int]


class HyperConv3d(nn.Module):
    """(..., L, H, W) -> (..., L, H', W'): LayerNorm, then two factorised convolution branches."""

    def __init__(self, in_features: Features, out_features: Features, kernel_size: int):
        super().__init__()
        _, h_in, w_in = in_features
        _, h_out, w_out = out_features
        self.norm = nn.LayerNorm([h_in, w_in])
        self.conv1w = nn.Conv2d(w_in, w_out, kernel_size, padding="same", bias=False)
        self.conv1h = nn.Conv2d(h_in, h_out, kernel_size, padding="same", bias=False)
        self.conv2h = nn.Conv2d(h_in, h_out, kernel_size, padding="same", bias=False)
        self.conv2w = nn.Conv2d(w_in, w_out, kernel_size, padding="same", bias=False)
        bound = 1.0 / (h_out * w_out)
        self.bias = nn.Parameter(torch.empty(h_out, w_out).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        leading = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])  # (B, L, H, W)
        # width first: W as channels over the (H, L) plane, then H as channels over the (L, W') plane
        wide = self.conv1w(x.permute(0, 3, 2, 1))  # (B, W', H, L)
        wide = self.conv1h(wide.permute(0, 2, 3, 1)).transpose(1, 2)  # (B, H', L, W') -> (B, L, H', W')
        # height first: H as channels over the (L, W) plane, then W as channels over the (H', L) plane
        high = self.conv2h(x.transpose(1, 2))  # (B, H', L, W)
        high = torch.tanh(self.conv2w(high.permute(0, 3, 1, 2)).permute(0, 3, 2, 1))  # (B, W', H', L) -> (B, L, H', W')
        out = (wide + high + self.bias) / 3
        return out.reshape(*leading, *out.shape[1:])


class HyperConvLayer(nn.Module):
    """(..., L, H, W) -> (..., L', H', W'): ``HyperConv3d`` then a convolution L -> L' over (H', W')."""

    def __init__(self, in_features: Features, out_features: Features, kernel_size: int):
        super().__init__()
        self.linear1 = HyperConv3d(in_features, out_features, kernel_size)
        self.linear2 = nn.Conv2d(in_features[0], out_features[0], kernel_size, padding="same")

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear1(x)
        return self.linear2(y.reshape(-1, *y.shape[-3:])).reshape(*y.shape[:-3], -1, *y.shape[-2:])


class HyperConvBlock(nn.Module):
    """One ``HyperConvLayer`` per consecutive pair of feature triples; residual where shapes match."""

    def __init__(self, features: Sequence[Features], kernel_size: int):
        super().__init__()
        self.module_list = nn.ModuleList(
            HyperConvLayer(tuple(a), tuple(b), kernel_size) for a, b in zip(features[:-1], features[1:])
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.module_list:
            y = layer(x)
            x = x + y if y.shape == x.shape else y
        return x


class HyperConvDecoder(nn.Module):
    """Condition (B, N, L_text, C) = ``features[0]`` -> tokens (B, N_tok, H_tok, W_tok) = ``features[-1]``."""

    def __init__(self, features: Sequence[Features], kernel_size: int):
        super().__init__()
        features = [tuple(int(x) for x in f) for f in features]
        if len(features) < 2 or any(len(f) != 3 or min(f) <= 0 for f in features):
            raise ValueError(f"HyperConv features must be at least two positive (L, H, W) triples, got {features}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"HyperConv kernel_size must be odd and positive, got {kernel_size}")
        self.features = features
        self.decoder = HyperConvBlock(features, kernel_size)

    @property
    def output_layer(self) -> nn.Conv2d:
        """The last ``L -> N_tok`` convolution, which writes the tokens."""
        return self.decoder.module_list[-1].linear2

    def forward(self, condition: Tensor) -> Tensor:
        if tuple(condition.shape[-3:]) != self.features[0]:
            raise ValueError(
                f"HyperConv condition of shape {tuple(condition.shape)} does not end in "
                f"features[0] = {self.features[0]}"
            )
        return self.decoder(condition)
