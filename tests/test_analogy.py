"""Adapter arithmetic (eval/analogy.py, ``llgbm analogy``): the combinations' weights, the scoring of
combined teachers, and bad input."""

import json

import pytest
import torch
from fake_teachers import write_fake_teachers

from llgbm_ext.cli import main
from llgbm_ext.data.teacher_set import load_teacher_set
from llgbm_ext.eval.analogy import combinations, combine, last_snapshot_tokens, reflection, score_analogies, translation
from llgbm_ext.lora.adapters import save_peft_adapter
from llgbm_ext.lora.factors import state_dict_from_factors
from llgbm_ext.lora.tokens import detokenize

TASKS = ("word_colour", "word_not_colour", "word_food", "word_not_food")


def test_translation_and_reflection_weights():
    pairs = [("c", "not_c"), ("b", "not_b")]
    assert translation("x", pairs) == {"x": 1.0, "not_c": 0.5, "c": -0.5, "not_b": 0.5, "b": -0.5}
    assert reflection("x", pairs) == {"x": -1.0, "c": 0.5, "not_c": 0.5, "b": 0.5, "not_b": 0.5}
    assert translation("x", [("x", "y")]) == {"y": 1.0}  # terms of one task add up
    for combo in combinations("x", pairs):
        assert sum(combo.weights.values()) == pytest.approx(1.0), combo.name  # affine: the weights sum to 1
    assert [c.name for c in combinations("x", pairs)][:2] == ["translation", "reflection"]
    assert len(combinations("x", pairs[:1])) == 2


@pytest.fixture(scope="module")
def reflected(tmp_path_factory):
    """Fake teachers whose word_not_food is, by construction, the reflection of word_food through one pair."""
    root = write_fake_teachers(tmp_path_factory.mktemp("teachers"), tasks=TASKS)
    teachers = load_teacher_set(root)
    tokens = last_snapshot_tokens(teachers, TASKS)
    weights = reflection("word_food", [("word_colour", "word_not_colour")])
    factors = detokenize(combine(tokens, weights), teachers.layout)
    last = max((e for e in teachers.entries if e.task == "word_not_food"), key=lambda e: e.step)
    save_peft_adapter(state_dict_from_factors(factors, teachers.layout), last.path, teachers.layout,
                      base_model_name_or_path="tiny")
    return root


def test_the_reflection_of_a_reflected_teacher_scores_as_the_teacher(reflected):
    teachers = load_teacher_set(reflected)
    rows = score_analogies(teachers, "word_not_food", "word_food", [("word_colour", "word_not_colour")], limit=24)
    by_name = {r["adapter"]: r for r in rows}
    assert list(by_name) == ["base", "teacher", "source", "translation", "reflection"]
    assert by_name["reflection"]["accuracy"] == by_name["teacher"]["accuracy"]
    assert by_name["translation"]["accuracy"] != by_name["teacher"]["accuracy"]  # the rows do tell them apart
    assert by_name["base"]["recovery"] == 0.0 and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert by_name["teacher"]["recovery"] == 1.0  # the teacher differs from the base model here: recovery is defined
    # a combination of one teacher is that teacher: its tokens decode to its own factors
    tokens = last_snapshot_tokens(teachers, ["word_food"])
    from llgbm_ext.delta.deltas import load_teacher_factors

    last = max((e for e in teachers.entries if e.task == "word_food"), key=lambda e: e.step)
    own = load_teacher_factors([last.path], teachers.layout, torch.float32, "cpu")
    decoded = detokenize(combine(tokens, {"word_food": 1.0})[None], teachers.layout)
    for proj in own:
        for j in (0, 1):
            assert torch.allclose(decoded[proj][j], own[proj][j], atol=1e-5)


def test_cli_prints_and_writes_the_rows(reflected, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["analogy", "--teachers", str(reflected), "--target", "word_not_food", "--source", "word_food",
                 "--pairs", "word_colour:word_not_colour", "--limit", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| reflection | -word_food + word_colour + word_not_colour |" in printed
    assert [r["adapter"] for r in json.loads(out.read_text())] == ["base", "teacher", "source", "translation",
                                                                   "reflection"]


@pytest.mark.parametrize("pairs, message", [
    (["word_colour"], "--pairs: 'word_colour' is not A:B"),
    (["word_colour:word_not_body"], "no teachers of task(s) word_not_body"),
])
def test_bad_pairs_end_with_one_line(reflected, pairs, message, capsys):
    assert main(["analogy", "--teachers", str(reflected), "--target", "word_not_food", "--source", "word_food",
                 "--pairs", *pairs]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
