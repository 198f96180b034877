"""Deltas Δ(M) = v(base + LoRA) − v(base), for teacher adapter files and generated factors alike.

``DeltaComputer`` holds one base model, one or several encoded probe sets (e.g. one per task) and
their settings, and has a single code path, ``probe_deltas(factors, sets)``, for K adapters at a time,
each on its own probe set, giving per-probe deltas (K, P, H) (``deltas`` is their mean, the paper's Δ):
  * student deltas: ``probe_deltas(generated_factors, sets)``, differentiable in the factors;
  * teacher deltas: ``teacher_probe_deltas(paths, sets)`` loads adapter files in batches of K and
    calls the same ``probe_deltas`` under ``no_grad``.
So teacher and student see the same probes, template, truncation, padding, layer and dtype
(the original LLGBM did not: contract §6.18). Adapters are applied through ``FunctionalLoRA``
hooks and never injected into the model, so the base activation comes from a pristine model
(unlike LLGBM, whose PEFT injections piled up in its shared base model: contract §6.17). The base
activation of each probe is computed once per (model, probe batch, settings) and reused.
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
from .activations import adapter_probe_states, base_probe_states, check_layer
from .functional import FunctionalLoRA, num_adapters
from .probes import ProbeBatch, ProbeSet, encode_probes

# model -> {(settings key, probe batch digest): per-probe base states (P, H)}
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


def _stack_batches(batches: list[ProbeBatch]) -> tuple[Tensor, Tensor]:
    """(S, P, T) ids and attention masks of S probe batches of P probes each, padded to one width T on
    each batch's own padding side (extra padding changes no activation: positions and the last real
    token come from the mask)."""
    width = max(b.input_ids.shape[1] for b in batches)
    ids, masks = [], []
    for b in batches:
        extra = width - b.input_ids.shape[1]
        pad = (0, extra) if b.padding_side == "right" else (extra, 0)
        ids.append(torch.nn.functional.pad(b.input_ids, pad, value=0))  # masked out: any id works
        masks.append(torch.nn.functional.pad(b.attention_mask, pad, value=0))
    return torch.stack(ids), torch.stack(masks)


class DeltaComputer:
    """Δ = v(base + LoRA) − v(base) for batches of adapters on one frozen base model, per probe.

    Holds one or several probe sets of the same size P (e.g. the generic set, or one set per task
    drawn from that task's training inputs). ``probe_deltas(factors, sets)`` gives each of K adapters
    its own set (``sets[k]``, default set 0) and returns the (K, P, H) per-probe deltas from ONE
    forward over K·P rows; ``deltas`` is their mean over the probes, the paper's Δ. Teacher files
    (``teacher_probe_deltas``) and generated factors take the same path.

    Args:
        model: the base causal LM (frozen); adapters are applied through hooks, never injected.
        tokenizer: its tokenizer; probes are encoded once with ``encode_probes``.
        layout: LoRA geometry of the adapters.
        probes: a probe set, or a sequence of probe sets with the same number of probes.
        layer: hidden-state index (see ``activations``); -1 = final norm output.
        padding_side: how the probe batch is padded; results do not depend on it beyond float noise.
        base_activation: known per-probe v(base) (P, H) of set 0, e.g. from a cache with the same
            ``settings.key``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        layout: LoraLayout,
        probes: ProbeSet | Sequence[ProbeSet],
        *,
        layer: int = -1,
        padding_side: str = "right",
        base_activation: Tensor | None = None,
    ):
        self.model = model
        self.layout = layout
        self.probe_sets: tuple[ProbeSet, ...] = (probes,) if isinstance(probes, ProbeSet) else tuple(probes)
        if not self.probe_sets:
            raise ValueError("DeltaComputer needs at least one probe set")
        sizes = {len(p) for p in self.probe_sets}
        if len(sizes) > 1:
            raise ValueError(f"the probe sets of one DeltaComputer must have the same number of probes, got {sorted(sizes)}")
        self.probes = self.probe_sets[0]
        self.layer = layer
        self.lora = FunctionalLoRA(model, layout)
        check_layer(self.lora.backbone, layer)
        self.device = next(model.parameters()).device
        batches = [encode_probes(p, tokenizer, padding_side) for p in self.probe_sets]
        self.batch: ProbeBatch = batches[0].to(self.device)
        self.input_ids, self.attention_mask = (t.to(self.device) for t in _stack_batches(batches))  # (S, P, T)
        self._batches = [b.to(self.device) for b in batches]
        self.all_settings = [delta_settings(model, p, layer, padding_side) for p in self.probe_sets]
        self.settings = self.all_settings[0]
        self._base_keys = []
        for batch, settings in zip(batches, self.all_settings):
            digest = hashlib.sha256()  # the encoded batch, which also depends on the tokenizer
            for t in (batch.input_ids, batch.attention_mask):
                digest.update(t.cpu().numpy().tobytes())
            self._base_keys.append((settings.key, digest.hexdigest()))
        if base_activation is not None:
            self.set_base_states(0, base_activation)

    def base_states(self, probe_set: int = 0) -> Tensor:
        """v_p(base) of one probe set, (P, H) fp32, computed once per (model, probe batch, settings)."""
        memo = _BASE_ACTIVATIONS.setdefault(self.model, {})
        key = self._base_keys[probe_set]
        if key not in memo:
            memo[key] = base_probe_states(self.model, self._batches[probe_set], self.layer)
        return memo[key]

    def set_base_states(self, probe_set: int, states: Tensor) -> None:
        """Use known per-probe base states (P, H) for one probe set (e.g. those a DeltaCache holds)."""
        expected = (len(self.probe_sets[probe_set]), self.lora.backbone.config.hidden_size)
        if tuple(states.shape) != expected:
            raise ValueError(f"base_activation has shape {tuple(states.shape)}, expected {expected} (P, H)")
        _BASE_ACTIVATIONS.setdefault(self.model, {})[self._base_keys[probe_set]] = states.detach().float().to(self.device)

    @property
    def base_activation(self) -> Tensor:
        """v(base) of probe set 0, (H,) fp32: the mean of its per-probe states."""
        return self.base_states(0).mean(0)

    def _all_base_states(self) -> Tensor:
        return torch.stack([self.base_states(i) for i in range(len(self.probe_sets))])  # (S, P, H)

    def probe_deltas(self, factors: LoraFactors, sets: Tensor | Sequence[int] | None = None) -> Tensor:
        """Per-probe Δ of the K adapters of ``factors`` (leading dim K, or one adapter), adapter k on probe
        set ``sets[k]`` (default: set 0 for all): (K, P, H) fp32, differentiable unless under ``no_grad``."""
        k = num_adapters(factors)
        sets = torch.zeros(k, dtype=torch.long) if sets is None else torch.as_tensor(sets, dtype=torch.long)
        if sets.shape != (k,):
            raise ValueError(f"sets must hold one probe-set index per adapter ({k}), got shape {tuple(sets.shape)}")
        sets = sets.to(self.device)
        ids = self.input_ids[sets].flatten(0, 1)  # (K*P, T): adapter k's rows are its own set's probes
        mask = self.attention_mask[sets].flatten(0, 1)
        states = adapter_probe_states(self.lora, ids, mask, factors, self.layer)  # (K, P, H)
        return states - self._all_base_states()[sets]

    def deltas(self, factors: LoraFactors, sets: Tensor | Sequence[int] | None = None) -> Tensor:
        """Δ of the K adapters, the mean of their per-probe deltas: (K, H) fp32."""
        return self.probe_deltas(factors, sets).mean(1)

    def teacher_probe_deltas(
        self, paths: Sequence[str | os.PathLike], sets: Sequence[int] | None = None, batch_size: int = 8,
        progress: bool = True,
    ) -> Tensor:
        """Per-probe Δ of adapter files (PEFT directories or DnD ``.safetensors``), adapter i on probe set
        ``sets[i]`` (default 0), K = ``batch_size`` per forward, without gradients: (N, P, H) fp32."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        paths = [Path(p) for p in paths]
        sets = [0] * len(paths) if sets is None else list(sets)
        dtype = model_dtype(self.model)
        base = self.base_states(0)
        out = [base.new_zeros((0, *base.shape))]
        with torch.no_grad(), tqdm(total=len(paths), desc="teacher deltas", unit="adapter", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start : start + batch_size]
                factors = load_teacher_factors(chunk, self.layout, dtype, self.device)
                out.append(self.probe_deltas(factors, sets[start : start + batch_size]))  # (K, P, H)
                bar.update(len(chunk))
        return torch.cat(out)  # (N, P, H)

    def teacher_deltas(
        self, paths: Sequence[str | os.PathLike], batch_size: int = 8, progress: bool = True
    ) -> Tensor:
        """Δ of adapter files on probe set 0 (the mean over its probes): (N, H) fp32 in the order of ``paths``."""
        return self.teacher_probe_deltas(paths, batch_size=batch_size, progress=progress).mean(1)
