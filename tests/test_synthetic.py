"""The embedded synthetic task suite: deterministic, correct answers, DnD's formats, one held-out member per family."""

import json
import re
from dataclasses import replace

import pytest

from llgbm_ext.data import synthetic
from llgbm_ext.data.dnd_format import DataError, parse_options, read_examples
from llgbm_ext.data.synthetic import (
    CATEGORIES, FAMILIES, HELD_OUT, LETTERS, TASK_FAMILIES, WORDS, Family, SuiteConfig,
    get_synthetic_task, synthetic_suite, write_suite,
)

SMALL = SuiteConfig(n_train=96, n_test=32, n_conditions=64)


@pytest.fixture(scope="module")
def suite():
    return synthetic_suite()


def test_suite_size_kinds_and_splits(suite):
    assert len(suite) >= 12 and len({t.name for t in suite}) == len(suite)
    assert {t.kind for t in suite} >= {"mc", "exact"}
    for task in suite:
        assert len(task.train) == 512 and len(task.test) == 128
        assert len(task.conditions) >= 64 and set(task.conditions) <= {e.prompt for e in task.train}
        assert not {e.prompt for e in task.train} & {e.prompt for e in task.test}, task.name
        assert len({e.prompt for e in task.train + task.test}) == 640, task.name
        assert TASK_FAMILIES[task.name][0].name == task.family and task.licence


def test_families_and_held_out_split():
    assert len(FAMILIES) >= 4
    for family in FAMILIES.values():
        assert len(family.params) >= 3 and family.held_out in family.params
    assert len(HELD_OUT) == len(FAMILIES)
    held = {TASK_FAMILIES[name][0].name: name for name in HELD_OUT}
    assert set(held) == set(FAMILIES)  # exactly one member held out per family, siblings remain
    for name in HELD_OUT:
        family, param = TASK_FAMILIES[name]
        assert sum(p != param for p in family.params) >= 2


def test_same_seed_same_tasks_other_seed_other_tasks():
    a, b = synthetic_suite(SMALL), synthetic_suite(SMALL)
    assert a == b
    c = synthetic_suite(replace(SMALL, seed=1))
    for x, y in zip(a, c):
        assert x.name == y.name and x.train != y.train
    # a task does not depend on which other tasks are built, nor on the split sizes asked before it
    assert get_synthetic_task(a[5].name, SMALL) == a[5]


def _instruction(prompt: str) -> str:
    """The text before the first ":" or "?" (what a task asks, without its items)."""
    return re.split(r"[:?]", prompt, maxsplit=1)[0]


def test_parameter_is_visible_in_conditions(suite):
    for family in FAMILIES.values():
        members = [t for t in suite if t.family == family.name]
        instructions = []
        for task in members:
            param = TASK_FAMILIES[task.name][1]
            asked = {_instruction(c) for c in task.conditions}
            assert len(asked) == 1 and re.search(rf"\b{param}(st|nd|rd|th)?\b", asked.pop()), task.name
            instructions.append(_instruction(task.conditions[0]))
        assert len(set(instructions)) == len(members)  # siblings differ exactly in what they ask


def _expected_answer(family: str, param, example):
    """The answer recomputed from the prompt text alone."""
    if family in ("kind", "shift"):
        items = example.prompt.split(":", 1)[1].split()
        if family == "kind":
            return next(c for c, words in CATEGORIES.items() if items[param - 1] in words)
        return " ".join(LETTERS[(LETTERS.index(c) + param) % 26] for c in items)
    labels, texts = parse_options(example.prompt)
    assert texts == example.choices and labels == ("A", "B", "C", "D")
    if family == "category":
        hits = [i for i, word in enumerate(texts) if word in CATEGORIES[param]]
        assert len(hits) == 1
        return hits[0]
    if family == "rank":
        numbers = [int(x) for x in texts]
        assert len(set(numbers)) == len(numbers)
        return numbers.index(sorted(numbers)[param - 1])
    raise AssertionError(f"no check for family {family}")


def test_answers_follow_from_prompts():
    tasks = synthetic_suite(SMALL)
    assert {t.family for t in tasks} == set(FAMILIES)
    for task in tasks:
        family, param = TASK_FAMILIES[task.name]
        for example in task.train + task.test:
            expected = _expected_answer(family.name, param, example)
            assert example.answer == expected, (task.name, example)
            if task.kind == "mc":
                assert example.response == f"[{'ABCD'[expected]}]" and len(example.choices) == 4
            else:
                assert example.response == expected and example.choices is None
            assert example.system == synthetic.SYSTEM[task.kind]


def test_gold_positions_are_balanced(suite):
    for task in suite:
        if task.kind == "mc":
            counts = [sum(e.answer == i for e in task.train) for i in range(4)]
            assert min(counts) > 512 / 4 * 0.7, (task.name, counts)


def test_dnd_json_round_trip(tmp_path):
    tasks = synthetic_suite(SMALL)[:3] + [get_synthetic_task(HELD_OUT[-1], SMALL)]
    paths = write_suite(tmp_path, tasks)
    assert sorted(p.name for p in paths) == sorted(f"{t.name}_{s}.json" for t in tasks for s in ("train", "test"))
    for task in tasks:
        for split in ("train", "test"):
            path = tmp_path / f"{task.name}_{split}.json"
            records = json.loads(path.read_text())
            assert records == [e.to_dnd() for e in getattr(task, split)]
            assert all(set(r) == {"prompt", "response", "system"} for r in records)
            if task.kind == "mc":  # DnD's loader recovers options and gold index from the text alone
                back = read_examples(path, "mc")
                assert [(e.choices, e.answer) for e in back] == [(e.choices, e.answer) for e in getattr(task, split)]
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary files


def test_suite_fits_the_tiny_tokenizer(tiny_model):
    _, tokenizer = tiny_model
    for text in [*WORDS, *CATEGORIES, *LETTERS]:  # inside a list (after a space) and at the start of an answer
        assert len(tokenizer(" " + text).input_ids) == 1 and len(tokenizer(text).input_ids) == 1, text
    for task in synthetic_suite(SMALL):
        longest = max(task.train, key=lambda e: len(e.prompt) + len(e.response))
        chat = [{"role": "system", "content": longest.system}, {"role": "user", "content": longest.prompt},
                {"role": "assistant", "content": longest.response}]
        assert len(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]) <= 64, task.name


def test_bad_requests_raise_data_error(monkeypatch):
    with pytest.raises(DataError, match="unknown synthetic task 'kind_9'"):
        get_synthetic_task("kind_9")
    with pytest.raises(DataError, match="n_conditions=100 exceeds n_train=50"):
        get_synthetic_task("kind_1", SuiteConfig(n_train=50, n_conditions=100))
    constant = Family("constant", "exact", (1,), 1, lambda k, rng: synthetic._exact("same", "same"))
    monkeypatch.setitem(TASK_FAMILIES, "constant_1", (constant, 1))
    with pytest.raises(DataError, match="constant_1: fewer than 3 distinct prompts"):
        get_synthetic_task("constant_1", SuiteConfig(n_train=2, n_test=1, n_conditions=1))
