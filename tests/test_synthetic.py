"""The embedded synthetic task suites (v1, v2, v3): deterministic, correct answers, DnD's formats, held-out and
validation members inside their families."""

import json
import re
from dataclasses import replace

import pytest

from llgbm_ext.data import synthetic
from llgbm_ext.data.dnd_format import DataError, parse_options, read_examples
from llgbm_ext.data.synthetic import (
    CATEGORIES, CATEGORY_PHRASES, DEFAULT_SUITE, FAMILIES, HELD_OUT, LETTERS, SUITES, TASK_FAMILIES, WORDS, Family,
    SuiteConfig, get_synthetic_task, held_out_tasks, synthetic_suite, validation_tasks, write_suite,
)

SMALL = SuiteConfig(n_train=96, n_test=32, n_conditions=64)


@pytest.fixture(scope="module")
def suite():
    return synthetic_suite(version=1) + synthetic_suite(version=3)


def test_suite_size_kinds_and_splits(suite):
    assert len(suite) == len(TASK_FAMILIES) and len({t.name for t in suite}) == len(suite)
    assert {t.kind for t in suite} >= {"mc", "exact"}
    assert len(SUITES[1]) == 18 and DEFAULT_SUITE == 3 and [t.name for t in synthetic_suite(SMALL)] == list(SUITES[3])
    # v3 is v2 and the none family: the same names are the same tasks
    assert SUITES[3] == SUITES[2] + tuple(f"none_{p}" for p in FAMILIES["none"].params) and len(SUITES[3]) == 59
    assert held_out_tasks(3) == held_out_tasks(2) + ("none_food_body",)
    assert validation_tasks(3) == validation_tasks(2) + ("none_colour_nature",)
    for task in suite:
        assert len(task.train) == 512 and len(task.test) == 128
        assert len(task.conditions) >= 64 and set(task.conditions) <= {e.prompt for e in task.train}
        assert not {e.prompt for e in task.train} & {e.prompt for e in task.test}, task.name
        assert len({e.prompt for e in task.train + task.test}) == 640, task.name
        assert TASK_FAMILIES[task.name][0].name == task.family and task.licence


def test_v1_held_out_split_is_unchanged():
    assert HELD_OUT == held_out_tasks(1) == ("kind_3", "shift_3", "category_food", "rank_2")
    assert validation_tasks(1) == ()


@pytest.mark.parametrize("version", [2, 3])
def test_v2_and_v3_are_made_for_generalisation(version):
    families = [f for f in FAMILIES.values() if version in f.suites]
    held, validation = held_out_tasks(version), validation_tasks(version)
    training = [t for t in SUITES[version] if t not in held + validation]
    assert len(families) >= 4 and len(training) >= 40 and not set(held) & set(validation)
    for family in families:
        members = {family.task_name(p) for p in family.params}
        assert len(family.params) >= 8 and set(family.held_out) and set(family.validation)
        assert len({*family.held_out, *family.validation}) < len(family.params) - 6  # siblings remain
        for param in (*family.held_out, *family.validation):
            assert param in family.params and family.task_name(param) in members
            # every word of the parameter is asked by a training member of the family
            for word in str(param).split("_"):
                assert any(word in str(p).split("_") for p in family.params
                           if p not in family.held_out + family.validation), (family.name, param, word)


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


def _param_words(param) -> list[str]:
    """How a prompt states a parameter: ``3`` as 3 or 3rd, ``not_food`` as "not" and "food"."""
    return [CATEGORY_PHRASES.get(w, w).split()[-1] if w in CATEGORY_PHRASES else w
            for w in str(param).split("_") if w not in ("first", "last")]


def test_parameter_is_visible_in_conditions(suite):
    for family in FAMILIES.values():
        members = [t for t in suite if t.family == family.name]
        instructions = []
        for task in members:
            param = TASK_FAMILIES[task.name][1]
            asked = {_instruction(c) for c in task.conditions}
            assert len(asked) == 1, task.name
            question = asked.pop()
            assert all(re.search(rf"\b{w}(st|nd|rd|th)?\b", question) for w in _param_words(param)), task.name
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
    if family in ("word", "either", "anyof", "none"):
        negated = param.startswith("not_") or family == "none"
        categories = param.removeprefix("not_").split("_")
        hits = [i for i, word in enumerate(texts) if any(word in CATEGORIES[c] for c in categories) != negated]
        assert len(hits) == 1 and len(set(texts)) == 4
        return hits[0]
    if family == "digit":
        where, digit = param.split("_")
        hits = [i for i, number in enumerate(texts) if number[0 if where == "first" else -1] == digit]
        assert len(hits) == 1 and all(10 <= int(x) <= 99 for x in texts)
        return hits[0]
    raise AssertionError(f"no check for family {family}")


def test_answers_follow_from_prompts():
    tasks = synthetic_suite(SMALL, version=1) + synthetic_suite(SMALL, version=3)
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
    for task in synthetic_suite(SMALL, version=1) + synthetic_suite(SMALL, version=3):
        longest = max(task.train, key=lambda e: len(e.prompt) + len(e.response))
        chat = [{"role": "system", "content": longest.system}, {"role": "user", "content": longest.prompt},
                {"role": "assistant", "content": longest.response}]
        assert len(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]) <= 64, task.name


def test_bad_requests_raise_data_error(monkeypatch):
    with pytest.raises(DataError, match="unknown synthetic task 'kind_9'"):
        get_synthetic_task("kind_9")
    with pytest.raises(DataError, match="n_conditions=100 exceeds n_train=50"):
        get_synthetic_task("kind_1", SuiteConfig(n_train=50, n_conditions=100))
    with pytest.raises(DataError, match="unknown synthetic suite version 4"):
        synthetic_suite(version=4)
    constant = Family("constant", "exact", (1,), lambda k, rng: synthetic._exact("same", "same"), (2,))
    monkeypatch.setitem(TASK_FAMILIES, "constant_1", (constant, 1))
    with pytest.raises(DataError, match="constant_1: fewer than 3 distinct prompts"):
        get_synthetic_task("constant_1", SuiteConfig(n_train=2, n_test=1, n_conditions=1))


def test_task_names_expand_to_suites_and_families():
    from llgbm_ext.teachers.config import TeacherError
    from llgbm_ext.teachers.tasks import expand_task_names

    assert expand_task_names(["all"], None) == list(SUITES[DEFAULT_SUITE]) == list(SUITES[3])
    assert expand_task_names(["v1"], None) == list(SUITES[1])
    assert expand_task_names(["word", "kind_3", "word_food"], None) == [
        *(f"word_{p}" for p in FAMILIES["word"].params), "kind_3"]
    assert expand_task_names(["v3"], None) == list(SUITES[3])
    with pytest.raises(TeacherError, match="unknown synthetic task 'v4'.*v1, v2, v3, a family"):
        expand_task_names(["v4"], None)
