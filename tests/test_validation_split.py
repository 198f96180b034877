"""Teachers scored on a validation slice of the training split (``validation``): held out of training, the same
slice every run, recorded in the manifest, and left out of the multitask LoRA's data too."""

import json

import pytest

from llgbm_ext.cli import build_parser
from llgbm_ext.cli.teachers import config_from_args
from llgbm_ext.data.synthetic import get_synthetic_task
from llgbm_ext.data.teacher_set import load_teacher_set
from llgbm_ext.teachers.config import TeacherConfig, TeacherError
from llgbm_ext.teachers.multitask import training_task
from llgbm_ext.teachers.pipeline import train_teachers
from llgbm_ext.teachers.tasks import validation_split

TASK = "category_food"


def test_the_slice_is_held_out_fixed_and_leaves_the_rest_in_order():
    task = get_synthetic_task(TASK)
    split = validation_split(task, 20)
    assert len(split.test) == 20 and len(split.train) == len(task.train) - 20
    assert sorted(map(task.train.index, split.test + split.train)) == list(range(len(task.train)))  # a partition
    assert [task.train.index(e) for e in split.train] == sorted(task.train.index(e) for e in split.train)
    assert validation_split(get_synthetic_task(TASK), 20).test == split.test  # the same draw every time
    assert split.test != task.train[:20]  # a random draw, not the first examples
    kept = {e.prompt for e in split.train}
    assert split.conditions and all(c in kept for c in split.conditions)
    assert validation_split(task, 0) is task
    with pytest.raises(TeacherError, match=f"validation {len(task.train)}: task {TASK} has only"):
        validation_split(task, len(task.train))


def test_a_run_scores_the_slice_and_records_it(tiny_model_dir, tmp_path):
    config = TeacherConfig(base_model=str(tiny_model_dir), tasks=(TASK,), warmup_steps=2, snapshot_every=1, snapshots=1,
                           batch_size=2, eval_limit=None, validation=16, probes=None)
    assert config.digest() != TeacherConfig(**{**config.to_dict(), "validation": 0}).digest()
    report = train_teachers(config, tmp_path / "t", progress=False)
    assert report.rows[0]["eval_examples"] == 16
    info = json.loads((tmp_path / "t" / "manifest.json").read_text())["tasks"][TASK]
    held = {e.prompt for e in validation_split(get_synthetic_task(TASK), 16).test}
    assert info["validation"] == 16 and info["test_examples"] == 16
    assert info["train_examples"] == len(get_synthetic_task(TASK).train) - 16
    inputs = json.loads((tmp_path / "t" / info["train_inputs"]).read_text())["inputs"]  # the KL signal's inputs
    kept = {e.prompt for e in validation_split(get_synthetic_task(TASK), 16).train}
    assert any(prompt in inputs[0]["context"] for prompt in kept)  # contexts contain their prompts ...
    assert not any(prompt in i["context"] for i in inputs for prompt in held)  # ... and none is held out
    trained = training_task(TASK, None, load_teacher_set(tmp_path / "t").tasks[TASK]["validation"])
    assert not held & {e.prompt for e in trained.train}  # the multitask LoRA does not train on it either


def test_cli_takes_validation():
    args = build_parser().parse_args(["teachers", "--base-model", "tiny", "--synthetic", "--tasks", TASK, "--out", "x",
                                      "--validation", "300"])
    assert config_from_args(args).validation == 300
