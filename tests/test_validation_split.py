"""Teachers scored on a validation slice of the training split (``validation``): held out of training, the same
slice every run, recorded in the manifest, and left out of the multitask LoRA's data too. With
``validation_from="dataset"``, a data set's own validation split where it has one (training keeps every example)."""

import json

import pytest

from llgbm_ext.cli import build_parser
from llgbm_ext.cli.teachers import config_from_args
from llgbm_ext.data.dnd_format import DataError, split_paths, task_spec, write_examples
from llgbm_ext.data.records import Example
from llgbm_ext.data.synthetic import get_synthetic_task
from llgbm_ext.data.teacher_set import load_teacher_set
from llgbm_ext.teachers.config import TeacherConfig, TeacherError
from llgbm_ext.teachers.multitask import training_task
from llgbm_ext.teachers.pipeline import train_teachers
from llgbm_ext.teachers.tasks import load_teacher_tasks, validation_split

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
    assert config_from_args(args).validation == 300 and config_from_args(args).validation_from == "train"
    args = build_parser().parse_args(["teachers", "--base-model", "tiny", "--synthetic", "--tasks", TASK, "--out", "x",
                                      "--validation", "300", "--validation-from", "dataset"])
    assert config_from_args(args).validation_from == "dataset"


def test_only_tasks_whose_test_split_is_not_their_validation_split_have_one(tmp_path):
    assert [p.name for p in split_paths(tmp_path, task_spec("obqa"), "validation")] == [
        "OBQA_validation.json", "OBQA_validation.jsonl"]
    assert split_paths(tmp_path, task_spec("boolq"), "validation") == []  # BoolQ_validation.json is its test split
    with pytest.raises(DataError, match="unknown split 'dev': use one of train, test, validation"):
        split_paths(tmp_path, task_spec("obqa"), "dev")


def _mc(i: int, tag: str) -> Example:
    return Example(f"{tag} question {i}\nA: yes {i}\nB: no {i}", "[A]", "pick", choices=(f"yes {i}", f"no {i}"),
                   answer=0)


def test_dataset_validation_scores_the_own_split_and_keeps_training_whole(tmp_path):
    for stem, tag, n in (("OBQA_train", "train", 30), ("OBQA_validation", "val", 12), ("OBQA_test", "test", 9),
                         ("PIQA_train", "ptrain", 30), ("PIQA_test", "ptest", 9)):
        write_examples(tmp_path / f"{stem}.json", [_mc(i, tag) for i in range(n)])
    obqa, piqa = load_teacher_tasks(("obqa", "piqa"), str(tmp_path), 8, validation=10, validation_from="dataset")
    assert obqa.task.test == [_mc(i, "val") for i in range(10)]  # the first 10 of its own validation split
    assert obqa.task.train == [_mc(i, "train") for i in range(30)]  # training keeps every example
    assert (obqa.held_out, obqa.scored) == (0, "validation split")
    assert len(piqa.task.train) == 20 and (piqa.held_out, piqa.scored) == (10, "train slice")  # PIQA has none
    assert all(e.prompt.startswith("ptrain") for e in piqa.task.test)
    sliced, = load_teacher_tasks(("obqa",), str(tmp_path), 8, validation=10)  # the default: a slice of train
    assert len(sliced.task.train) == 20 and sliced.scored == "train slice"
    tested, = load_teacher_tasks(("obqa",), str(tmp_path), 8, validation_from="dataset")  # no validation asked for
    assert tested.task.test == [_mc(i, "test") for i in range(9)] and tested.scored == "test"


def test_validation_from_is_checked_and_named_in_the_digest_only_when_used():
    base = TeacherConfig(base_model="tiny", tasks=(TASK,), validation=16)
    assert "validation_from" not in base.training_digest()  # runs from before it existed keep their digest
    assert TeacherConfig(**{**base.to_dict(), "validation_from": "dataset"}).digest() != base.digest()
    with pytest.raises(TeacherError, match="validation_from must be train or dataset, got 'test'"):
        TeacherConfig(base_model="tiny", tasks=(TASK,), validation_from="test")
