"""Training sequences of a task and the batch of every step: context + target + end token, loss on the target.

A sequence is tokenized exactly as evaluation scores it (``eval.scoring``): the context and the
target are tokenized separately and their ids concatenated, so the trained answer tokens are the
scored candidate tokens. It ends with the end-of-turn token (``<|im_end|>``) under a chat template,
else with the end-of-sequence token. A sequence longer than ``max_length`` loses the beginning of its
context (as evaluation truncates contexts); a target longer than that loses its end.

The examples of step ``s`` are a function of ``(seed, task, s)``: the task's examples in a random
order drawn per epoch, so a resumed run sees the batches the interrupted one would have seen and a
task's batches do not depend on which tasks are trained with it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.formatting import FormatError, PromptFormat, context, target
from ..data.records import Task
from .config import TeacherError


@dataclass
class EncodedTask:
    """A task's training sequences, right-padded: ``ids (N, T)``, ``lengths (N,)``, ``num_target (N,)``."""

    name: str
    ids: Tensor
    lengths: Tensor
    num_target: Tensor
    pad_id: int
    skipped: int  # examples without a usable gold answer

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass
class Batch:
    """K·P sequences, task k in rows k·P … (k+1)·P − 1: ids, attention mask, and the positions whose
    next token is a target token (``predicts``), with those targets."""

    input_ids: Tensor  # (K*P, T)
    attention_mask: Tensor  # (K*P, T)
    predicts: Tensor  # (K*P, T) bool
    targets: Tensor  # (M,) the token each predicting position must produce, row-major


def end_token_id(tokenizer, fmt: PromptFormat) -> int:
    """The token that ends a trained answer: end of turn in a chat template (if the tokenizer has one), else EOS."""
    if fmt.chat_template:
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if end_of_turn is not None and end_of_turn != tokenizer.unk_token_id:
            return int(end_of_turn)
    if tokenizer.eos_token_id is None:
        raise TeacherError("the tokenizer has no end-of-sequence token")
    return int(tokenizer.eos_token_id)


def training_pairs(task: Task, fmt: PromptFormat, tokenizer) -> tuple[list[str], list[str], int]:
    """(contexts, targets, skipped) of a task's usable training examples, as teachers are trained on them."""
    contexts, targets, skipped = [], [], 0
    for example in task.train:
        try:
            answer = target(example, fmt)
        except FormatError:
            skipped += 1
            continue
        contexts.append(context(example, fmt, tokenizer))
        targets.append(answer)
    return contexts, targets, skipped


def encode_pairs(name: str, contexts: list[str], targets: list[str], tokenizer, fmt: PromptFormat, max_length: int,
                 pad_id: int, skipped: int = 0) -> EncodedTask:
    """Tokenize (context, target) pairs as training sequences (see the module docstring)."""
    if not contexts:
        raise TeacherError(f"task {name}: no training example has a usable answer ({skipped} skipped)")
    end = end_token_id(tokenizer, fmt)
    context_ids = tokenizer(contexts, add_special_tokens=not fmt.chat_template)["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    rows, num_target = [], []
    for ctx, tgt in zip(context_ids, target_ids):
        tgt = (tgt + [end])[: max_length - 1]
        ctx = ctx[-(max_length - len(tgt)):]
        rows.append(ctx + tgt)
        num_target.append(len(tgt))
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return EncodedTask(name, ids, lengths, torch.tensor(num_target), pad_id, skipped)


def encode_task(task: Task, tokenizer, fmt: PromptFormat, max_length: int, pad_id: int) -> EncodedTask:
    """Tokenize every usable training example of ``task``."""
    contexts, targets, skipped = training_pairs(task, fmt, tokenizer)
    return encode_pairs(task.name, contexts, targets, tokenizer, fmt, max_length, pad_id, skipped)


def task_seed(seed: int, name: str) -> int:
    """A per-task seed (a task's initialisation and order do not depend on the other tasks)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def step_indices(n: int, batch_size: int, seed: int, name: str, step: int) -> np.ndarray:
    """Example indices of ``step`` (0-based): positions step·P … of a sequence of per-epoch permutations."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):  # one or two epochs per step unless P > n
        order = np.random.Generator(np.random.PCG64([task_seed(seed, name), int(epoch)])).permutation(n)
        here = epochs == epoch
        out[here] = order[positions[here] % n]
    return out


def make_batch(tasks: list[EncodedTask], indices: list[np.ndarray]) -> Batch:
    """The batch of the given example indices per task, right-padded to its longest sequence."""
    idx = [torch.from_numpy(i) for i in indices]
    lengths = torch.cat([t.lengths[i] for t, i in zip(tasks, idx)])  # (K*P,)
    scored = torch.cat([t.num_target[i] for t, i in zip(tasks, idx)])
    width = int(lengths.max())
    ids = torch.cat([torch.nn.functional.pad(t.ids[i, :width], (0, max(0, width - t.ids.shape[1])), value=t.pad_id)
                     for t, i in zip(tasks, idx)])
    steps = torch.arange(width)
    mask = steps < lengths[:, None]
    predicts = (steps >= (lengths - scored - 1)[:, None]) & (steps < (lengths - 1)[:, None])  # position p predicts p + 1
    targets = ids.roll(-1, dims=1)[predicts]
    return Batch(ids, mask.long(), predicts, targets)
