"""Per-task objectives (``task_objectives``: e.g. choice for one task, lm for the rest): groups of one objective,
adapters equal to those of runs with one objective, a multitask LoRA whose loss is the tasks' share of each
objective's loss, and clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llgbm_ext.cli import build_parser
from llgbm_ext.cli.teachers import config_from_args
from llgbm_ext.data.teacher_set import load_teacher_set
from llgbm_ext.errors import LLGBMError
from llgbm_ext.lora.adapters import WEIGHTS_NAME
from llgbm_ext.teachers.batches import encode_task
from llgbm_ext.teachers.config import TeacherConfig, TeacherError
from llgbm_ext.teachers.multitask import MixtureTrainer, multitask_config, task_format, training_task
from llgbm_ext.teachers.output import adapter_path
from llgbm_ext.teachers.pipeline import task_groups, train_teachers
from llgbm_ext.teachers.tasks import load_teacher_tasks
from llgbm_ext.teachers.train import GroupTrainer

FOOD, ANIMAL, COLOUR = "category_food", "category_animal", "category_colour"


def _config(model_dir, tasks, **overrides):
    base = dict(warmup_steps=4, snapshot_every=2, snapshots=2, batch_size=3, lr=2e-2, lr_warmup=1, max_length=48,
                save_every=4, eval_limit=0, probes=None)
    return TeacherConfig(base_model=str(model_dir), tasks=tasks, **{**base, **overrides})


def test_objective_of_and_digest():
    config = TeacherConfig(base_model="tiny", tasks=(FOOD, ANIMAL), task_objectives=(f"{ANIMAL}=choice",))
    assert config.objective_of(FOOD) == "lm" and config.objective_of(ANIMAL) == "choice"
    plain = TeacherConfig(base_model="tiny", tasks=(FOOD, ANIMAL))
    assert "task_objectives" not in plain.training_digest()  # runs from before per-task objectives still continue
    assert config.digest() != plain.digest()


@pytest.mark.parametrize("entries, message", [
    (("category_animal:choice",), "write TASK=OBJECTIVE"),
    (("category_animal=kl",), "write TASK=OBJECTIVE"),
    (("word_food=choice",), "'word_food' is not one of the tasks"),
    (("category_animal=choice", "category_animal=lm"), "name a task twice"),
])
def test_bad_task_objectives_are_refused(entries, message):
    with pytest.raises(TeacherError, match=message):
        TeacherConfig(base_model="tiny", tasks=(FOOD, ANIMAL), task_objectives=entries)


def test_groups_hold_one_objective(tiny_model, tiny_model_dir):
    config = TeacherConfig(base_model="tiny", tasks=(FOOD, ANIMAL, COLOUR), tasks_per_group=2,
                           task_objectives=(f"{ANIMAL}=choice",))
    tasks = load_teacher_tasks(config.tasks, None, 8, with_test=False)
    assert [[t.name for t in g] for g in task_groups(tasks, config)] == [[FOOD, COLOUR], [ANIMAL]]
    model, tokenizer = tiny_model
    from llgbm_ext.teachers.pipeline import prompt_format, teacher_layout

    encoded = [encode_task(t.task, tokenizer, prompt_format(config), 48, tokenizer.pad_token_id) for t in tasks[:2]]
    layout = teacher_layout(tiny_model_dir, config)
    with pytest.raises(TeacherError, match="one group trains with one objective, not choice and lm"):
        GroupTrainer(model, layout, encoded, config, "unused")


def _final(out, task, config):
    return load_file(str(out / adapter_path(task, config.snapshots - 1) / WEIGHTS_NAME))


def test_a_mixed_run_trains_each_task_as_a_run_of_its_objective_would(tiny_model_dir, tmp_path):
    mixed = _config(tiny_model_dir, (FOOD, ANIMAL), task_objectives=(f"{ANIMAL}=choice",))
    train_teachers(mixed, tmp_path / "mixed", progress=False)
    manifest = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    assert {t: info["objective"] for t, info in manifest["tasks"].items()} == {FOOD: "lm", ANIMAL: "choice"}

    lm = _config(tiny_model_dir, (FOOD,))
    choice = _config(tiny_model_dir, (ANIMAL,), objective="choice")
    train_teachers(lm, tmp_path / "lm", progress=False)
    train_teachers(choice, tmp_path / "choice", progress=False)
    for task, alone in ((FOOD, "lm"), (ANIMAL, "choice")):
        got, want = _final(tmp_path / "mixed", task, mixed), _final(tmp_path / alone, task, mixed)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), task


def test_the_multitask_lora_weighs_each_objective_by_its_tasks(tiny_model, tiny_model_dir, tmp_path):
    train_teachers(_config(tiny_model_dir, (FOOD, ANIMAL, COLOUR), task_objectives=(f"{ANIMAL}=choice",)),
                   tmp_path / "t", progress=False)
    teachers = load_teacher_set(tmp_path / "t")
    config = multitask_config(teachers, [FOOD, ANIMAL, COLOUR], steps=2, batch=6, seed=0)
    assert config.objective == "lm" and config.task_objectives == (f"{ANIMAL}=choice",)
    model, tokenizer = tiny_model

    def trainer(tasks, cfg, name):
        encoded = [encode_task(training_task(t, None), tokenizer, task_format(teachers, t), 48, tokenizer.pad_token_id,
                               cfg.objective_of(t)) for t in tasks]
        return MixtureTrainer(model, teachers.layout, encoded, cfg, tmp_path / name)

    both = trainer([FOOD, ANIMAL, COLOUR], config, "both")
    lm_only = trainer([FOOD, COLOUR], multitask_config(teachers, [FOOD, COLOUR], 2, 4, 0), "lm")
    choice_only = trainer([ANIMAL], multitask_config(teachers, [ANIMAL], 2, 2, 0), "choice")
    assert choice_only.config.objective == "choice" and lm_only.config.batch_size == both.config.batch_size == 2
    losses = [t.backward(0) for t in (both, lm_only, choice_only)]
    assert torch.allclose(losses[0], 2 / 3 * losses[1] + 1 / 3 * losses[2], atol=1e-5)
    for proj, (_, b) in both.factors.items():  # B: A's gradient is 0 while B is (PEFT's initialisation)
        expected = 2 / 3 * lm_only.factors[proj][1].grad + 1 / 3 * choice_only.factors[proj][1].grad
        assert torch.allclose(b.grad, expected, atol=1e-6) and b.grad.abs().max() > 0


def test_cli_expands_families_and_refuses_bad_entries():
    def parse(*extra):
        return config_from_args(build_parser().parse_args(
            ["teachers", "--base-model", "tiny", "--synthetic", "--tasks", "word", "--out", "x", *extra]))

    config = parse("--task-objective", "word=choice")
    assert config.task_objectives and all(config.objective_of(t) == "choice" for t in config.tasks)
    assert parse("--task-objective", "word_food=lm+choice").objective_of("word_food") == "lm+choice"
    with pytest.raises(LLGBMError, match="--task-objective word_food: write TASK=OBJECTIVE"):
        parse("--task-objective", "word_food")
