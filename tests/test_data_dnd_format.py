"""DnD task files: answers parsed from prompts and responses, task-name mapping, one-line schema errors."""

import json

import pytest

from llgbm_ext.data.dnd_format import (
    BOOL_CHOICES,
    INSTRUCTION_BRACKETED,
    INSTRUCTION_OBQA_TEST,
    INSTRUCTION_OBQA_TRAIN,
    TASKS,
    DataError,
    load_task,
    parse_options,
    read_examples,
    read_records,
    system_prompt,
    to_example,
    write_examples,
)
from llgbm_ext.data.records import Example

GOOD_LINE = '{"prompt": "p", "response": "r"}'
OPTIONS = ["a leg muscle relaxing", "a bacterial population", "viral particles", "digested carbohydrates"]


def _record(prompt, response, system="sys"):
    return {"prompt": prompt, "response": response, "system": system}


def _mc_prompt(question, options, labels="ABCD"):
    return question + "\n" + "\n".join(f"{label}: {text}" for label, text in zip(labels, options))


def _write(path, records):
    path.write_text(json.dumps(records, indent=4), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "prompt",
    [
        _mc_prompt("Which factor causes a fever?", OPTIONS),  # ARC
        _mc_prompt("Which factor causes a fever?", OPTIONS, labels="1234"),  # ARC's numbered items
        _mc_prompt("The sun is responsible for", OPTIONS) + INSTRUCTION_OBQA_TRAIN,
        _mc_prompt("The sun is responsible for", OPTIONS) + INSTRUCTION_OBQA_TEST,  # "." added after option D
        "Which solution is most appropriate for finishing the following sentence? Sentence:A man sits. He"
        "Choices:" + _mc_prompt("", OPTIONS)[1:],  # HellaSwag glues option A to the sentence
    ],
)
def test_multiple_choice_options_and_gold(prompt):
    gold_label = "2" if "\n1: " in prompt else "B"
    example = to_example(_record(prompt, f"[{gold_label}]"), "mc")
    assert example.choices == tuple(OPTIONS)
    assert example.answer == 1
    assert example.prompt == prompt and example.response == f"[{gold_label}]"


def test_obqa_test_keeps_an_option_that_ends_with_a_full_stop():
    options = OPTIONS[:3] + ["the sun."]
    example = to_example(_record(_mc_prompt("The sun is", options) + INSTRUCTION_OBQA_TEST, "[D]"), "mc")
    assert example.choices == tuple(options) and example.answer == 3


def test_winogrande_bracketed_instruction_and_two_options():
    prompt = "Sarah was a better surgeon than Maria so _ got the easier cases.\nA: Sarah\nB: Maria"
    prompt += INSTRUCTION_BRACKETED
    example = to_example(_record(prompt, "[B]"), "mc")
    assert example.choices == ("Sarah", "Maria") and example.answer == 1


def test_options_inside_the_question_are_not_the_option_block():
    prompt = "Pick one.\nA: this line is part of the question\n\nWhich is red?\nA: apple\nB: sky\nC: grass"
    assert parse_options(prompt) == (("A", "B", "C"), ("apple", "sky", "grass"))


@pytest.mark.parametrize(
    "prompt, response",
    [("no options at all", "[A]"), (_mc_prompt("q", OPTIONS), "[E]"), (_mc_prompt("q", OPTIONS), "maybe B?")],
)
def test_unparseable_multiple_choice_keeps_the_record(prompt, response):
    example = to_example(_record(prompt, response), "mc")
    assert example.answer is None
    assert example.prompt == prompt


def test_boolq_and_gsm8k_answers():
    assert to_example(_record("is the sky blue?", "[True]"), "bool").answer == BOOL_CHOICES.index("True")
    false = to_example(_record("is grass red?", "[False]"), "bool")
    assert false.choices == BOOL_CHOICES and false.answer == BOOL_CHOICES.index("False")
    gsm = to_example({"prompt": "Janet has 16 eggs ...", "response": "16 - 3 = 13\n#### 1,318"}, "exact")
    assert gsm.answer == "1318" and gsm.system == "" and gsm.choices is None
    assert to_example({"prompt": "p", "response": "no final answer"}, "exact").answer is None


def _task_dir(tmp_path, files):
    for name, records in files.items():
        _write(tmp_path / name, records)
    return tmp_path


def test_task_names_map_to_dnd_files(tmp_path):
    mc = [_record(_mc_prompt(f"q{i}", OPTIONS), "[C]") for i in range(3)]
    boolq = [_record("is it?", "[False]")]
    _task_dir(tmp_path, {
        "ARC-e_train.json": mc, "ARC-e_test.json": mc[:2],
        "BoolQ_train.json": boolq * 4, "BoolQ_validation.json": boolq * 2, "BoolQ_test.json": boolq * 9,
        "GSM8K.json": [{"prompt": "2+2?", "response": "#### 4"}],
    })
    arc = load_task(tmp_path, "arc_e")
    assert (arc.name, arc.kind, len(arc.train), len(arc.test)) == ("arc_e", "mc", 3, 2)
    assert arc.conditions == [e.prompt for e in arc.train]
    assert all(e.answer == 2 for e in arc.train + arc.test)
    assert arc.licence == TASKS["arc_e"].licence
    assert len(load_task(tmp_path, "ARC-e").train) == 3  # DnD's own names work too
    boolq_task = load_task(tmp_path, "boolq")
    assert len(boolq_task.test) == 2  # DnD reads BoolQ's test split from BoolQ_validation.json
    gsm = load_task(tmp_path, "gsm8k", splits=("test",))
    assert gsm.test[0].answer == "4" and gsm.train == [] and gsm.conditions == []
    with pytest.raises(DataError, match=r"no train file \(looked for GSM8K_train.json, GSM8K_train.jsonl\)"):
        load_task(tmp_path, "gsm8k")
    with pytest.raises(DataError, match="unknown task 'arc'.*arc_e, arc_c, boolq"):
        load_task(tmp_path, "arc")


def test_all_task_names_resolve_to_dnd_file_names():
    expected = {"arc_e": "ARC-e", "arc_c": "ARC-c", "boolq": "BoolQ", "gsm8k": "GSM8K", "hellaswag": "HellaSwag",
                "obqa": "OBQA", "piqa": "PIQA", "winogrande": "WinoGrande"}
    assert {name: spec.dnd_name for name, spec in TASKS.items()} == expected
    validation_tests = {name for name, spec in TASKS.items() if spec.test_file.endswith("_validation")}
    assert validation_tests == {"boolq", "hellaswag", "winogrande"}
    assert TASKS["gsm8k"].test_file == "GSM8K"


def test_jsonl_files_and_round_trip(tmp_path):
    examples = [
        Example(_mc_prompt("Which?", OPTIONS), "[D]", system_prompt(TASKS["obqa"]), tuple(OPTIONS), 3),
        Example("Ünïcode question — ok?", "[A]", "", None, None),
    ]
    write_examples(tmp_path / "out.json", examples)
    text = (tmp_path / "out.json").read_text(encoding="utf-8")
    assert "Ünïcode" in text and '\n    {\n        "prompt"' in text and not text.endswith("\n")
    assert "system" not in json.loads(text)[1]  # an empty system prompt is left out, as in DnD's GSM8K.json
    assert read_examples(tmp_path / "out.json", "mc") == examples
    lines = "\n".join(json.dumps(e.to_dnd()) for e in examples) + "\n\n"
    (tmp_path / "OBQA_train.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "OBQA_test.jsonl").write_text(lines, encoding="utf-8")
    task = load_task(tmp_path, "obqa")
    assert task.train == examples and task.test == examples


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.json", "", r"a\.json: empty file"),
        ("a.json", '{"prompt": "p", "response": "r"}', r"a\.json: expected a JSON array of records, got dict"),
        ("a.json", "[]", r"a\.json: no records"),
        ("a.json", '[{"prompt": "p", "response": "r"},', r"a\.json: invalid JSON \(.* at line 1 column \d+\)"),
        ("a.json", '[{"prompt": "p", "response": "r"}, {"response": "[A]"}]', r"a\.json: record 1: missing 'prompt'"),
        ("a.json", '[{"prompt": "p", "response": "r"}, {"prompt": "p"}]', r"a\.json: record 1: missing 'response'"),
        ("a.json", '[{"prompt": "p", "response": 3}]', r"a\.json: record 0: 'response' must be a string, got int"),
        ("a.json", '[{"prompt": "p", "response": "r", "system": null}]', r"'system' must be a string, got NoneType"),
        ("a.json", '[["p", "r"]]', r"a\.json: record 0: expected an object with 'prompt' and 'response', got list"),
        ("a.jsonl", GOOD_LINE + '\n\n{"prompt": "p",\n', r"a\.jsonl: line 3 \(record 1\): invalid JSON"),
        ("a.jsonl", GOOD_LINE + '\n{"prompt": 1, "response": "r"}', r"jsonl: line 2 \(record 1\): 'prompt' must be a str"),
    ],
)
def test_schema_errors_name_file_and_record(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as error:
        read_records(tmp_path / name)
    assert "\n" not in str(error.value)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "absent.json")
    (tmp_path / "latin1.json").write_bytes('[{"prompt": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.json: not UTF-8"):
        read_records(tmp_path / "latin1.json")
    with pytest.raises(DataError, match="no such data directory"):
        load_task(tmp_path / "nowhere", "arc_e")
    unanswered = _write(tmp_path / "WinoGrande_test.json", [{"prompt": "p", "system": "s"}])  # as DnD's
    assert read_records(unanswered, require_response=False) == [{"prompt": "p", "system": "s"}]
