"""Teacher deltas of DnD's training checkpoints: read from the DeltaCache, computed once where missing.

Every training file ``data/<family>/<Dataset>/<step>.safetensors`` is a teacher adapter. Its delta
Δ = v(base + adapter) − v(base) is keyed in the ``DeltaCache`` by the adapter's content
(``adapter_id``: tensors and LoRA scaling, not the path) and by the context (base-model fingerprint,
probe hash, delta settings), so a renamed or copied file hits and a changed base or probe set misses.

In a multi-process run, rank 0 computes what the cache lacks (``DeltaComputer.teacher_deltas``, the
code path of the student deltas, so probes, template, truncation and dtype are identical), then all
ranks meet at a barrier and read every delta, and v(base), from the cache: every rank trains
against the same bytes. Other ranks only hash their files while waiting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..delta.cache import DeltaCache, DeltaContext, adapter_id, model_fingerprint
from ..delta.deltas import DeltaComputer, adapter_scaling
from ..errors import LLGBMError
from ..lora.adapters import load_adapter
from ..lora.layout import LoraLayout


class TeacherError(LLGBMError):
    """Teacher deltas are missing or ambiguous for a batch row."""


def rank() -> int:
    """This process's rank in torch.distributed (0 when not distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every process of torch.distributed (no-op when not distributed)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def delta_context(computer: DeltaComputer, base_model_dir: str | os.PathLike) -> DeltaContext:
    """The cache context of the deltas ``computer`` computes on the base model stored in ``base_model_dir``."""
    settings = {k: v for k, v in computer.settings.to_dict().items() if k != "probe_set"}  # a name, not content
    return DeltaContext(
        base_model=str(base_model_dir),
        fingerprint=model_fingerprint(base_model_dir),
        probe_hash=computer.probes.hash,
        settings=settings,
    )


def teacher_ids(paths: Sequence[str], layout: LoraLayout) -> list[str]:
    """``adapter_id`` of each teacher file (its tensors and the scaling its delta is computed with)."""
    ids = []
    for path in paths:
        adapter = load_adapter(path, layout)
        ids.append(adapter_id(adapter.state_dict, adapter_scaling(adapter, layout)))
    return ids


@dataclass
class TeacherDeltas:
    """Teacher deltas on one device: ``deltas`` (U, H) for the distinct ids, and path -> id."""

    id_of: dict[str, str]
    row_of: dict[str, int]  # adapter id -> row of ``deltas``
    deltas: Tensor

    def for_rows(self, candidates: Sequence[Sequence[str]]) -> Tensor:
        """(B, H): the teacher delta of each batch row, given the checkpoint path(s) that row matched."""
        rows = []
        for i, paths in enumerate(candidates):
            ids = {self.id_of.get(p) for p in paths}
            if None in ids:
                raise TeacherError(f"batch row {i}: no teacher delta for {sorted(p for p in paths if p not in self.id_of)[0]}")
            if len(ids) > 1:
                raise TeacherError(f"batch row {i}: its tokens match different checkpoints {sorted(paths)}")
            rows.append(self.row_of[ids.pop()])
        return self.deltas[torch.tensor(rows, device=self.deltas.device)]


def base_activation_from_cache(cache: DeltaCache, ctx: DeltaContext, computer: DeltaComputer) -> Tensor:
    """v(base) of the context: cached by rank 0 on first use, then read from the cache by every rank."""
    if rank() == 0 and cache.get_base_activation(ctx) is None:
        cache.put_base_activation(ctx, computer.base_activation.cpu())
    barrier()
    cached = cache.get_base_activation(ctx)
    if cached is None:
        raise TeacherError(f"{cache.root}: the base activation written by rank 0 is not readable here")
    return torch.from_numpy(cached)


def load_teacher_deltas(
    paths: Sequence[str],
    computer: DeltaComputer,
    cache: DeltaCache,
    ctx: DeltaContext,
    batch_size: int = 8,
    progress: bool = True,
) -> TeacherDeltas:
    """Teacher deltas of ``paths`` on the computer's device: rank 0 fills the cache, then every rank reads it."""
    paths = [str(p) for p in paths]
    if not paths:
        raise TeacherError("no training checkpoints were registered; the delta term has no teachers")
    ids = teacher_ids(paths, computer.layout)
    id_of = dict(zip(paths, ids))
    unique = list(dict.fromkeys(ids))
    if rank() == 0:
        pending, todo = set(cache.missing(unique, ctx)), []
        for path in paths:  # one file per missing id
            if id_of[path] in pending:
                pending.discard(id_of[path])
                todo.append(path)
        if todo:
            deltas = computer.teacher_deltas(todo, batch_size=batch_size, progress=progress)
            tasks = [Path(p).parent.name for p in todo]
            cache.put_many([id_of[p] for p in todo], ctx, deltas.cpu(), paths=todo, tasks=tasks)
    barrier()
    found = cache.get_many(unique, ctx)
    absent = [i for i in unique if i not in found]
    if absent:
        path = next(p for p in paths if id_of[p] == absent[0])
        raise TeacherError(f"{path}: its teacher delta is not in {cache.root} after rank 0 computed the missing ones")
    deltas = torch.stack([torch.from_numpy(found[i]) for i in unique]).to(computer.device)  # (U, H) fp32
    return TeacherDeltas(id_of=id_of, row_of={i: k for k, i in enumerate(unique)}, deltas=deltas)
