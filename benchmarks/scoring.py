"""Option scoring (``llgbm_ext.eval.scoring.sequence_log_likelihoods``): each example's context once, the
options' later tokens on its KV cache, against one whole row per option.

    python benchmarks/scoring.py [--tasks word_colour digit_first_5] [--examples 64] [--adapters 2] [--repeats 3]

Both variants score the same (context + option) sequences of synthetic suite v2 tasks on the shipped
``tiny`` model with K random adapters in the same forward (as teacher evaluation does: base + teacher),
one torch thread, and must agree; printed: ms of each, their ratio and the largest score difference.
``digit_*`` options are three tokens (space, two digits), ``word_*`` ones a single token.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch

from llgbm_ext.data.formatting import PromptFormat, candidates
from llgbm_ext.data.synthetic import get_synthetic_task
from llgbm_ext.delta.functional import FunctionalLoRA, get_backbone
from llgbm_ext.eval.scoring import LM_HEAD_ROWS, AdapterBatch, _applied, encode_contexts, sequence_log_likelihoods
from llgbm_ext.lora.factors import random_factors
from llgbm_ext.lora.layout import get_layout
from llgbm_ext.models.registry import load_base_model, resolve_base_model


@torch.no_grad()
def whole_rows(model, sequences, num_scored, pad_id, adapters, max_rows=64) -> torch.Tensor:
    """The reference: every (context + option) sequence as its own right-padded row, K adapters tiled."""
    k = adapters.k
    backbone, head = get_backbone(model), model.get_output_embeddings()
    sums = torch.zeros(k, len(sequences))
    with _applied(adapters):
        for start in range(0, len(sequences), max_rows // k):
            batch = list(range(start, min(len(sequences), start + max_rows // k)))
            lengths = torch.tensor([len(sequences[i]) for i in batch])
            width = int(lengths.max())
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : lengths[row]] = torch.tensor(sequences[i])
            steps = torch.arange(width)
            mask = (steps < lengths[:, None]).long()
            scored = torch.tensor([num_scored[i] for i in batch])
            predicts = (steps >= (lengths - scored - 1)[:, None]) & (steps < (lengths - 1)[:, None])
            targets = ids.roll(-1, dims=1)[predicts].repeat(k)
            hidden = backbone(input_ids=ids.repeat(k, 1), attention_mask=mask.repeat(k, 1),
                              position_ids=(mask.cumsum(-1) - 1).clamp(min=0).repeat(k, 1)).last_hidden_state
            picked = hidden[predicts.repeat(k, 1)]
            logp = torch.cat([torch.log_softmax(head(rows).float(), -1).gather(-1, t[:, None])[:, 0]
                              for rows, t in zip(picked.split(LM_HEAD_ROWS), targets.split(LM_HEAD_ROWS))])
            per_token = torch.zeros(k * len(batch), width)
            per_token[predicts.repeat(k, 1)] = logp
            sums[:, batch] = per_token.sum(-1).view(k, len(batch))
    return sums


def sequences_of(task_name: str, tokenizer, examples: int) -> tuple[list[list[int]], list[int]]:
    task, fmt = get_synthetic_task(task_name), PromptFormat(answer_style="option")
    chosen = task.test[:examples]
    sequences, scored = [], []
    for ctx, example in zip(encode_contexts(tokenizer, chosen, fmt, 64), chosen):
        for option in tokenizer(candidates(example, fmt), add_special_tokens=False)["input_ids"]:
            sequences.append(ctx + option)
            scored.append(len(option))
    return sequences, scored


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` calls after one warm-up call."""
    fn()
    return 1000 * statistics.median(timeit.repeat(fn, number=1, repeat=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["word_colour", "digit_first_5"])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_base_model(resolve_base_model("tiny"))
    layout = get_layout("tiny")
    adapters = AdapterBatch(FunctionalLoRA(model, layout),
                            random_factors(layout, args.adapters, generator=torch.Generator().manual_seed(0), std=0.05))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for name in args.tasks:
        sequences, scored = sequences_of(name, tokenizer, args.examples)
        shared = sequence_log_likelihoods(model, sequences, scored, pad, adapters)[0]
        reference = whole_rows(model, sequences, scored, pad, adapters)
        ms_shared = median_ms(lambda: sequence_log_likelihoods(model, sequences, scored, pad, adapters), args.repeats)
        ms_rows = median_ms(lambda: whole_rows(model, sequences, scored, pad, adapters), args.repeats)
        print(f"{name}: {len(sequences)} options of {args.examples} examples, K={args.adapters}: shared context "
              f"{ms_shared:.0f} ms, one row per option {ms_rows:.0f} ms")
        print(f"{name}_speedup={ms_rows / ms_shared:.2f}")
        print(f"{name}_max_abs_diff={(shared - reference).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
