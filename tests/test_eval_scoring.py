"""Task scoring: option log-likelihood and greedy exact match, for the base model and K adapters at once,
checked against plain unbatched loops, PEFT, and answers forced or known in advance."""

import contextlib

import pytest
import torch
from peft import PeftModel
from torch import nn

from llgbm_ext.data.formatting import PromptFormat, candidates, context
from llgbm_ext.data.records import Example, Task
from llgbm_ext.delta.functional import FunctionalLoRA
from llgbm_ext.eval.scoring import (
    AdapterBatch,
    EvalError,
    ScoringConfig,
    answer_style,
    answers_match,
    evaluate_task,
    get_backbone,
    extract_answer,
    generate_answers,
    greedy_generate,
    newline_token_ids,
    sequence_log_likelihoods,
    stop_token_ids,
)
from llgbm_ext.lora.adapters import save_peft_adapter
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout
from llgbm_ext.models.registry import load_base_model

LAYOUT = get_layout("tiny")
K = 3
QUIET = ScoringConfig(progress=False)
WORDS = ("red", "blue", "cat", "dog", "milk", "tree", "sun", "egg")


def choice_task(n: int = 10) -> Task:
    """Multiple-choice examples with 2-4 options of one or more words and contexts of varied length."""
    g = torch.Generator().manual_seed(1)
    examples = []
    for i in range(n):
        size = 2 + i % 3
        options = tuple(" ".join(WORDS[j] for j in torch.randint(len(WORDS), (1 + (i + o) % 3,), generator=g).tolist())
                        for o in range(size))
        prompt = "Pick one" + " please" * (i % 4) + ":\n" + "\n".join(f"{'ABCD'[o]}: {t}" for o, t in enumerate(options))
        examples.append(Example(prompt, f"[{'ABCD'[i % size]}]", choices=options, answer=i % size))
    return Task("pick", "mc", test=examples)


def exact_task(answers: list[str]) -> Task:
    return Task("add", "exact", test=[Example(f"Add 1: {i} {2 * i}", a, answer=a) for i, a in enumerate(answers)])


def adapter(factors, k):
    return {proj: (a[k], b[k]) for proj, (a, b) in factors.items()}


@pytest.fixture(scope="module")
def factors():
    return random_factors(LAYOUT, K, generator=torch.Generator().manual_seed(3), std=0.1)


def reference_log_likelihoods(model, tokenizer, task, fmt):
    """Per example, per option: (sum, token count) from one unpadded forward per (example, option)."""
    out = []
    for e in task.test:
        ctx = tokenizer(context(e, fmt, tokenizer))["input_ids"]
        rows = []
        for option in candidates(e, fmt):
            ids = tokenizer(option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ctx + ids])).logits[0].float()
            logp = torch.log_softmax(logits[len(ctx) - 1 : -1], -1)
            rows.append((float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum()), len(ids)))
        out.append(rows)
    return out


@pytest.mark.parametrize("style", ["option", "letter"])
def test_batched_scores_equal_an_unbatched_loop_and_accuracy_the_hand_count(tiny_model, style):
    model, tokenizer = tiny_model
    task, fmt = choice_task(), PromptFormat(answer_style=style)
    reference = reference_log_likelihoods(model, tokenizer, task, fmt)
    for reduction in ("mean", "sum"):
        config = ScoringConfig(fmt=fmt, reduction=reduction, max_rows=5, progress=False)  # several padded batches
        (result,) = evaluate_task(model, tokenizer, task, config)
        correct = 0
        for e, rows, ex in zip(task.test, reference, result.examples):
            expected = [s / n if reduction == "mean" else s for s, n in rows]
            torch.testing.assert_close(torch.tensor(ex.scores), torch.tensor(expected), rtol=0, atol=1e-5)
            hand = max(range(len(expected)), key=lambda j: (expected[j], -j))
            assert ex.prediction == hand
            correct += hand == e.answer
        assert (result.correct, result.total, result.skipped) == (correct, len(task.test), 0)
        assert result.accuracy == correct / len(task.test)


class ForcedHead(nn.Module):
    """The LM head plus a large bonus for one token: the model answers with that token whatever it reads."""

    def __init__(self, head: nn.Module, token: int):
        super().__init__()
        self.head, self.token = head, token

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., self.token] += 50.0
        return logits


def test_a_model_forced_to_one_option_scores_its_hand_count(tiny_model_dir):
    model, tokenizer = load_base_model(tiny_model_dir)  # a fresh copy: its head is replaced below
    (token,) = tokenizer(" red", add_special_tokens=False)["input_ids"]  # one token, so the bonus decides
    model.lm_head = ForcedHead(model.lm_head, token)
    options = [("red", "cat", "sun"), ("cat", "red"), ("egg", "sun", "red", "dog"), ("dog", "red", "cat"), ("sun", "red")]
    golds = [0, 0, 2, 1, 0]
    task = Task("forced", "mc", test=[Example(f"Q{i}", "", choices=o, answer=g) for i, (o, g) in enumerate(zip(options, golds))])
    (result,) = evaluate_task(model, tokenizer, task, QUIET)
    assert [e.prediction for e in result.examples] == [o.index("red") for o in options]
    assert (result.correct, result.total) == (3, 5)  # by hand: "red" is the gold option of examples 0, 2 and 3


def test_examples_without_gold_are_skipped_and_counted(tiny_model):
    model, tokenizer = tiny_model
    task = choice_task(4)
    task.test.append(Example("No options", "[A]"))  # prompt without parsable options
    task.test.append(Example("No gold", "", choices=("red", "blue")))
    (result,) = evaluate_task(model, tokenizer, task, QUIET)
    assert (result.total, result.skipped) == (4, 2)
    assert evaluate_task(model, tokenizer, task, QUIET, limit=2)[0].total == 2


def peft_model_of(tiny_model_dir, tmp_path, factors):
    for k in range(K):
        save_peft_adapter(state_dict_from_factors(adapter(factors, k), LAYOUT), tmp_path / f"a{k}", LAYOUT)
    base, _ = load_base_model(tiny_model_dir)  # a fresh copy: PEFT injects its layers in place
    peft_model = PeftModel.from_pretrained(base, tmp_path / "a0", adapter_name="a0")
    for k in range(1, K):
        peft_model.load_adapter(tmp_path / f"a{k}", adapter_name=f"a{k}")
    return peft_model.eval()


def test_k_adapters_in_one_forward_equal_peft_one_by_one(tiny_model, tiny_model_dir, tmp_path, factors):
    model, tokenizer = tiny_model
    task, fmt = choice_task(6), PromptFormat(answer_style="letter")  # 3-token options
    batch = AdapterBatch(FunctionalLoRA(model, LAYOUT), factors)
    results = evaluate_task(model, tokenizer, task, ScoringConfig(fmt=fmt, max_rows=7, progress=False), batch, ["a0", "a1", "a2"])
    base = evaluate_task(model, tokenizer, task, ScoringConfig(fmt=fmt, progress=False))[0]
    peft_model = peft_model_of(tiny_model_dir, tmp_path, factors)
    for k, result in enumerate(results):
        peft_model.set_adapter(f"a{k}")
        reference = reference_log_likelihoods(peft_model, tokenizer, task, fmt)
        for rows, ex in zip(reference, result.examples):
            torch.testing.assert_close(torch.tensor(ex.scores), torch.tensor([s / n for s, n in rows]), rtol=0, atol=1e-5)
        assert result.model == f"a{k}"
        assert [e.scores for e in result.examples] != [e.scores for e in base.examples]  # the adapter acts


def test_options_share_their_context_and_score_as_full_sequences(tiny_model, factors):
    """One example's options run their context once (one-token options need nothing more, longer ones
    one row each on its KV cache); every score still equals a full forward of its own sequence, for the
    base model and for K adapters, in any batch size."""
    model, _ = tiny_model
    contexts = [[5, 9, 14, 3], [7, 2], [11, 4, 8, 6, 1, 12]]
    endings = [[20], [21], [22], [30, 31], [23, 24, 25]]  # three one-token options and two longer ones
    sequences = [c + e for c in contexts for e in endings]
    scored = [len(e) for _ in contexts for e in endings]
    rows = []
    hook = get_backbone(model).register_forward_hook(lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                                      with_kwargs=True)
    lora = FunctionalLoRA(model, LAYOUT)
    try:
        for adapters in (None, AdapterBatch(lora, factors)):
            k = 1 if adapters is None else K
            for max_rows in (k, 3 * k, 64):
                rows.clear()
                sums, counts = sequence_log_likelihoods(model, sequences, scored, pad_id=0, adapters=adapters,
                                                        max_rows=max_rows)
                assert sum(rows) == k * len(contexts) * 3  # per context: its own row + one per longer option
                assert counts.tolist() == [float(n) for n in scored]
                for j in range(k):
                    with contextlib.ExitStack() as stack:
                        if adapters is not None:
                            stack.enter_context(lora.apply(adapter_batch_of(factors, j)))
                        expected = [full_sequence_score(model, s, n) for s, n in zip(sequences, scored)]
                    torch.testing.assert_close(sums[j], torch.tensor(expected), rtol=0, atol=1e-5)
    finally:
        hook.remove()


def adapter_batch_of(factors, k):
    return {proj: (a[k : k + 1], b[k : k + 1]) for proj, (a, b) in factors.items()}


def full_sequence_score(model, sequence, scored):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0].float()
    logp = torch.log_softmax(logits[len(sequence) - scored - 1 : -1], -1)
    return float(logp[torch.arange(scored), torch.tensor(sequence[-scored:])].sum())


def test_k_adapter_generation_equals_peft_generate(tiny_model, tiny_model_dir, tmp_path, factors):
    model, tokenizer = tiny_model
    examples = exact_task(["1"] * 4).test
    config = ScoringConfig(max_new_tokens=6, max_rows=5, progress=False)
    ours = generate_answers(model, tokenizer, examples, config, AdapterBatch(FunctionalLoRA(model, LAYOUT), factors),
                            stop_at_newline=False)
    peft_model = peft_model_of(tiny_model_dir, tmp_path, factors)
    stops = stop_token_ids(model, tokenizer)  # no newline stop, as above
    for k in range(K):
        peft_model.set_adapter(f"a{k}")
        for e, text in zip(examples, ours[k]):
            ids = torch.tensor([tokenizer(context(e, config.fmt, tokenizer))["input_ids"]])
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                      eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
            end = next((j for j, t in enumerate(out) if t in stops), len(out))
            assert text == tokenizer.decode(out[:end], skip_special_tokens=True)
    assert len({tuple(texts) for texts in ours}) > 1  # the adapters answer differently


def test_cached_greedy_decoding_equals_uncached_and_padding_changes_nothing(tiny_model, factors):
    model, tokenizer = tiny_model
    prompts = ["Add 1: 3 4\nAnswer:", "Shift 2: a b c d e f g\nAnswer:", "Word 1: cat"]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])  # left padding
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    lora = FunctionalLoRA(model, LAYOUT)
    with lora.apply(factors):  # K = 3 adapters on 3 prompts each: rows 0-2 adapter 0 ...
        args = (ids.repeat(K, 1), mask.repeat(K, 1), 8, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
        cached = greedy_generate(model, *args, use_cache=True)
        uncached = greedy_generate(model, *args, use_cache=False)
        alone = [greedy_generate(model, torch.tensor([e] * K), torch.ones(K, len(e), dtype=torch.long), *args[2:])
                 for e in encoded]
    assert torch.equal(cached, uncached)
    for i, single in enumerate(alone):  # row i of adapter k sits at k * 3 + i
        assert torch.equal(cached[i::len(prompts)][:, : single.shape[1]], single)
    assert cached.shape[1] == 8


def test_decoding_stops_at_a_newline_for_short_answers(tiny_model, tiny_model_dir, factors):
    model, tokenizer = tiny_model
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert newline in newline_token_ids(tokenizer) and tokenizer(" red")["input_ids"][0] not in newline_token_ids(tokenizer)
    assert set(stop_token_ids(model, tokenizer)) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    examples, config = exact_task(["1"] * 3).test, ScoringConfig(max_new_tokens=6, progress=False)
    batch = AdapterBatch(FunctionalLoRA(model, LAYOUT), factors)
    stopped = generate_answers(model, tokenizer, examples, config, batch, stop_at_newline=True)
    running = generate_answers(model, tokenizer, examples, config, batch, stop_at_newline=False)
    for short, full in zip(sum(stopped, []), sum(running, [])):
        assert full.startswith(short) and "\n" not in short[:-1]
        assert short == full or short.endswith("\n")
    forced, _ = load_base_model(tiny_model_dir)  # a fresh copy whose head always says "\n"
    forced.lm_head = ForcedHead(forced.lm_head, newline)
    assert generate_answers(forced, tokenizer, examples, config) == [["\n"] * 3]
    (result,) = evaluate_task(forced, tokenizer, exact_task(["1"] * 3), config)
    assert [e.prediction for e in result.examples] == [""] * 3 and result.correct == 0


def test_exact_match_counts_the_answers_a_model_is_known_to_give(tiny_model):
    model, tokenizer = tiny_model
    config = ScoringConfig(max_new_tokens=4, stop_at_newline=False, progress=False)
    probe = exact_task(["x"] * 6)
    outputs = generate_answers(model, tokenizer, probe.test, config, stop_at_newline=False)[0]
    known = [extract_answer(text, "first_line") for text in outputs]  # the model's own answers
    assert all(known)
    answers = [a if i % 2 == 0 else a + " 999" for i, a in enumerate(known)]  # right on even examples only
    (result,) = evaluate_task(model, tokenizer, exact_task(answers), config)
    assert (result.correct, result.total) == (3, 6)
    assert [e.correct for e in result.examples] == [i % 2 == 0 for i in range(6)]
    assert [e.output for e in result.examples] == outputs


def test_answer_extraction_and_matching():
    assert extract_answer("Natalia sold 48 + 24 = 72 clips.\n#### 1,072\nmore", "gsm8k") == "1072"
    assert extract_answer("so 3 then 5 and finally -7.5 apples", "gsm8k") == "-7.5"
    assert extract_answer("#### no number, but 12 earlier? no: 4", "gsm8k") == "12"
    assert extract_answer("no digits at all", "gsm8k") == ""
    assert extract_answer("  20 45 \nsecond line", "first_line") == "20 45"
    assert extract_answer("\n20 45", "first_line") == ""
    assert answers_match("18.", "18") and answers_match("20.0  45", "20 45") and answers_match("1,234", "1234")
    assert not answers_match("", "") and not answers_match("abc", "ABC") and not answers_match("20 45", "20")
    assert answer_style(Task("g", "exact", test=[Example("q", "so #### 4", answer="4")])) == "gsm8k"
    assert answer_style(exact_task(["4"])) == "first_line"


def test_bad_inputs(tiny_model, factors):
    model, tokenizer = tiny_model
    with pytest.raises(EvalError, match="reduction"):
        ScoringConfig(reduction="max")
    with pytest.raises(EvalError, match="max_rows"):
        ScoringConfig(max_rows=0)
    with pytest.raises(EvalError, match="no test examples"):
        evaluate_task(model, tokenizer, Task("empty", "mc"), QUIET)
    with pytest.raises(EvalError, match="2 labels for 3 models"):
        evaluate_task(model, tokenizer, choice_task(2), QUIET, AdapterBatch(FunctionalLoRA(model, LAYOUT), factors), ["a", "b"])
    with pytest.raises(EvalError, match="scored token"):
        sequence_log_likelihoods(model, [[1, 2]], [2], pad_id=0)
