"""Teacher deltas through the DeltaCache: compute only what the cache lacks, in batches, on one rank.

``cached_teacher_deltas`` is what ``llgbm deltas``, ``llgbm teachers``, the trainer and the DnD hooks
call: it hashes each adapter's tensors (``adapter_id``), looks them up in the cache under the
context (base-model fingerprint, probe hash, delta settings) of a ``DeltaComputer``, computes the
misses with ``DeltaComputer.teacher_deltas`` and stores them with their path and task.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..lora.adapters import load_adapter
from .cache import DeltaCache, DeltaContext, adapter_id, model_fingerprint
from .deltas import DeltaComputer, adapter_scaling


def delta_context(computer: DeltaComputer, base_model: str | os.PathLike, model_dir: str | os.PathLike) -> DeltaContext:
    """The cache context of ``computer``'s deltas; ``model_dir`` is fingerprinted (cheap, sampled)."""
    settings = {k: v for k, v in computer.settings.to_dict().items() if k != "probe_set"}
    return DeltaContext(
        base_model=str(base_model), fingerprint=model_fingerprint(Path(model_dir)),
        probe_hash=computer.settings.probe_hash, settings=settings,
    )


def adapter_ids(paths: Sequence[str | os.PathLike], computer: DeltaComputer) -> list[str]:
    """Content ids of adapter files (tensors and LoRA scaling)."""
    ids = []
    for path in paths:
        adapter = load_adapter(path, computer.layout)
        ids.append(adapter_id(adapter.state_dict, scaling=adapter_scaling(adapter, computer.layout)))
    return ids


def cached_teacher_deltas(
    computer: DeltaComputer,
    cache: DeltaCache,
    context: DeltaContext,
    paths: Sequence[str | os.PathLike],
    tasks: Sequence[str | None] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """Δ of every adapter in ``paths`` (N, H) float32, from the cache where present, computed otherwise.

    The base activation is stored in the cache too and, when already cached, reused.
    """
    paths = [Path(p) for p in paths]
    tasks = list(tasks) if tasks is not None else [None] * len(paths)
    cached_base = cache.get_base_activation(context)
    if cached_base is None:
        cache.put_base_activation(context, computer.base_activation.cpu().numpy())
    ids = adapter_ids(paths, computer)
    missing = set(cache.missing(ids, context))
    todo = [i for i, a in enumerate(ids) if a in missing]
    if todo:
        deltas = computer.teacher_deltas([paths[i] for i in todo], batch_size=batch_size, progress=progress)
        cache.put_many([ids[i] for i in todo], context, deltas.cpu().numpy(),
                       paths=[str(paths[i]) for i in todo], tasks=[tasks[i] for i in todo])
    found = cache.get_many(ids, context)
    lost = [str(paths[i]) for i, a in enumerate(ids) if a not in found]
    if lost:  # an entry vanished between write and read (another process repaired it): compute directly
        fresh = computer.teacher_deltas(lost, batch_size=batch_size, progress=False).cpu().numpy()
        found.update({ids[paths.index(Path(p))]: d for p, d in zip(lost, fresh)})
    return torch.from_numpy(np.stack([found[a] for a in ids]))
