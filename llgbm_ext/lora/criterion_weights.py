"""DnD's per-token criterion weights: how much each token varies over a folder of checkpoints.

For the tokens T_k (N, H, W) of the checkpoints k = 1..K of one training folder, DnD computes the
element-wise population std σ (two streaming passes, NaN propagating), then

    w_n = mean_{h,w}(σ_n) / mean_{n,h,w}(σ)      (written as nanmean(σ / nansum|σ|) · count(non-NaN σ))

so the weights average 1.0 and tokens that move more during training weigh more in the token MSE.
Training uses the mean of the weights of the training folders (``calculate_mean_criterion_weight``).

Here one pass over the files suffices (Welford's update in float64; DnD reads every checkpoint twice
and accumulates in float32), tokens come from the vectorised tokenizer, and the files of a folder
are taken in numeric step order (DnD takes the first ``real_length`` entries of an unsorted
``os.listdir``). The result is saved in DnD's format: a 1-D float32 tensor in ``criterion_weight.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..errors import AdapterError
from .adapters import list_adapters, load_adapter
from .layout import LoraLayout
from .tokens import lora_to_tokens

FILE_NAME = "criterion_weight.pt"


def criterion_weights(files: list[Path], layout: LoraLayout, progress: bool = True) -> torch.Tensor:
    """Per-token weights (N_tok,) float32 from the checkpoints ``files`` (PEFT dirs or DnD flat files)."""
    if not files:
        raise AdapterError("criterion weights need at least one checkpoint")
    shape = (layout.num_tokens, *layout.token_size)
    mean = torch.zeros(shape, dtype=torch.float64)
    m2 = torch.zeros(shape, dtype=torch.float64)
    for count, path in enumerate(tqdm(files, desc="criterion weights", unit="ckpt", disable=not progress), start=1):
        tokens = lora_to_tokens(load_adapter(path, layout).state_dict, layout).double()
        delta = tokens - mean
        mean += delta / count
        m2 += delta * (tokens - mean)
    std = (m2 / len(files)).sqrt()  # population std, as DnD's running mean of squares
    total = (~std.isnan()).sum()
    weights = torch.nanmean(std / std.abs().nansum(), dim=(-2, -1)) * total
    return weights.float()


def folder_criterion_weights(folder: str | os.PathLike, layout: LoraLayout, limit: int | None = None,
                             progress: bool = True) -> torch.Tensor:
    """Weights of one training folder (DnD flat ``<step>.safetensors`` files or PEFT dirs), first ``limit`` steps."""
    files = list_adapters(folder)
    return criterion_weights(files[:limit] if limit else files, layout, progress)


def save_criterion_weight(weights: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a weight vector as DnD does (``torch.save`` of a 1-D float32 tensor), atomically."""
    with atomic_path(path) as tmp:
        torch.save(weights.detach().float().cpu().contiguous(), tmp)
    return Path(path)


def load_criterion_weight(path: str | os.PathLike, layout: LoraLayout | None = None) -> torch.Tensor:
    """Read a ``criterion_weight.pt`` with ``torch.load(weights_only=True)`` and check its shape."""
    path = Path(path)
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such file") from None
    except Exception as e:  # unpickling refused or file damaged
        raise AdapterError(f"{path}: not a criterion weight tensor ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or not weights.is_floating_point():
        raise AdapterError(f"{path}: expected a 1-D float tensor")
    if layout is not None and weights.shape[0] != layout.num_tokens:
        raise AdapterError(f"{path}: {weights.shape[0]} weights, layout {layout.name!r} has {layout.num_tokens} tokens")
    if not bool(torch.isfinite(weights).all()):
        raise AdapterError(f"{path}: contains NaN or Inf")
    return weights.float()


def mean_criterion_weight(paths: list[str | os.PathLike], layout: LoraLayout | None = None) -> torch.Tensor:
    """Mean of several folders' weights (DnD's ``calculate_mean_criterion_weight``), shape (N_tok,)."""
    if not paths:
        raise AdapterError("mean criterion weight needs at least one file")
    return torch.stack([load_criterion_weight(p, layout) for p in paths]).mean(dim=0)
