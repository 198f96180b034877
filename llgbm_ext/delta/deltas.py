"""Deltas Δ(M) = v(base + LoRA) − v(base), for teacher adapter files and generated factors alike.

``DeltaComputer`` holds one base model, one encoded probe batch and one set of settings, and has a
single code path, ``deltas(factors)``, for K adapters at a time:
  * student deltas: ``deltas(generated_factors)``, differentiable in the factors;
  * teacher deltas: ``teacher_deltas(paths)`` loads adapter files in batches of K and calls the
    same ``deltas`` under ``no_grad``.
So teacher and student see the same probes, template, truncation, padding, layer and dtype
(the original LLGBM did not: contract §6.18). Adapters are applied through ``FunctionalLoRA``
hooks and never injected into the model, so the base activation comes from a pristine model
(unlike LLGBM, whose PEFT injections piled up in its shared base model: contract §6.17). The base
activation is computed once per (model, probe batch, settings) and reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import AdapterError
from ..lora.adapters import Adapter, load_adapter
from ..lora.factors import LoraFactors, factors_from_state_dict
from ..lora.layout import LoraLayout
from .activations import base_activation, check_layer, mean_activations
from .functional import FunctionalLoRA
from .probes import ProbeBatch, ProbeSet, encode_probes

# model -> {(settings key, probe batch digest): base activation (H,)}
_BASE_ACTIVATIONS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], Tensor]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class DeltaSettings:
    """Everything besides the base model and the adapter that changes a delta; caches key on ``key``."""

    probe_set: str  # name of the probe set, for people; not part of ``key``
    probe_hash: str  # ProbeSet.hash: texts, chat template switch, max length, truncation side
    layer: int  # index into hidden_states; -1 = final norm output
    dtype: str  # base model dtype, e.g. "float32", "bfloat16"
    chat_template: bool
    max_length: int
    truncation_side: str
    padding_side: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        """16 hex digits of SHA-256 over all fields except the probe set's name."""
        fields = {k: v for k, v in self.to_dict().items() if k != "probe_set"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def delta_settings(model: nn.Module, probes: ProbeSet, layer: int = -1, padding_side: str = "right") -> DeltaSettings:
    """The settings of deltas computed on ``model`` with ``probes``."""
    return DeltaSettings(
        probe_set=probes.name,
        probe_hash=probes.hash,
        layer=layer,
        dtype=str(model_dtype(model)).removeprefix("torch."),
        chat_template=probes.chat_template,
        max_length=probes.max_length,
        truncation_side=probes.truncation_side,
        padding_side=padding_side,
    )


def adapter_scaling(adapter: Adapter, layout: LoraLayout) -> float:
    """The LoRA scaling an adapter was trained with (its adapter_config.json; else the layout's)."""
    config = adapter.config or {}
    where = adapter.path / "adapter_config.json"
    if config.get("use_dora"):
        raise AdapterError(f"{where}: DoRA adapters are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterError(f"{where}: per-module {key} is not supported")
    rank, alpha = float(config.get("r", layout.rank)), float(config.get("lora_alpha", layout.alpha))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def load_teacher_factors(
    paths: Sequence[str | os.PathLike], layout: LoraLayout, dtype: torch.dtype, device: str | torch.device
) -> LoraFactors:
    """Stack adapter files into factors with leading dim K = len(paths); B is rescaled so that the
    layout's scaling applies each adapter exactly as PEFT would with its own alpha."""
    per_adapter = []
    for path in paths:
        adapter = load_adapter(path, layout, dtype=dtype)
        ratio = adapter_scaling(adapter, layout) / layout.scaling
        factors = factors_from_state_dict(adapter.state_dict, layout)  # proj -> (L, r, in), (L, out, r)
        per_adapter.append({proj: (a, b * ratio if ratio != 1 else b) for proj, (a, b) in factors.items()})
    return {
        proj: tuple(torch.stack([f[proj][j] for f in per_adapter]).to(device) for j in (0, 1))  # (K, L, r, in), (K, L, out, r)
        for proj in layout.targets
    }


class DeltaComputer:
    """Δ = v(base + LoRA) − v(base) for batches of adapters on one frozen base model.

    Args:
        model: the base causal LM (frozen); adapters are applied through hooks, never injected.
        tokenizer: its tokenizer; probes are encoded once with ``encode_probes``.
        layout: LoRA geometry of the adapters.
        probes: the probe set.
        layer: hidden-state index (see ``activations``); -1 = final norm output.
        padding_side: how the probe batch is padded; results do not depend on it beyond float noise.
        base_activation: a known v(base) (H,), e.g. from a cache with the same ``settings.key``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        layout: LoraLayout,
        probes: ProbeSet,
        *,
        layer: int = -1,
        padding_side: str = "right",
        base_activation: Tensor | None = None,
    ):
        self.model = model
        self.layout = layout
        self.probes = probes
        self.layer = layer
        self.lora = FunctionalLoRA(model, layout)
        check_layer(self.lora.backbone, layer)
        self.device = next(model.parameters()).device
        self.batch: ProbeBatch = encode_probes(probes, tokenizer, padding_side).to(self.device)
        self.settings = delta_settings(model, probes, layer, padding_side)
        digest = hashlib.sha256()  # the encoded batch, which also depends on the tokenizer
        for t in (self.batch.input_ids, self.batch.attention_mask):
            digest.update(t.cpu().numpy().tobytes())
        self._base_key = (self.settings.key, digest.hexdigest())
        if base_activation is not None:
            hidden = self.lora.backbone.config.hidden_size
            if tuple(base_activation.shape) != (hidden,):
                raise ValueError(f"base_activation has shape {tuple(base_activation.shape)}, expected ({hidden},)")
            _BASE_ACTIVATIONS.setdefault(model, {})[self._base_key] = base_activation.detach().float().to(self.device)

    @property
    def base_activation(self) -> Tensor:
        """v(base), (H,) fp32, computed once per (model, probe batch, settings) and then reused."""
        memo = _BASE_ACTIVATIONS.setdefault(self.model, {})
        if self._base_key not in memo:
            memo[self._base_key] = base_activation(self.model, self.batch, self.layer)
        return memo[self._base_key]

    def deltas(self, factors: LoraFactors) -> Tensor:
        """Δ for the K adapters of ``factors`` (leading dim K, or one adapter): (K, H) fp32,
        differentiable in the factors unless called under ``no_grad``."""
        return mean_activations(self.lora, self.batch, factors, self.layer) - self.base_activation  # (K, H)

    def teacher_deltas(
        self, paths: Sequence[str | os.PathLike], batch_size: int = 8, progress: bool = True
    ) -> Tensor:
        """Δ of adapter files (PEFT directories or DnD ``.safetensors``), K = ``batch_size`` per
        forward, without gradients: (N, H) fp32 in the order of ``paths``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        paths = [Path(p) for p in paths]
        dtype = model_dtype(self.model)
        out = [self.base_activation.new_zeros((0, self.base_activation.shape[0]))]
        with torch.no_grad(), tqdm(total=len(paths), desc="teacher deltas", unit="adapter", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start : start + batch_size]
                out.append(self.deltas(load_teacher_factors(chunk, self.layout, dtype, self.device)))  # (K, H)
                bar.update(len(chunk))
        return torch.cat(out)  # (N, H)
