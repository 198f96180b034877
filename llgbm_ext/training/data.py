"""Training batches: which teachers and which condition prompts each step sees.

The batch of step ``s`` is a function of ``(seed, s)`` alone (NumPy's PCG64 seeded with both), so a
resumed run re-creates exactly the batches it would have seen, DataLoader workers can prefetch
ahead, and process ``r`` of ``W`` takes its slice ``r`` of the same global batch (so W processes
see what one process would). As in DnD, a sample is one teacher adapter plus ``num_prompts``
prompts drawn from its task's condition prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.teacher_set import TeacherSet
from ..errors import LLGBMError
from ..lora.adapters import load_adapter
from ..lora.factors import LoraFactors
from ..lora.tokens import lora_to_tokens

TOKEN_MEMORY = 1 << 30  # bytes of teacher tokens kept in memory at most (else read from disk every step)


@dataclass
class TeacherBatch:
    """One process's share of a step's batch."""

    step: int
    indices: Tensor  # (B,) indices into TeacherSet.entries
    prompts: list[list[str]]  # B lists of N condition prompts
    tokens: Tensor | None = None  # (B, N_tok, H, W) teacher tokens, for the token loss
    factors: LoraFactors | None = None  # (B, L, ...) teacher factors, for the A/B and ΔW losses


def _identity(batch):
    return batch


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``s`` is this process's ``TeacherBatch`` of step ``s``."""

    def __init__(self, teachers: TeacherSet, batch_size: int, num_prompts: int, seed: int,
                 rank: int = 0, world_size: int = 1, need_tokens: bool = True, need_factors: bool = False):
        if batch_size % world_size:
            raise LLGBMError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
        empty = [t for t in teachers.task_names() if not teachers.prompts(t)]
        if empty:
            raise LLGBMError(f"{teachers.root / 'manifest.json'}: task {empty[0]!r} has no condition prompts")
        self.teachers = teachers
        self.batch_size, self.num_prompts, self.seed = batch_size, num_prompts, seed
        self.rank, self.world_size = rank, world_size
        self.need_tokens, self.need_factors = need_tokens, need_factors
        per_adapter = 4 * teachers.layout.num_tokens * teachers.layout.token_size[0] * teachers.layout.token_size[1]
        fits = per_adapter * len(teachers.entries) <= TOKEN_MEMORY
        self._tokens: dict[int, Tensor] | None = {} if need_tokens and fits else None
        for index, entry in enumerate(teachers.entries):  # a bad file fails now, not when a step first draws it
            adapter = load_adapter(entry.path, teachers.layout)
            if self._tokens is not None:  # read once: kept for the steps
                self._tokens[index] = lora_to_tokens(adapter.state_dict, teachers.layout)

    def tokens(self, index: int) -> Tensor:
        """Teacher ``index``'s DnD tokens (N_tok, H, W): from memory when they all fit, else read from disk."""
        if self._tokens is not None:
            return self._tokens[index]
        layout = self.teachers.layout
        return lora_to_tokens(load_adapter(self.teachers.entries[index].path, layout).state_dict, layout)

    def __len__(self) -> int:
        return 2**62  # indexed by step; the sampler decides which steps are drawn

    def global_picks(self, step: int) -> tuple[np.ndarray, list[list[str]]]:
        """Teacher indices (global batch) and their condition prompts for ``step``."""
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        n = len(self.teachers.entries)
        picks = rng.choice(n, size=self.batch_size, replace=self.batch_size > n)
        prompts = []
        for i in picks:
            pool = self.teachers.prompts(self.teachers.entries[i].task)
            chosen = rng.choice(len(pool), size=self.num_prompts, replace=self.num_prompts > len(pool))
            prompts.append([pool[j] for j in chosen])
        return picks, prompts

    def __getitem__(self, step: int) -> TeacherBatch:
        picks, prompts = self.global_picks(step)
        share = self.batch_size // self.world_size
        mine = slice(self.rank * share, (self.rank + 1) * share)
        picks, prompts = picks[mine], prompts[mine]
        batch = TeacherBatch(step=step, indices=torch.as_tensor(picks, dtype=torch.long), prompts=prompts)
        if self.need_tokens:
            batch.tokens = torch.stack([self.tokens(int(i)) for i in picks])  # (B, N_tok, H, W)
        if self.need_factors:
            from ..delta.deltas import load_teacher_factors

            batch.factors = load_teacher_factors([self.teachers.entries[i].path for i in picks], self.teachers.layout,
                                                 torch.float32, "cpu")
        return batch


def batch_loader(dataset: StepBatches, start: int, stop: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches of steps ``start .. stop-1`` in order, prefetched by ``num_workers`` processes."""
    # its own generator: creating an iterator must not draw from the global RNG (exact resume)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
        collate_fn=_identity, generator=torch.Generator().manual_seed(dataset.seed),
    )
