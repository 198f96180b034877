"""Teacher deltas through the DeltaCache: compute only what the cache lacks, in batches.

``cached_teacher_deltas`` is what ``llgbm deltas``, ``llgbm teachers`` and evaluation call for one
probe set: it hashes each adapter's tensors (``adapter_ids``), looks them up in the cache under the
context (base-model fingerprint, probe hash, delta settings) of a ``DeltaComputer``, computes the
misses per probe and stores them with their path and task. It is the ``delta`` behaviour signal's
``prepare`` (``llgbm_ext.signals``) for a computer built by hand, so training and these tools share
the cache entries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..lora.adapters import load_adapter
from ..lora.layout import LoraLayout
from .cache import DeltaCache, DeltaContext, adapter_id, model_fingerprint
from .deltas import DeltaComputer, adapter_scaling


def delta_context(computer: DeltaComputer, base_model: str | os.PathLike, model_dir: str | os.PathLike,
                  probe_set: int = 0, fingerprint: str | None = None) -> DeltaContext:
    """The cache context of ``computer``'s deltas on one of its probe sets; ``model_dir`` is fingerprinted
    (every byte, once per process) unless ``fingerprint`` is given."""
    settings = {k: v for k, v in computer.all_settings[probe_set].to_dict().items() if k != "probe_set"}
    return DeltaContext(
        base_model=str(base_model), fingerprint=fingerprint or model_fingerprint(Path(model_dir)),
        probe_hash=computer.all_settings[probe_set].probe_hash, settings=settings,
    )


def adapter_ids(paths: Sequence[str | os.PathLike], layout: LoraLayout) -> list[str]:
    """Content ids of adapter files (tensors and the LoRA scaling their deltas are computed with)."""
    ids = []
    for path in paths:
        adapter = load_adapter(path, layout)
        ids.append(adapter_id(adapter.state_dict, scaling=adapter_scaling(adapter, layout)))
    return ids


def cached_teacher_deltas(
    computer: DeltaComputer,
    cache: DeltaCache,
    context: DeltaContext,
    paths: Sequence[str | os.PathLike],
    tasks: Sequence[str | None] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    per_probe: bool = False,
) -> torch.Tensor:
    """Δ of every adapter in ``paths`` on the computer's first probe set, from the cache where present,
    computed otherwise: (N, H) float32, or (N, P, H) with ``per_probe``. The per-probe base activation is
    stored in the cache too."""
    from ..signals.delta import DeltaSignal

    signal = DeltaSignal(computer, base_model=context.base_model, model_dir="", context=context)
    tasks = [t or "" for t in tasks] if tasks is not None else [""] * len(paths)
    deltas = signal.prepare(paths, tasks, cache, batch_size, progress).cpu()  # (N, P, H)
    return deltas if per_probe else deltas.mean(1)
