"""Task accuracy of a base model and of K LoRA adapters at once: option log-likelihood and exact match.

Both scorers format an example with ``llgbm_ext.data.formatting`` (the module teachers are trained
with), so a teacher is scored on exactly the text it learned: ``context(example)`` followed by a
candidate. The context and each candidate are tokenized *separately* and their ids concatenated, so
the scored tokens are exactly the candidate's own (no merge across the boundary).

* Multiple choice and True/False: a batch of examples' contexts goes through one padded forward, whose
  last positions score every candidate's first token; candidates' later tokens run on the contexts' KV
  cache, one row per candidate. The LM head runs at the scored positions alone. An example's
  prediction is the candidate with the highest mean per-token log-likelihood (``reduction="mean"``,
  the default: long options are not penalised for their length) or the highest total (``"sum"``).
  Ties go to the first option.
* Exact answers: greedy decoding with a KV cache on left-padded prompts (positions from the
  attention mask), stopping at end-of-sequence, or at a newline for short answers. The answer is
  GSM8K's ``#### <number>`` (else the last number) or the first line, compared after normalisation
  (whitespace collapsed, numbers compared as numbers).

K adapters are evaluated in the same forward: the example batch is tiled K times and
``FunctionalLoRA`` gives rows ``k·B … (k+1)·B − 1`` adapter k. The hooks act on every forward,
including the one-token steps of cached decoding, and the row order never changes, so each row keeps
its adapter throughout.

Fixes to the original LLGBM's evaluation (contract §4.9, §6.9, §6.22): it decoded without a KV cache
and appended new tokens after right padding (shifted positions for shorter rows); it evaluated only the
first 100 items, one at a time, parsing a sampled free-text answer. Here every item is scored (or
``limit`` of them), batched, deterministically, and scoring matches the training format.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Literal, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.formatting import PromptFormat, candidates, context
from ..data.records import Example, Task
from ..delta.functional import FunctionalLoRA, get_backbone, num_adapters
from ..errors import LLGBMError, ModelError
from ..lora.factors import LoraFactors

AnswerStyle = Literal["gsm8k", "first_line"]
LM_HEAD_ROWS = 4096  # candidate positions sent through the LM head at once (bounds the (rows, vocab) logits)


class EvalError(LLGBMError):
    """An evaluation input is unusable (no examples, inconsistent labels, unknown option)."""


@dataclass(frozen=True)
class ScoringConfig:
    """How examples are formatted, batched and decided.

    Attributes:
        fmt: the prompt format teachers were trained with.
        reduction: choose the option with the highest "mean" per-token or "sum" log-likelihood.
        max_rows: sequences per forward, all adapters together (memory knob).
        max_length: context tokens kept; longer contexts lose their beginning.
        max_new_tokens: greedy decoding budget for exact-answer tasks.
        stop_at_newline: stop decoding at a newline; None: yes for short answers, no for GSM8K-style.
        progress: show progress bars.
    """

    fmt: PromptFormat = PromptFormat()
    reduction: Literal["mean", "sum"] = "mean"
    max_rows: int = 64
    max_length: int = 1024
    max_new_tokens: int = 32
    stop_at_newline: bool | None = None
    progress: bool = True

    def __post_init__(self):
        if self.reduction not in ("mean", "sum"):
            raise EvalError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        for name in ("max_rows", "max_length", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class AdapterBatch:
    """K adapters applied together: factors with leading dim K on ``lora``'s base model."""

    lora: FunctionalLoRA
    factors: LoraFactors

    @property
    def k(self) -> int:
        return num_adapters(self.factors)


@dataclass
class ExampleResult:
    """One example as one model saw it: the prediction (option index or extracted answer) and why."""

    index: int  # position in the task's test split
    gold: int | str
    prediction: int | str
    correct: bool
    scores: list[float] | None = None  # per option, after the reduction (choice tasks)
    output: str | None = None  # the generated continuation (exact tasks)


@dataclass
class TaskResult:
    """Accuracy of one model on one task, with every example for debugging."""

    task: str
    kind: str
    model: str
    correct: int
    total: int
    skipped: int = 0  # examples without a gold answer (or options), not scored
    examples: list[ExampleResult] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def to_dict(self, with_examples: bool = True) -> dict:
        d = {"task": self.task, "kind": self.kind, "model": self.model, "accuracy": self.accuracy,
             "correct": self.correct, "total": self.total, "skipped": self.skipped}
        if with_examples:
            d["examples"] = [asdict(e) for e in self.examples]
        return d


# --- shared pieces -------------------------------------------------------------------------------
def _applied(adapters: AdapterBatch | None):
    return contextlib.nullcontext() if adapters is None else adapters.lora.apply(adapters.factors)


def _lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ModelError(f"{type(model).__name__}: no output embeddings (LM head) found")
    return head


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_contexts(tokenizer, examples: Sequence[Example], fmt: PromptFormat, max_length: int) -> list[list[int]]:
    """Token ids of each example's context, the oldest tokens dropped beyond ``max_length``.

    A chat-template context already holds its special tokens; a plain one gets the tokenizer's (e.g. BOS).
    """
    texts = [context(e, fmt, tokenizer) for e in examples]
    ids = tokenizer(texts, add_special_tokens=not fmt.chat_template)["input_ids"]
    return [row[-max_length:] for row in ids]


def _batches(lengths: Sequence[int], rows_per_batch: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``rows_per_batch``, longest first (less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + rows_per_batch] for i in range(0, len(order), rows_per_batch)]


# --- option log-likelihood -----------------------------------------------------------------------
def _context_batches(lengths: Sequence[int], sequences: Sequence[int], budget: int) -> list[list[int]]:
    """Contexts grouped longest first into batches of at most ``budget`` scored sequences (at least one
    context per batch), so both forwards of a batch stay within ``budget`` rows."""
    batches, current, used = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if current and used + sequences[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += sequences[i]
    return batches + [current] if current else batches


def _log_probs(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """log p(targets) (K, P) from hidden states (K, P, H), the LM head run on LM_HEAD_ROWS rows at a time."""
    return torch.cat([
        torch.log_softmax(head(rows).float(), dim=-1).gather(-1, tgt.expand(rows.shape[0], -1)[..., None])[..., 0]
        for rows, tgt in zip(hidden.split(LM_HEAD_ROWS, dim=1), targets.split(LM_HEAD_ROWS))
    ], dim=1)


@torch.no_grad()
def sequence_log_likelihoods(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    num_scored: Sequence[int],
    pad_id: int,
    adapters: AdapterBatch | None = None,
    max_rows: int = 64,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Summed log-probability of the last ``num_scored[i]`` tokens of each sequence given the rest.

    Returns (sums (K, S) fp32, counts (S,)), K = 1 without adapters. Sequences with the same context
    (the tokens before their scored ones: one example's options) share it: a batch of contexts runs once,
    right-padded, its last positions scoring every first scored token; the other scored tokens then run
    on the contexts' KV cache, one row per sequence. With adapters, both forwards tile the rows K times.
    """
    if any(n < 1 or n >= len(s) for s, n in zip(sequences, num_scored)):
        raise EvalError("every scored sequence needs at least one context token and one scored token")
    k = 1 if adapters is None else adapters.k
    device = _device(model)
    backbone, head = get_backbone(model), _lm_head(model)
    cache_name = _cache_argument(backbone)
    contexts: dict[tuple[int, ...], int] = {}
    context_of = [contexts.setdefault(tuple(s[: len(s) - n]), len(contexts)) for s, n in zip(sequences, num_scored)]
    rows = list(contexts)
    users: list[list[int]] = [[] for _ in rows]  # the sequences of each context
    for i, c in enumerate(context_of):
        users[c].append(i)
    sums = torch.zeros(k, len(sequences))
    batches = _context_batches([len(r) for r in rows], [len(u) for u in users], max(1, max_rows // k))
    with _applied(adapters):
        for batch in tqdm(batches, desc="scoring options", unit="batch", disable=not progress, leave=False):
            members = [i for c in batch for i in users[c]]  # this batch's sequences, by context
            source = torch.tensor([b for b, c in enumerate(batch) for _ in users[c]])  # (M,) their context's row
            lengths = torch.tensor([len(rows[c]) for c in batch])  # (B,)
            width = int(lengths.max())
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for b, c in enumerate(batch):
                ids[b, : lengths[b]] = torch.tensor(rows[c])
            mask = (torch.arange(width) < lengths[:, None]).long()  # (B, T)
            rest = torch.tensor([num_scored[i] - 1 for i in members])  # (M,) scored tokens after the first
            more = int(rest.max())
            out = backbone(input_ids=ids.to(device).repeat(k, 1), attention_mask=mask.to(device).repeat(k, 1),
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device).repeat(k, 1), use_cache=more > 0)
            last = out.last_hidden_state.view(k, len(batch), width, -1)[:, torch.arange(len(batch)), lengths - 1]
            first = torch.tensor([sequences[i][len(sequences[i]) - num_scored[i]] for i in members], device=device)
            per_token = torch.zeros(k, len(members), 1 + more, device=device)  # each (sequence, token) its own cell
            per_token[:, :, 0] = _log_probs(head, last[:, source.to(device)], first)
            longer = torch.nonzero(rest).flatten()  # (L,) sequences with scored tokens after the first
            if len(longer):  # their inputs are their own tokens, on the KV cache of their context
                cache = out[cache_name]
                cache.batch_select_indices((torch.arange(k)[:, None] * len(batch) + source[longer]).flatten().to(device))
                steps = torch.arange(more)
                inputs = torch.full((len(longer), more), pad_id, dtype=torch.long)
                targets = torch.full((len(longer), more), pad_id, dtype=torch.long)
                for row, m in enumerate(longer.tolist()):
                    i = members[m]
                    start = len(sequences[i]) - num_scored[i]
                    inputs[row, : rest[m]] = torch.tensor(sequences[i][start : len(sequences[i]) - 1])
                    targets[row, : rest[m]] = torch.tensor(sequences[i][start + 1 :])
                scored = steps < rest[longer, None]  # (L, more)
                both = torch.cat([mask[source[longer]], scored.long()], dim=1)  # context mask, then these tokens
                positions = lengths[source[longer], None] + steps  # continuing each context
                hidden = backbone(input_ids=inputs.to(device).repeat(k, 1), attention_mask=both.to(device).repeat(k, 1),
                                  position_ids=positions.to(device).repeat(k, 1), use_cache=True,
                                  **{cache_name: cache}).last_hidden_state  # (K*L, more, H)
                picked = hidden.view(k, len(longer), more, -1)[:, scored.to(device)]  # (K, P, H)
                cells = per_token[:, longer.to(device), 1:]  # a copy: written back below
                cells[:, scored.to(device)] = _log_probs(head, picked, targets[scored].to(device))
                per_token[:, longer.to(device), 1:] = cells
            sums[:, members] = per_token.sum(-1).cpu()
    counts = torch.tensor([float(n) for n in num_scored])
    return sums, counts


def evaluate_choices(
    model: nn.Module,
    tokenizer,
    task: Task,
    examples: Sequence[Example],
    config: ScoringConfig = ScoringConfig(),
    adapters: AdapterBatch | None = None,
    labels: Sequence[str] = ("base",),
) -> list[TaskResult]:
    """Option-likelihood accuracy of a multiple-choice or True/False task, one result per model."""
    usable = [(i, e) for i, e in enumerate(examples) if e.choices and isinstance(e.answer, int)]
    contexts = encode_contexts(tokenizer, [e for _, e in usable], config.fmt, config.max_length)
    sequences, num_scored = [], []
    for (i, example), ctx in zip(usable, contexts):
        options = tokenizer(candidates(example, config.fmt), add_special_tokens=False)["input_ids"]
        for option in options:
            if not option:
                raise EvalError(f"task {task.name}: example {i} has an empty option")
            sequences.append(ctx + option)
            num_scored.append(len(option))
    sums, counts = sequence_log_likelihoods(
        model, sequences, num_scored, _pad_id(tokenizer), adapters, config.max_rows, config.progress
    ) if sequences else (torch.zeros(len(labels), 0), torch.zeros(0))
    scores = sums / counts if config.reduction == "mean" else sums  # (K, S)
    results = []
    for k, label in enumerate(labels):
        rows, start = [], 0
        for i, example in usable:
            option_scores = scores[k, start : start + len(example.choices)]
            start += len(example.choices)
            prediction = int(option_scores.argmax())  # first of equal maxima
            rows.append(ExampleResult(i, example.answer, prediction, prediction == example.answer,
                                      scores=[float(s) for s in option_scores]))
        results.append(TaskResult(task.name, task.kind, label, sum(r.correct for r in rows), len(rows),
                                  len(examples) - len(usable), rows))
    return results


# --- greedy decoding -----------------------------------------------------------------------------
def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ModelError("the tokenizer has neither a pad nor an end-of-sequence token")
    return int(pad)


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's, the generation config's, and the chat end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")  # None (or the unknown token) if absent
    if end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(int(i) for i in ids if i is not None)


@functools.lru_cache(maxsize=4)
def newline_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids of every token whose text contains a newline (decoded once per tokenizer)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(i for i, text in enumerate(texts) if "\n" in text)


def _cache_argument(backbone: nn.Module) -> str:
    """The KV cache's name in the backbone's arguments and outputs (transformers 5: ``cache``, 4.x:
    ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    use_cache: bool = True,
) -> Tensor:
    """Greedy continuation of left-padded prompts: (N, steps) ids, ``pad_id`` after a row's stop token.

    Positions come from the attention mask, so a padded row decodes exactly as it would alone. With
    ``use_cache`` each step feeds one token per row and the KV cache; without it the whole sequence
    is recomputed every step (same result, for checking).
    """
    backbone, head = get_backbone(model), _lm_head(model)
    device = input_ids.device
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, T)
    sequence, step_ids, step_positions = input_ids, input_ids, positions
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    cache_name = _cache_argument(backbone)
    cache, generated = None, []
    for _ in range(max_new_tokens):
        out = backbone(input_ids=step_ids, attention_mask=mask, position_ids=step_positions,
                       use_cache=use_cache, **({cache_name: cache} if cache is not None else {}))
        logits = head(out.last_hidden_state[:, -1]).float()  # (N, V)
        token = torch.where(done, pad_id, logits.argmax(-1))  # (N,)
        generated.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        next_position = positions[:, -1:] + 1
        positions = torch.cat([positions, next_position], dim=1)
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        if use_cache:
            cache, step_ids, step_positions = out[cache_name], token[:, None], next_position
        else:
            step_ids, step_positions = sequence, positions
    return torch.stack(generated, dim=1) if generated else input_ids.new_zeros((input_ids.shape[0], 0))


def generate_answers(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    config: ScoringConfig = ScoringConfig(),
    adapters: AdapterBatch | None = None,
    stop_at_newline: bool = True,
    use_cache: bool = True,
) -> list[list[str]]:
    """Greedy continuations of every example's context: K lists of N texts, each ending before its
    end-of-sequence token or with the token that holds its first newline."""
    k = 1 if adapters is None else adapters.k
    pad_id, device = _pad_id(tokenizer), _device(model)
    end_ids = set(stop_token_ids(model, tokenizer))
    newline_ids = set(newline_token_ids(tokenizer)) if stop_at_newline else set()
    stops = sorted(end_ids | newline_ids)
    contexts = encode_contexts(tokenizer, examples, config.fmt, config.max_length)
    texts = [[""] * len(examples) for _ in range(k)]
    batches = _batches([len(c) for c in contexts], max(1, config.max_rows // k))
    with _applied(adapters):
        for batch in tqdm(batches, desc="generating", unit="batch", disable=not config.progress, leave=False):
            width = max(len(contexts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding
                ids[row, width - len(contexts[i]):] = torch.tensor(contexts[i])
                mask[row, width - len(contexts[i]):] = 1
            out = greedy_generate(model, ids.repeat(k, 1).to(device), mask.repeat(k, 1).to(device),
                                  config.max_new_tokens, stops, pad_id, use_cache).cpu()  # (K*B, steps)
            for n, row in enumerate(out.tolist()):
                end = next((j + (t not in end_ids) for j, t in enumerate(row) if t in end_ids or t in newline_ids), len(row))
                texts[n // len(batch)][batch[n % len(batch)]] = tokenizer.decode(row[:end], skip_special_tokens=True)
    return texts


# --- answers -------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_style(task: Task) -> AnswerStyle:
    """GSM8K-style (reasoning ending in ``#### n``) if any example's response has ``####``, else first line."""
    return "gsm8k" if any("####" in e.response for e in task.test + task.train) else "first_line"


def extract_answer(text: str, style: AnswerStyle) -> str:
    """The answer in a generated continuation: the number after ``####`` (else the last number), or
    the first line, stripped."""
    if style == "gsm8k":
        if "####" in text:
            found = _NUMBER.search(text.split("####", 1)[1])
            if found:
                return found.group().replace(",", "")
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else ""
    return text.split("\n", 1)[0].strip()


def normalise_answer(text: str) -> tuple[str | Decimal, ...]:
    """Whitespace-separated parts; numbers (``1,234``, ``18.``, ``20.0``) become their value."""
    parts: list[str | Decimal] = []
    for part in text.split():
        number = part.replace(",", "").rstrip(".")
        try:
            parts.append(Decimal(number) if _NUMBER.fullmatch(number) else part)
        except InvalidOperation:
            parts.append(part)
    return tuple(parts)


def answers_match(prediction: str, gold: str) -> bool:
    """Equal after normalisation; an empty prediction never matches."""
    predicted = normalise_answer(prediction)
    return bool(predicted) and predicted == normalise_answer(gold)


def evaluate_exact(
    model: nn.Module,
    tokenizer,
    task: Task,
    examples: Sequence[Example],
    config: ScoringConfig = ScoringConfig(),
    adapters: AdapterBatch | None = None,
    labels: Sequence[str] = ("base",),
) -> list[TaskResult]:
    """Exact-match accuracy of greedy answers, one result per model."""
    style = answer_style(task)
    stop_at_newline = config.stop_at_newline if config.stop_at_newline is not None else style == "first_line"
    usable = [(i, e) for i, e in enumerate(examples) if isinstance(e.answer, str) and e.answer.strip()]
    outputs = generate_answers(model, tokenizer, [e for _, e in usable], config, adapters, stop_at_newline) \
        if usable else [[] for _ in labels]
    results = []
    for label, texts in zip(labels, outputs):
        rows = []
        for (i, example), text in zip(usable, texts):
            answer = extract_answer(text, style)
            rows.append(ExampleResult(i, example.answer, answer, answers_match(answer, example.answer), output=text))
        results.append(TaskResult(task.name, task.kind, label, sum(r.correct for r in rows), len(rows),
                                  len(examples) - len(usable), rows))
    return results


def evaluate_task(
    model: nn.Module,
    tokenizer,
    task: Task,
    config: ScoringConfig = ScoringConfig(),
    adapters: AdapterBatch | None = None,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[TaskResult]:
    """Accuracy on the first ``limit`` test examples (all if None) of the base model (``adapters``
    None) or of each of K adapters, in one pass; ``labels`` name the models in the results."""
    k = 1 if adapters is None else adapters.k
    labels = list(labels) if labels is not None else (["base"] if adapters is None else [f"adapter{j}" for j in range(k)])
    if len(labels) != k:
        raise EvalError(f"{len(labels)} labels for {k} models")
    examples = task.test[:limit] if limit is not None else task.test
    if not examples:
        raise EvalError(f"task {task.name}: no test examples")
    evaluate = evaluate_exact if task.kind == "exact" else evaluate_choices
    return evaluate(model, tokenizer, task, examples, config, adapters, labels)
