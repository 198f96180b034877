"""Adapter arithmetic: can a held-out task's adapter be written as a combination of its siblings' teachers?

A generator that is affine in its condition writes, for a condition that is an affine combination of
training conditions, the same combination of what it writes for them, token by token. So when a
held-out member's condition is analogous to training ones (the embedding of "not a food" is that of
"a food" moved as "not a colour" is from "a colour"), an affine generator writes at best the
*translation* of the source task's adapter. Scoring combinations of the teachers' own adapters shows
whether that is enough, before any generator is trained. For a relation ``a -> b`` seen on training
pairs (a_i, b_i) (``word_colour -> word_not_colour``) and a source task x (``word_food``):

* translation ``x + mean_i(b_i - a_i)``: the relation is a shift of the adapter;
* reflection ``mean_i(a_i + b_i) - x``: the relation flips the task's own part about the centre
  its pairs share.

Both are affine combinations (weights sum to 1), taken in DnD's token space, where a generator writes,
of each task's last teacher snapshot. On the default demo's teachers the negated members score 0 % by
translation and 94-96 % by reflection (README "Results"): negation is a reflection, which no affine
map extrapolates to a new category.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.teacher_set import TeacherSet
from ..errors import LLGBMError
from ..lora.tokens import detokenize, tokenize
from .uncertainty import recovery

Pair = tuple[str, str]


@dataclass(frozen=True)
class Combination:
    """A named affine combination of teacher adapters: task -> weight."""

    name: str
    weights: dict[str, float]

    def formula(self) -> str:
        """``-word_food + 0.333·word_colour + …``"""
        text = ""
        for i, (task, w) in enumerate(self.weights.items()):
            sign = ("-" if w < 0 else "") if i == 0 else (" - " if w < 0 else " + ")
            text += f"{sign}{'' if abs(w) == 1 else f'{abs(w):.3g}·'}{task}"
        return text


def translation(source: str, pairs: Sequence[Pair]) -> dict[str, float]:
    """``source + mean(b - a)`` over ``pairs`` (a, b)."""
    return _accumulate([(source, 1.0)] + [(t, s / len(pairs)) for a, b in pairs for t, s in ((b, 1.0), (a, -1.0))])


def reflection(source: str, pairs: Sequence[Pair]) -> dict[str, float]:
    """``mean(a + b) - source`` over ``pairs`` (a, b)."""
    return _accumulate([(source, -1.0)] + [(t, 1.0 / len(pairs)) for a, b in pairs for t in (a, b)])


def _accumulate(terms: list[tuple[str, float]]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for task, w in terms:
        weights[task] = weights.get(task, 0.0) + w
    return {t: w for t, w in weights.items() if w != 0.0}


def combinations(source: str, pairs: Sequence[Pair]) -> list[Combination]:
    """Translation and reflection over all pairs, then over each pair alone."""
    out = [Combination("translation", translation(source, pairs)), Combination("reflection", reflection(source, pairs))]
    if len(pairs) > 1:
        for pair in pairs:
            out += [Combination(f"translation via {pair[0]}", translation(source, [pair])),
                    Combination(f"reflection via {pair[0]}", reflection(source, [pair]))]
    return out


def last_snapshot_tokens(teachers: TeacherSet, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """DnD tokens (N_tok, H, W) of each task's last teacher snapshot."""
    from ..delta.deltas import load_teacher_factors

    missing = [t for t in tasks if t not in teachers.tasks]
    if missing:
        raise LLGBMError(f"{teachers.root}: no teachers of task(s) {', '.join(missing)}")
    paths = [max((e for e in teachers.entries if e.task == t), key=lambda e: e.step).path for t in tasks]
    factors = load_teacher_factors(paths, teachers.layout, torch.float32, "cpu")
    tokens = tokenize(factors, teachers.layout)  # (K, N_tok, H, W)
    return dict(zip(tasks, tokens))


def combine(tokens: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ weight · tokens of the named adapters."""
    return sum(w * tokens[t] for t, w in weights.items())


def score_analogies(teachers: TeacherSet, target: str, source: str, pairs: Sequence[Pair], *,
                    data_dir: str | None = None, limit: int | None = None) -> list[dict]:
    """Accuracy on ``target``'s test split (first ``limit`` examples) of the base model, the target's and
    the source's teachers and every combination; ``recovery`` = (acc − base) / (teacher − base)."""
    from ..delta.functional import FunctionalLoRA
    from ..eval.scoring import AdapterBatch, ScoringConfig, evaluate_task
    from ..eval.tasks import task_with_test_split
    from ..models.registry import load_base_model, resolve_base_model
    from ..teachers.multitask import task_format

    if not pairs:
        raise LLGBMError("--pairs: give at least one training pair A:B")
    combos = combinations(source, pairs)
    tasks = list(dict.fromkeys([target, source, *(t for a, b in pairs for t in (a, b))]))
    tokens = last_snapshot_tokens(teachers, tasks)
    named = [Combination("teacher", {target: 1.0}), Combination("source", {source: 1.0}), *combos]
    stacked = torch.stack([combine(tokens, c.weights) for c in named])
    model, tokenizer = load_base_model(resolve_base_model(teachers.model_name), dtype=torch.float32)
    task = task_with_test_split(target, data_dir, "--data-dir")
    scoring = ScoringConfig(fmt=task_format(teachers, target), progress=False)
    base = evaluate_task(model, tokenizer, task, scoring, limit=limit)[0]
    adapters = AdapterBatch(FunctionalLoRA(model, teachers.layout), detokenize(stacked, teachers.layout))
    results = evaluate_task(model, tokenizer, task, scoring, adapters, limit=limit)
    rows = [{"adapter": "base", "combination": "", "accuracy": base.accuracy}]
    rows += [{"adapter": c.name, "combination": c.formula(), "accuracy": r.accuracy} for c, r in zip(named, results)]
    for row in rows:
        value = recovery(row["accuracy"], base.accuracy, results[0].accuracy, base.total)
        row["recovery"] = math.nan if value is None else value + 0.0  # + 0.0: no "-0.00" for the base row
    return rows


def analogy_table(rows: list[dict]) -> str:
    lines = ["| adapter | combination of last teacher snapshots (DnD tokens) | accuracy % | recovery |",
             "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['adapter']} | {r['combination']} | {100 * r['accuracy']:.1f} | {r['recovery']:+.2f} |")
    return "\n".join(lines)
