"""Dataset hook ``row_ids``: which training checkpoint each batch row is.

DnD's ``Text2Qwen25LoRA_FullCondDataset.__getitem__`` returns ``(tokens, condition, path)``, but its
``collate_fn_train`` returns only ``(tokens, input_ids, attention_mask)``, and the training loop
unpacks exactly those three. The path cannot travel in the batch: accelerate's data loader rebuilds
containers when it moves a batch to the device, prefetches one batch ahead, and DataLoader workers
deliver batches out of order. So each row is identified by its content instead:

* the hook replaces ``collate_fn_train`` (at run time, on the class) by a descriptor that hands the
  DataLoader a ``RowIdCollate``: DnD's own collate (same output), plus, for every row, a BLAKE2b
  fingerprint of the row's shape and of ``SAMPLE`` of its values at fixed positions, written to a
  shared-memory table at the row of its checkpoint (row i = ``dataset.checkpoints[i]``);
* the loss hook fingerprints the target tokens it receives and looks them up in the table.

Hashing every byte cost about 1 s per step for 4 rows of the 1.5B layout, some 18% of a DnD 1.5B step
(``benchmarks/row_hash.py``); the sample costs well under a millisecond. When the behaviour term is on,
the table is filled at the start, when DnD builds its training DataLoader: every checkpoint is
tokenized as DnD's ``__getitem__`` does (split over the ranks), and two checkpoints with different
weights but one fingerprint are an error naming both, instead of a row that matches two teachers
mid-run. Checkpoints whose weights are equal (copies) may share a fingerprint: they share a teacher.

``RowIdCollate`` is a module-level class holding the dataset, DnD's collate function and the table:
it pickles whenever the dataset does (spawn-started workers), and the table, a shared-memory tensor,
stays shared with the workers under fork and spawn alike. (DnD's tokenizers are closures that do not
pickle, contract §6.14, so DnD itself needs fork-started workers; this hook adds nothing that would
not pickle.) Only ``collate_fn_train`` is replaced; the eval/test loaders' ``collate_fn_test`` and
everything else of the dataset are untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from ..errors import LLGBMError
from ..signals.base import collective_device, rank_and_world, together
from .hooks import register_hook

if TYPE_CHECKING:
    from .hooks import PluginSession

_UNSET = -1


class RowError(LLGBMError):
    """A batch row cannot be traced to a training checkpoint."""


BLOCKS, BLOCK = 256, 64  # a row's fingerprint reads 256 evenly spaced runs of 64 consecutive values
SAMPLE = BLOCKS * BLOCK


def sampled_values(tokens: Tensor) -> Tensor:
    """(B, ...) -> (B, n): each row's values in ``BLOCKS`` runs of ``BLOCK`` consecutive ones, evenly
    spaced over the row from its first value (all values of a row of at most ``SAMPLE``). A strided
    view copied once: no index tensor, a few cache lines per run, the same positions in every process."""
    flat = tokens.detach().reshape(len(tokens), -1)
    size = flat.shape[1]
    if size <= SAMPLE:
        return flat
    flat = flat.contiguous()
    step = (size - BLOCK) // (BLOCKS - 1)
    return flat.as_strided((len(flat), BLOCKS, BLOCK), (flat.stride(0), step, 1)).reshape(len(flat), SAMPLE)


def token_fingerprint(tokens: Tensor) -> Tensor:
    """(B, ...) tokens -> (B, 2) int64: BLAKE2b-128 of each row's shape and ``sampled_values``, as two
    int64 words.

    NaN is read as 0, as DnD's loop passes the tokens to the model. The bytes are those of the
    tokens' own dtype, so a row fingerprinted in a DataLoader worker and the same row on the training
    GPU give the same value. The sample is taken on the tokens' device; only it is copied to the CPU.
    """
    data = torch.nan_to_num(sampled_values(tokens), nan=0.0).cpu().contiguous().view(torch.uint8).numpy()
    shape = np.asarray(tokens.shape[1:], dtype=np.int64).tobytes()  # numpy has no bf16; bytes it has
    digests = b"".join(hashlib.blake2b(shape + row.tobytes(), digest_size=16).digest() for row in data)
    return torch.from_numpy(np.frombuffer(digests, dtype=np.int64).copy()).view(-1, 2)


def dataset_tokens(dataset, path: str) -> Tensor:
    """The tokens of one checkpoint exactly as DnD's ``FullCondDataset.__getitem__`` makes them."""
    try:
        return dataset.tokenizer.tokenize(dataset.load_checkpoint(path), **dataset.tokenizer_extra_config)[0]
    except AttributeError as e:
        raise RowError(f"{type(dataset).__name__} cannot tokenize a checkpoint as DnD's FullCondDataset ({e})") from None


def same_weights(a: str, b: str) -> bool:
    """Whether two checkpoint files hold the same tensors (names, dtypes, values)."""
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def fill_table(dataset, table: Tensor) -> None:
    """Fingerprint every checkpoint of ``dataset`` into ``table`` (split over the ranks of a
    torch.distributed run, gathered on all) and refuse two different checkpoints with one fingerprint.
    A failure on any rank stops every rank with the same one-line error."""
    rank, world = rank_and_world()
    paths = list(dataset.checkpoints)
    share = -(-len(paths) // world)
    own = torch.zeros(share, 2, dtype=torch.int64)  # this rank's checkpoints: paths[rank::world]
    with together():
        for j, path in enumerate(paths[rank::world]):
            own[j] = token_fingerprint(dataset_tokens(dataset, path)[None])[0]
    fingerprints = own
    if world > 1:
        device = collective_device()
        parts = [torch.empty(share, 2, dtype=torch.int64, device=device) for _ in range(world)]
        torch.distributed.all_gather(parts, own.to(device))
        fingerprints = torch.stack([parts[k % world][k // world] for k in range(len(paths))]).cpu()
    table[:] = fingerprints[: len(paths)]
    with together():
        first: dict[tuple[int, int], str] = {}
        for path, fingerprint in zip(paths, map(tuple, table.tolist())):
            other = first.setdefault(fingerprint, path)
            if other != path and not same_weights(other, path):
                raise RowError(f"{other} and {path}: different checkpoints whose tokens have one fingerprint (their "
                               f"shape and {SAMPLE} sampled values agree); their batch rows would match both teachers, "
                               "remove one of them from the training folders")


class RowIdCollate:
    """Picklable stand-in for a DnD dataset's bound ``collate_fn_train``.

    Returns exactly what DnD's collate returns, and records each row's ``token_fingerprint`` in
    ``table`` (a shared-memory (C, 2) int64 tensor) at the index of its checkpoint in
    ``dataset.checkpoints``. Runs wherever the DataLoader collates: a worker or the main process.
    """

    def __init__(self, dataset, collate: Callable, table: Tensor):
        self.dataset = dataset
        self.collate = collate  # DnD's function, unbound: pickles by its qualified name
        self.table = table
        self._index: dict[str, int] | None = None

    def index(self, path: str) -> int:
        if self._index is None:
            self._index = {p: i for i, p in reversed(list(enumerate(self.dataset.checkpoints)))}
        if path not in self._index:
            raise RowError(f"{path}: returned by the dataset but not in its checkpoints list")
        return self._index[path]

    def __call__(self, batch: Sequence[tuple]):
        out = self.collate(self.dataset, batch)
        rows = torch.tensor([self.index(item[2]) for item in batch], dtype=torch.long)  # items: (tokens, cond, path)
        self.table[rows] = token_fingerprint(out[0])
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_index": None}


class _TaggingCollate:
    """Class attribute standing in for ``collate_fn_train``: instances get a ``RowIdCollate``."""

    def __init__(self, registry: RowRegistry, original: Callable):
        self.registry = registry
        self.original = original

    def __get__(self, dataset, owner=None):
        if dataset is None:
            return self.original  # class access (and pickle's lookup by qualified name) sees DnD's function
        return RowIdCollate(dataset, self.original, self.registry.table_for(dataset))


class RowRegistry:
    """The datasets whose ``collate_fn_train`` was handed out, with their fingerprint tables; with
    ``eager`` (the behaviour term is on) each table is filled and checked when it is made."""

    def __init__(self, eager: bool = False):
        self.eager = eager
        self.entries: list[tuple[object, Tensor]] = []  # (dataset, shared (C, 2) table)

    def table_for(self, dataset) -> Tensor:
        for known, table in self.entries:
            if known is dataset:
                return table
        table = torch.full((len(dataset.checkpoints), 2), _UNSET, dtype=torch.int64).share_memory_()
        if self.eager:
            fill_table(dataset, table)
        self.entries.append((dataset, table))
        return table

    def checkpoints(self) -> list[str]:
        """Every checkpoint path of the registered datasets, without repeats, in dataset order."""
        return list(dict.fromkeys(p for dataset, _ in self.entries for p in dataset.checkpoints))

    def lookup(self, fingerprints: Tensor) -> list[list[str]]:
        """The checkpoint path(s) whose tokens have each fingerprint (B, 2); several only for identical files."""
        fingerprints = fingerprints.cpu()
        found: list[list[str]] = [[] for _ in range(len(fingerprints))]
        for dataset, table in self.entries:
            hits = (fingerprints[:, None, :] == table[None, :, :]).all(dim=-1).nonzero().tolist()  # [(row, ckpt)]
            for row, index in hits:
                found[row].append(dataset.checkpoints[index])
        missing = [i for i, paths in enumerate(found) if not paths]
        if missing:
            raise RowError(
                f"batch row {missing[0]} does not match any checkpoint collated by a hooked dataset's "
                f"collate_fn_train ({len(self.entries)} dataset(s) registered); the training DataLoader must use "
                "DnD's dataset.collate_fn_train, created after the hooks were installed"
            )
        return found


@register_hook("row_ids", "dataset")
def install(session: PluginSession) -> Callable[[], None]:
    """Replace ``collate_fn_train`` of DnD's FullCond dataset class (and so of its subclasses)."""
    cls = session.resolve_targets().dataset
    original = cls.__dict__.get("collate_fn_train")
    if not callable(original):
        raise RowError(f"{cls.__qualname__} defines no collate_fn_train to hook")
    session.rows.eager = session.config.uses_delta
    cls.collate_fn_train = _TaggingCollate(session.rows, original)

    def undo() -> None:
        cls.collate_fn_train = original

    return undo
