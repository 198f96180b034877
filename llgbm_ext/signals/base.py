"""The behaviour-signal interface, and the teacher targets every signal compares against.

A behaviour signal measures how far a generated adapter behaves from its teacher. The trainer and the
DnD loss hook use every signal the same way, so a new signal needs no branch in either:

    signal.prepare(paths, tasks, cache)      teacher targets of the training adapters (cached)
    result = signal(factors, index, step)    loss of K generated adapters against teachers ``index``

``factors`` are the generated LoRAs (leading dim K, differentiable), ``index`` (K,) the teachers they
should behave like (positions in ``paths``), ``step`` the training step (signals that sample inputs
draw them as a function of it, so a resumed run computes what the uninterrupted one would).

Teacher targets are float32 arrays of one shape per adapter (per-probe deltas (P, H), top-k
log-probabilities (E·A, 2k + 1), ...), stored in the ``DeltaCache`` under a context per input set
(the base-model fingerprint, a hash of the inputs and the signal's settings), keyed by the adapter's
content. ``prepare_targets`` computes only the misses; in a multi-process run they are split over
the ranks, gathered, written by rank 0, and every rank then reads the same bytes.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..delta.cache import DeltaCache, DeltaContext, model_fingerprint
from ..delta.teacher import adapter_ids
from ..errors import LLGBMError
from ..lora.factors import LoraFactors
from ..lora.layout import LoraLayout
from ..losses.weight import LossResult


class SignalError(LLGBMError):
    """A behaviour signal cannot be built or used (no inputs for a task, targets missing, bad settings)."""


@dataclass
class SignalResult:
    """A signal's loss entries (``"loss"`` differentiable, the rest detached for logging) and, for signals
    that have one, the (student, teacher) (K, H) summary a delta head is trained to predict."""

    loss: LossResult
    summary: tuple[Tensor, Tensor] | None = None


class BehaviourSignal(ABC):
    """One behaviour signal on one frozen base model; see the module docstring.

    Subclasses set ``name``, ``set_of_task`` (task -> index of the input set its adapters are compared
    on; None when one set serves every task) and implement ``context``, ``compute_targets`` and ``loss``.
    """

    name: str = ""

    def __init__(self, model: nn.Module, layout: LoraLayout, base_model: str, model_dir: str | os.PathLike):
        self.model = model
        self.layout = layout
        self.base_model = base_model
        self.model_dir = Path(model_dir)
        self.device = next(model.parameters()).device
        self.set_of_task: dict[str, int] | None = None  # None: one input set for every task
        self.targets: Tensor | None = None  # (N, *shape) after prepare
        self.target_sets: Tensor | None = None  # (N,) input set of each prepared adapter
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """The base model directory's ``model_fingerprint`` (every byte of its weights and configs), computed once."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model_dir)
        return self._fingerprint

    def sets_of(self, tasks: Sequence[str]) -> list[int]:
        """The input set of each task's adapters; a task the signal has no inputs for is an error."""
        if self.set_of_task is None:
            return [0] * len(tasks)
        missing = next((t for t in tasks if t not in self.set_of_task), None)
        if missing is not None:
            raise SignalError(f"signal {self.name!r}: no inputs for task {missing!r} "
                              f"(it covers {', '.join(self.set_of_task)})")
        return [self.set_of_task[t] for t in tasks]

    @abstractmethod
    def context(self, input_set: int) -> DeltaContext:
        """The cache context of teacher targets computed on ``input_set``."""

    @abstractmethod
    def compute_targets(self, paths: Sequence[Path], sets: Sequence[int], progress: bool = False) -> Tensor:
        """Teacher targets (N, *shape) float32 of adapter files, adapter i on input set ``sets[i]``; no grad."""

    @abstractmethod
    def loss(self, factors: LoraFactors, targets: Tensor, sets: Tensor, step: int) -> SignalResult:
        """The loss of K generated adapters against their teachers' ``targets`` (K, *shape)."""

    def prepare(self, paths: Sequence[str | os.PathLike], tasks: Sequence[str], cache: DeltaCache,
                batch_size: int = 8, progress: bool = True) -> Tensor:
        """Teacher targets of every adapter in ``paths`` (of ``tasks``), from the cache or computed, kept
        on the signal's device for ``__call__``; returns them."""
        sets = self.sets_of(tasks)
        self.targets = prepare_targets(self, cache, [Path(p) for p in paths], sets, list(tasks), batch_size,
                                       progress).to(self.device)
        self.target_sets = torch.tensor(sets, device=self.device)
        return self.targets

    def __call__(self, factors: LoraFactors, index: Tensor, step: int = 0) -> SignalResult:
        if self.targets is None:
            raise SignalError(f"signal {self.name!r}: no teacher targets; call prepare() first")
        index = torch.as_tensor(index, device=self.device)
        return self.loss(factors, self.targets[index], self.target_sets[index], step)


def _dist():
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def rank() -> int:
    """This process's rank in torch.distributed (0 when not distributed)."""
    dist = _dist()
    return dist.get_rank() if dist else 0


def rank_and_world() -> tuple[int, int]:
    """(rank, number of processes) in torch.distributed; (0, 1) when not distributed."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


class RankError(LLGBMError):
    """A step failed on one process of a torch.distributed run; every process raises it, with that message."""


def settle(error: BaseException) -> None:
    """Once a ``RankError`` has been reported (printed), wait until every rank has reported it: torchrun
    stops the other processes as soon as one exits, which could be before they print theirs."""
    dist = _dist()
    if dist and isinstance(error, RankError):
        dist.barrier()


def collective_device() -> torch.device:
    """Where this process's collective tensors live: its CUDA device under NCCL, else the CPU."""
    dist = _dist()
    if dist and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(error, LLGBMError) and message else f"{type(error).__name__}: {message or 'no message'}"


def agree(error: BaseException | None) -> None:
    """Collective: each rank says whether it failed. If any did, every rank raises the same one-line
    ``RankError`` (the lowest failing rank's message), so none is left waiting at a later collective
    until its timeout. Outside torch.distributed the error itself is raised."""
    dist = _dist()
    if not dist:
        if error is not None:
            raise error
        return
    device = collective_device()
    message = b"" if error is None else _one_line(error).encode()
    size = torch.tensor([len(message)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    failed = [r for r, n in enumerate(sizes) if int(n)]
    if not failed:
        return
    first = failed[0]
    text = torch.zeros(int(sizes[first]), dtype=torch.uint8, device=device)
    if dist.get_rank() == first:
        text.copy_(torch.frombuffer(bytearray(message), dtype=torch.uint8))
    dist.broadcast(text, src=first)
    message = bytes(text.cpu().tolist()).decode(errors="replace")
    raise RankError(f"{message} (rank {first} of {dist.get_world_size()})") from error


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Run a block on every rank, then ``agree``: an exception in it on any rank ends the block with the
    same one-line error on every rank. Every rank must enter the block."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001  (any failure must reach the other ranks)
        error = e
    agree(error)


def _check_finite(signal: BehaviourSignal, rows: Tensor, paths: Sequence[Path]) -> None:
    bad = (~torch.isfinite(rows.reshape(len(rows), -1)).all(1)).nonzero().flatten().tolist()
    if bad:
        raise SignalError(f"{paths[bad[0]]}: its {signal.name} teacher targets are not finite (NaN or Inf); "
                          "a diverged or damaged adapter")


def prepare_targets(signal: BehaviourSignal, cache: DeltaCache, paths: list[Path], sets: list[int], tasks: list[str],
                    batch_size: int = 8, progress: bool = True) -> Tensor:
    """Teacher targets (N, *shape) of ``paths`` on CPU: cache hits read, misses computed (split over the
    processes of a torch.distributed run and written by rank 0), then every rank reads the cache.

    Each step that one rank can fail alone (reading or writing the cache, computing its share, a
    teacher whose targets are not finite) ends with ``together``: a failure stops every rank at once
    with the same one-line error, never leaving the others at a collective."""
    dist = _dist()
    rank, world = rank_and_world()

    def cached() -> dict[int, np.ndarray]:
        found = {}
        for s, ctx in contexts.items():
            members = [i for i in range(len(paths)) if sets[i] == s]
            hits = cache.get_many([ids[i] for i in members], ctx)
            found.update({i: hits[ids[i]] for i in members if ids[i] in hits})
        return found

    missing = torch.zeros(len(paths), dtype=torch.int64, device=collective_device())
    with together():
        ids = adapter_ids(paths, signal.layout)
        contexts = {s: signal.context(s) for s in sorted(set(sets))}
        if rank == 0:  # one reader decides, so every rank splits the same list
            have = cached()
            missing[:] = torch.tensor([i not in have for i in range(len(paths))], dtype=torch.int64)
    if dist:
        dist.broadcast(missing, src=0)
    todo = missing.nonzero().flatten().tolist()
    if todo:
        mine = todo[rank::world]
        with together():
            rows = signal.compute_targets([paths[i] for i in mine], [sets[i] for i in mine],
                                          progress=progress and rank == 0)
            _check_finite(signal, rows, [paths[i] for i in mine])
        if dist:  # gather every rank's rows, in todo's order, on every rank
            share = -(-len(todo) // world)
            padded = rows.new_zeros((share, *rows.shape[1:]))
            padded[: len(mine)] = rows
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
            rows = torch.stack([parts[k % world][k // world] for k in range(len(todo))])
        with together():  # also the barrier: no rank reads before rank 0 has written
            if rank == 0:
                rows = rows.float().cpu().numpy()
                for s, ctx in contexts.items():
                    picked = [j for j, i in enumerate(todo) if sets[i] == s]
                    if picked:
                        cache.put_many([ids[todo[j]] for j in picked], ctx, rows[picked],
                                       paths=[str(paths[todo[j]]) for j in picked],
                                       tasks=[tasks[todo[j]] for j in picked])
    with together():
        found = cached()
        lost = [i for i in range(len(paths)) if i not in found]
        if lost:  # unreadable after rank 0 wrote it (e.g. another process repaired the cache): compute here
            fresh = signal.compute_targets([paths[i] for i in lost], [sets[i] for i in lost]).float().cpu().numpy()
            found.update(dict(zip(lost, fresh)))
    return torch.from_numpy(np.stack([found[i] for i in range(len(paths))]))
