"""Training sequences of a task and the batch of every step: context + target + end token, loss on the target.

A sequence is tokenized exactly as evaluation scores it (``eval.scoring``): the context and the
target are tokenized separately and their ids concatenated, so the trained answer tokens are the
scored candidate tokens. It ends with the end-of-turn token (``<|im_end|>``) under a chat template,
else with the end-of-sequence token. A sequence longer than ``max_length`` loses the beginning of its
context (as evaluation truncates contexts); a target longer than that loses its end.

Under the ``choice`` and ``lm+choice`` objectives (``encode_choices``) an example is one sequence per
option, context + candidate exactly as evaluation scores it (no end token), and the batch records which
rows belong to which example and which row holds its gold option.

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

from ..data.formatting import FormatError, PromptFormat, candidates, context, target
from ..data.records import Task
from .config import TeacherError


@dataclass
class EncodedTask:
    """A task's training sequences, right-padded: ``ids (R, T)``, ``lengths (R,)``, ``num_target (R,)``.

    One row per example, except under the choice objective: then example i's options are the rows
    ``option_rows[i]`` … ``option_rows[i + 1] − 1`` and ``gold[i]`` is the row of its gold option.
    """

    name: str
    ids: Tensor
    lengths: Tensor
    num_target: Tensor
    pad_id: int
    skipped: int  # examples without a usable gold answer
    option_rows: Tensor | None = None  # (N + 1,) choice objective only
    gold: Tensor | None = None  # (N,) choice objective only

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.lengths) if self.option_rows is None else len(self.option_rows) - 1


@dataclass
class Batch:
    """The sequences of K tasks' examples, task by task: ids, attention mask, and the positions whose next
    token is a target token (``predicts``), with those targets. Under the choice objective ``row_example``
    maps each row to its example (numbered in the batch; −1 for a fill row) and ``gold`` gives each example's
    gold row."""

    input_ids: Tensor  # (R, T)
    attention_mask: Tensor  # (R, T)
    predicts: Tensor  # (R, T) bool
    targets: Tensor  # (M,) the token each predicting position must produce, row-major
    row_task: Tensor  # (R,) the task of each row
    row_example: Tensor | None = None  # (R,) choice objective only; −1: a fill row
    gold: Tensor | None = None  # (E,) choice objective only
    example_task: Tensor | None = None  # (E,) choice objective only

    def to(self, device) -> "Batch":
        return Batch(*(None if x is None else x.to(device) for x in (
            self.input_ids, self.attention_mask, self.predicts, self.targets, self.row_task, self.row_example,
            self.gold, self.example_task)))


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
                 pad_id: int, skipped: int = 0, end: bool = True) -> EncodedTask:
    """Tokenize (context, target) pairs as training sequences (see the module docstring); ``end=False``
    leaves out the end token (sequences as evaluation scores them)."""
    if not contexts:
        raise TeacherError(f"task {name}: no training example has a usable answer ({skipped} skipped)")
    closing = [end_token_id(tokenizer, fmt)] if end else []
    context_ids = tokenizer(contexts, add_special_tokens=not fmt.chat_template)["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    rows, num_target = [], []
    for ctx, tgt in zip(context_ids, target_ids):
        tgt = (tgt + closing)[: max_length - 1]
        ctx = ctx[-(max_length - len(tgt)):]
        rows.append(ctx + tgt)
        num_target.append(len(tgt))
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return EncodedTask(name, ids, lengths, torch.tensor(num_target), pad_id, skipped)


def encode_choices(task: Task, tokenizer, fmt: PromptFormat, max_length: int, pad_id: int) -> EncodedTask:
    """Tokenize every option of every multiple-choice training example (the choice objective)."""
    contexts, options, first_rows, gold, skipped = [], [], [0], [], 0
    for example in task.train:
        answer = example.answer
        if not example.choices or not isinstance(answer, int) or not 0 <= answer < len(example.choices):
            skipped += 1
            continue
        scored = candidates(example, fmt)
        gold.append(first_rows[-1] + answer)
        contexts += [context(example, fmt, tokenizer)] * len(scored)
        options += scored
        first_rows.append(first_rows[-1] + len(scored))
    if not gold:
        raise TeacherError(f"task {task.name}: the choice objective needs multiple-choice training examples "
                           f"(options and a gold index); none of its {len(task.train)} has them")
    encoded = encode_pairs(task.name, contexts, options, tokenizer, fmt, max_length, pad_id, skipped, end=False)
    encoded.option_rows, encoded.gold = torch.tensor(first_rows), torch.tensor(gold)
    return encoded


def encode_task(task: Task, tokenizer, fmt: PromptFormat, max_length: int, pad_id: int,
                objective: str = "lm") -> EncodedTask:
    """Tokenize every usable training example of ``task`` for ``objective`` (``lm``, ``choice`` or ``lm+choice``)."""
    if objective != "lm":
        return encode_choices(task, tokenizer, fmt, max_length, pad_id)
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


def option_rows(task: EncodedTask, examples: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A choice task's ``examples`` as rows: the rows of their options, the example (0 … E − 1) of each row,
    and the position of each example's gold option among those rows."""
    starts = task.option_rows[examples]
    counts = task.option_rows[examples + 1] - starts
    first = torch.cumsum(counts, 0) - counts  # where each example's options begin among the rows
    example = torch.repeat_interleave(torch.arange(len(examples)), counts)
    rows = starts[example] + torch.arange(int(counts.sum())) - first[example]
    return rows, example, first + task.gold[examples] - starts


def make_batch(tasks: list[EncodedTask], indices: list[np.ndarray]) -> Batch:
    """The batch of the given example indices per task, right-padded to its longest sequence.

    Every task gets the same number of rows (``FunctionalLoRA`` gives adapter k rows k·P … (k+1)·P − 1).
    Under the choice objective, where tasks differ in options per example, a task with fewer option rows
    is filled up with copies of its first row that predict nothing (``row_example`` −1)."""
    choice = {t.option_rows is not None for t in tasks}
    if len(choice) > 1:
        raise TeacherError("a batch mixes tasks encoded for the choice objective with others")
    examples = [torch.from_numpy(np.asarray(i, dtype=np.int64)) for i in indices]
    row_example = gold = example_task = None
    if choice == {True}:
        parts = [option_rows(t, e) for t, e in zip(tasks, examples)]
        per_task = max(len(rows) for rows, _, _ in parts)
        fill = [per_task - len(rows) for rows, _, _ in parts]
        idx = [torch.cat([rows, rows[:1].repeat(n)]) for (rows, _, _), n in zip(parts, fill)]
        numbered = np.cumsum([0] + [len(e) for e in examples[:-1]]).tolist()  # examples before each task's
        row_example = torch.cat([torch.cat([example + first, torch.full((n,), -1)])
                                 for (_, example, _), first, n in zip(parts, numbered, fill)])
        gold = torch.cat([position + k * per_task for k, (_, _, position) in enumerate(parts)])
        example_task = torch.cat([torch.full((len(e),), k) for k, e in enumerate(examples)])
        real = row_example >= 0
    else:
        idx = examples
        real = None
    row_task = torch.cat([torch.full((len(i),), k) for k, i in enumerate(idx)])
    lengths = torch.cat([t.lengths[i] for t, i in zip(tasks, idx)])  # (R,)
    scored = torch.cat([t.num_target[i] for t, i in zip(tasks, idx)])
    if real is not None:
        scored = scored * real  # fill rows predict nothing
    width = int(lengths.max())
    ids = torch.cat([torch.nn.functional.pad(t.ids[i, :width], (0, max(0, width - t.ids.shape[1])), value=t.pad_id)
                     for t, i in zip(tasks, idx)])
    steps = torch.arange(width)
    mask = steps < lengths[:, None]
    predicts = (steps >= (lengths - scored - 1)[:, None]) & (steps < (lengths - 1)[:, None])  # position p predicts p + 1
    targets = ids.roll(-1, dims=1)[predicts]
    return Batch(ids, mask.long(), predicts, targets, row_task, row_example, gold, example_task)
