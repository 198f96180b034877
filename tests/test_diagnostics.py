"""Diagnostics: recovery on left-out tasks during training (without changing the trained weights) and the
nearest teacher of every generated adapter in comparisons."""

import json
import math

import pytest
import torch
from fake_teachers import write_fake_teachers
from safetensors.torch import load_file

from llgbm_ext.config import load_config
from llgbm_ext.errors import LLGBMError
from llgbm_ext.training import Trainer, TrainingConfig

FAST = ["encoder.kind=base-model", "encoder.model=tiny", "generator.embed_dim=128", "device=cpu",
        "optim.warmup_steps=2", "loss.noise=1e-3", "batch_size=2", "save_every=5", "steps=5"]
TASKS = ("word_food", "word_colour", "word_not_animal")  # synthetic names: the evaluation has their test splits


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return write_fake_teachers(tmp_path_factory.mktemp("teachers"), tasks=TASKS)


def _run(teachers, out, *overrides):
    cfg = load_config(TrainingConfig, None, [f"data.teachers={teachers}", f"out_dir={out}",
                                             "data.held_out=[word_not_animal]", *FAST, *overrides])
    trainer = Trainer(cfg, progress=False).setup()
    trainer.train()
    trainer.cleanup()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["weight_only", "multitask"])
def test_eval_logs_recovery_and_leaves_training_unchanged(mode, teachers, tmp_path):
    plain = _run(teachers, tmp_path / "plain", f"loss.mode={mode}")
    evaluated = _run(teachers, tmp_path / "eval", f"loss.mode={mode}", "eval.every=2", "eval.tasks=[word_not_animal]",
                     "eval.limit=8")
    a = load_file(str(tmp_path / "plain" / "checkpoints" / "step_0000005" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "eval" / "checkpoints" / "step_0000005" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights
    assert [r for r in evaluated if "loss" in r] == [{**r, "step_time": e["step_time"]} for r, e in
                                                     zip(plain, (r for r in evaluated if "loss" in r))]
    rows = [r for r in evaluated if "val/recovery/mean" in r]
    assert [r["step"] for r in rows] == [1, 3, 4]  # after steps 2 and 4, and after the last
    reference = json.loads((tmp_path / "eval" / "eval_reference.json").read_text())["tasks"]["word_not_animal"]
    assert reference["examples"] == 8
    for row in rows:
        accuracy, gain = row["val/accuracy/word_not_animal"], reference["teacher"] - reference["base"]
        assert 0 <= accuracy <= 1
        if abs(gain) * 8 < 1:
            assert row["val/recovery/word_not_animal"] is None
        else:
            assert math.isclose(row["val/recovery/word_not_animal"], (accuracy - reference["base"]) / gain)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "eval" / "recovery_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "plain" / "recovery_curves.png").exists()


def test_eval_scores_like_the_comparison(teachers, tmp_path):
    """The cached reference is the base model's and the last teacher snapshot's accuracy, scored as comparisons do."""
    from llgbm_ext.data.synthetic import get_synthetic_task
    from llgbm_ext.data.teacher_set import load_teacher_set
    from llgbm_ext.delta.deltas import load_teacher_factors
    from llgbm_ext.delta.functional import FunctionalLoRA
    from llgbm_ext.eval.scoring import AdapterBatch, ScoringConfig, evaluate_task
    from llgbm_ext.models.registry import load_base_model, resolve_base_model
    from llgbm_ext.teachers.multitask import task_format

    _run(teachers, tmp_path, "loss.mode=weight_only", "eval.every=5", "eval.tasks=[word_not_animal]", "eval.limit=16")
    reference = json.loads((tmp_path / "eval_reference.json").read_text())["tasks"]["word_not_animal"]
    model, tokenizer = load_base_model(resolve_base_model("tiny"))
    tset = load_teacher_set(teachers)
    last = max((e for e in tset.entries if e.task == "word_not_animal"), key=lambda e: e.step).path
    factors = load_teacher_factors([last], tset.layout, torch.float32, "cpu")
    scoring = ScoringConfig(fmt=task_format(tset, "word_not_animal"), progress=False)
    task = get_synthetic_task("word_not_animal")
    base = evaluate_task(model, tokenizer, task, scoring, limit=16)[0].accuracy
    teacher = evaluate_task(model, tokenizer, task, scoring, AdapterBatch(FunctionalLoRA(model, tset.layout), factors),
                            limit=16)[0].accuracy
    assert (reference["base"], reference["teacher"]) == (base, teacher)


@pytest.mark.parametrize("tasks, message", [("[word_food]", "is a training task of this run"),
                                            ("[word_nope]", "has no teachers")])
def test_eval_refuses_training_and_unknown_tasks(tasks, message, teachers, tmp_path):
    with pytest.raises(LLGBMError, match=message):
        _run(teachers, tmp_path, "loss.mode=weight_only", "eval.every=2", f"eval.tasks={tasks}")


def test_eval_settings_leave_the_resume_digest_alone(teachers):
    from llgbm_ext.training.trainer import config_digest, resume_settings

    cfgs = [load_config(TrainingConfig, None, [f"data.teachers={teachers}", *extra])
            for extra in ([], ["eval.every=100", "eval.tasks=[word_not_animal]", "eval.limit=8"])]
    assert config_digest(cfgs[0]) == config_digest(cfgs[1]) and resume_settings(cfgs[0]) == resume_settings(cfgs[1])
    with pytest.raises(LLGBMError, match="eval.every"):
        load_config(TrainingConfig, None, ["eval.every=-1"])


def test_comparison_names_the_nearest_teacher_and_logs_validation_recovery(teachers, tmp_path):
    from llgbm_ext.experiments.comparison import (
        ComparisonConfig,
        Variant,
        run_comparison,
    )

    cfg = ComparisonConfig(teachers=str(teachers), overrides=(*FAST, "eval.every=2", "eval.limit=4"),
                           variants=(Variant("weight_only", ("loss.mode=weight_only",)),),
                           validation=("word_not_animal",),
                           eval_limit=4, samples=2, controls=(), multitask_lora=False, out_dir=str(tmp_path))
    rows, _ = run_comparison(cfg, progress=False)
    teacher = {r["task"]: r["nearest"] for r in rows if r["model"] == "teacher"}
    assert teacher == {"word_not_animal": "word_not_animal", "word_food": "word_food"}  # a teacher is nearest its task
    assert all(r["nearest"] in TASKS for r in rows if r["model"] == "weight_only")
    csv = (tmp_path / "results.csv").read_text().splitlines()
    column = csv[0].split(",").index("nearest")
    assert {line.split(",")[column] for line in csv[1:] if line.startswith("teacher,")} == set(teacher)
    report = (tmp_path / "report.md").read_text()
    assert "| teacher | **word_not_animal** |" in report
    metrics = (tmp_path / "runs" / "weight_only" / "seed0" / "metrics.jsonl").read_text()
    assert "val/recovery/word_not_animal" in metrics  # the comparison evaluates its validation split during training


def test_nearest_table_takes_the_most_frequent_task_over_seeds():
    from llgbm_ext.experiments.comparison import most_frequent, nearest_table

    rows = [{"model": "m", "seed": s, "task": "a", "split": "validation", "nearest": n}
            for s, n in enumerate(["b", "a", "b"])]
    rows += [{"model": "m", "seed": 0, "task": "c", "split": "validation", "nearest": "c"}]
    assert nearest_table(rows, "validation").splitlines()[2] == "| m | b | **c** |"
    assert most_frequent(["x", "y", "y", "x"]) == "x" and most_frequent(["x", "y", "y"]) == "y"


def test_recovery_is_the_share_of_the_teachers_gain():
    from llgbm_ext.eval.uncertainty import recovery

    assert recovery(0.5, 0.25, 0.75, 8) == 0.5 and recovery(0.25, 0.25, 0.75, 8) == 0.0
    assert recovery(0.0, 0.5, 0.25, 8) == 2.0  # a teacher below the base model: the sign follows its gain
    assert recovery(0.9, 0.5, 0.5 + 1 / 16, 8) is None  # within one of 8 test examples: nothing to recover
