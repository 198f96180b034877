"""DnD's 2-D LoRA token format, vectorised: ``tokenize`` (factors -> tokens) and a differentiable ``detokenize``.

Reproduces DnD's ``Qwen*LoRA_Tokenizer2D`` (``LoraTokenizer2D_Qwen`` wrapped by
``Tokenizer2D.with_scales_wrapper``) exactly, without a Python loop over chunks:

* every chunk (r × chunk block of A, or of Bᵀ) is z-normalised with its own mean and unbiased std
  and written to the top-left of an (H, W) token; unused cells are NaN (none with DnD's sizes);
* its scale code ``m' = 8·mean``, ``s' = log(0.9·std + 0.1) + 1.6`` overwrites the last two rows
  (pattern ``m', s', m', s', …``) and the last two columns (``[m', s']`` on every row);
* decoding averages the code of the two rows and of the two columns, decodes
  ``mean = m'/8`` and ``std = (exp(s' − 1.6) − 0.1)/0.9`` for each row parity, averages the two
  decoded values, and returns ``x·std + mean`` on the data block.

Two deliberate differences, both only where DnD's output is degenerate or lossy:
* a chunk with zero variance (e.g. PEFT's all-zero initial lora_B) gives zeros instead of DnD's
  NaN (0/0), so it decodes back to its constant value instead of NaN;
* statistics are always computed in float32. DnD computes them in the checkpoint's dtype (bf16 in
  its datasets), so for bf16 inputs DnD's tokens differ from ours by about one bf16 rounding of the
  mean and std (relative ~4e-3); for float32 inputs the two agree to a few float32 ulps.
Tokens are float32, as DnD's (its padding buffer is float32). ``detokenize`` also computes in float32
and returns float32 factors for half-precision tokens: the std code ``exp(s' − 1.6) − 0.1`` cancels
for the small stds of LoRA weights (≈0.02), and doing that arithmetic in bf16 costs ~8% relative error
against ~1.4% from bf16 token values alone (measured on random tiny adapters).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .factors import LoraFactors, factors_from_state_dict, state_dict_from_factors
from .layout import LoraLayout

MEAN_SCALE = 8.0  # DnD's with_scales_wrapper(mean_scale=8.0)
STD_BIAS = 1.6  # DnD's with_scales_wrapper(std_bias=1.6)


def factors_to_chunks(factors: LoraFactors, layout: LoraLayout) -> Tensor:
    """(..., N, r, chunk): every A-chunk and Bᵀ-chunk of the adapter(s), in token order."""
    c = layout.chunk
    parts = []
    for proj in layout.targets:
        a, b = factors[proj]  # (..., L, r, in), (..., L, out, r)
        parts.append(a.unflatten(-1, (-1, c)).movedim(-2, -3))  # (..., L, n_A, r, c)
        parts.append(b.transpose(-1, -2).unflatten(-1, (-1, c)).movedim(-2, -3))  # (..., L, n_B, r, c)
    return torch.cat(parts, dim=-3).flatten(-4, -3)  # (..., L * tokens_per_layer, r, c)


def chunks_to_factors(chunks: Tensor, layout: LoraLayout) -> LoraFactors:
    """Inverse of ``factors_to_chunks`` (differentiable)."""
    per_layer = chunks.unflatten(-3, (layout.num_layers, layout.tokens_per_layer))  # (..., L, T, r, c)
    sizes = [n for proj in layout.targets for n in layout.tokens_per_module(proj)]
    parts = per_layer.split(sizes, dim=-3)
    factors = {}
    for k, proj in enumerate(layout.targets):
        a = parts[2 * k].movedim(-3, -2).flatten(-2, -1)  # (..., L, r, in)
        bt = parts[2 * k + 1].movedim(-3, -2).flatten(-2, -1)  # (..., L, r, out)
        factors[proj] = (a, bt.transpose(-1, -2))
    return factors


def tokenize(factors: LoraFactors, layout: LoraLayout) -> Tensor:
    """Factors of one or more adapters -> DnD tokens of shape (..., N_tok, H, W), float32."""
    height, width = layout.token_size
    r, c = layout.rank, layout.chunk
    x = factors_to_chunks(factors, layout).float()  # (..., N, r, c)
    mean = x.mean(dim=(-2, -1))
    std = x.std(dim=(-2, -1)) if r * c > 1 else torch.ones_like(mean)  # DnD: std := 1 when undefined
    z = (x - mean[..., None, None]) / torch.where(std == 0, 1.0, std)[..., None, None]

    tokens = torch.full((*x.shape[:-2], height, width), float("nan"), dtype=torch.float32, device=x.device)
    tokens[..., :r, :c] = z
    m_code = mean * MEAN_SCALE
    s_code = torch.log(std * 0.9 + 0.1) + STD_BIAS
    tokens[..., height - 2 :, 0::2] = m_code[..., None, None]
    tokens[..., height - 2 :, 1::2] = s_code[..., None, None]
    tokens[..., :, width - 2] = m_code[..., None]
    tokens[..., :, width - 1] = s_code[..., None]
    return tokens


def decode_scales(tokens: Tensor, layout: LoraLayout) -> tuple[Tensor, Tensor]:
    """Per-token (mean, std) decoded from the scale code, as DnD does; each of shape (..., N)."""
    height, width = layout.token_size
    rows = tokens[..., height - 2 :, :].unflatten(-1, (width // 2, 2)).mean(dim=-2)  # (..., N, 2, 2)
    cols = tokens[..., :, width - 2 :].unflatten(-2, (height // 2, 2)).mean(dim=-3)  # (..., N, 2, 2)
    code = (rows + cols) * 0.5  # [row parity, (m', s')]
    mean = code[..., 0] / MEAN_SCALE
    std = (torch.exp(code[..., 1] - STD_BIAS) - 0.1) / 0.9
    return (mean[..., 0] + mean[..., 1]) / 2, (std[..., 0] + std[..., 1]) / 2


def detokenize(tokens: Tensor, layout: LoraLayout) -> LoraFactors:
    """DnD tokens (..., N_tok, H, W) -> factors (at least float32); differentiable in every token entry it reads."""
    if tuple(tokens.shape[-3:]) != (layout.num_tokens, *layout.token_size):
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not match layout {layout.name!r}: "
            f"expected (..., {layout.num_tokens}, {layout.token_size[0]}, {layout.token_size[1]})"
        )
    if tokens.dtype in (torch.bfloat16, torch.float16):
        tokens = tokens.float()
    mean, std = decode_scales(tokens, layout)
    chunks = tokens[..., : layout.rank, : layout.chunk] * std[..., None, None] + mean[..., None, None]
    return chunks_to_factors(chunks, layout)


def lora_to_tokens(state_dict: dict[str, Tensor], layout: LoraLayout) -> Tensor:
    """PEFT state dict of one adapter -> tokens (N_tok, H, W)."""
    return tokenize(factors_from_state_dict(state_dict, layout), layout)


def tokens_to_lora(tokens: Tensor, layout: LoraLayout) -> dict[str, Tensor]:
    """Tokens (N_tok, H, W) of one adapter -> PEFT state dict."""
    return state_dict_from_factors(detokenize(tokens, layout), layout)
