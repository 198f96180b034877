"""Comparisons of generator variants (demo and ablations): runs are cached, rows and summaries are sound."""

import json
import math

import pytest

from fake_teachers import write_fake_teachers
from llgbm_ext.cli import main
from llgbm_ext.data.synthetic import TASK_FAMILIES
from llgbm_ext.experiments.comparison import (
    ComparisonConfig, add_recovery, difference_table, in_distribution_tasks, markdown_table, paired_differences,
    run_comparison, summarise, task_table,
)

FIRST, SECOND, THIRD = list(TASK_FAMILIES)[:3]  # synthetic task names, so their test splits exist

FAST = ("encoder.kind=base-model", "encoder.model=tiny", "generator.embed_dim=128", "device=cpu",
        "steps=2", "batch_size=2", "save_every=2")
MULTITASK_FAST = dict(multitask_lora_steps=2, multitask_lora_batch=2)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return write_fake_teachers(tmp_path_factory.mktemp("teachers"), tasks=(FIRST, SECOND, THIRD))


def test_comparison_rows_and_cache(teachers, tmp_path, monkeypatch):
    cfg = ComparisonConfig(teachers=str(teachers), overrides=FAST, held_out=(THIRD,), eval_limit=4, samples=2,
                           out_dir=str(tmp_path), controls=("llgbm",), **MULTITASK_FAST)
    rows, summary = run_comparison(cfg, progress=False)
    models = {r["model"] for r in rows}
    assert models == {"base", "teacher", "weight_only", "llgbm", "llgbm (mismatched prompts)", "llgbm (random prompts)",
                      "multitask_lora"}
    # in-distribution by default: the first training task of the (one) family
    assert {(r["task"], r["split"]) for r in rows} == {(THIRD, "held-out"), (FIRST, "in-distribution")}
    teacher = next(r for r in rows if r["model"] == "teacher" and r["task"] == THIRD)
    assert teacher["cos_own"] > 0.9 and teacher["top1"] == 1.0  # a teacher is nearest its own task
    assert 0.5 < teacher["norm_ratio"] < 2.0  # its last snapshot against the mean of its snapshots
    assert all(0.0 <= r["accuracy"] <= 1.0 and "recovery" in r for r in rows)
    multitask = [r for r in rows if r["model"] == "multitask_lora"]
    assert len(multitask) == 2 and all(r["seed"] == 0 and r["norm_ratio"] > 0 for r in multitask)
    assert (tmp_path / "runs" / "multitask_lora" / "seed0" / "adapter_model.safetensors").is_file()
    for name in ("results.json", "results.csv", "report.md", "comparison.png"):
        assert (tmp_path / name).is_file()
    report = (tmp_path / "report.md").read_text()
    assert "## Held-out tasks" in report and "## In-distribution tasks" in report
    assert "| llgbm |" in report and "| multitask_lora |" in report and "recovery: (accuracy − base)" in report
    assert json.loads((tmp_path / "results.json").read_text())["config"]["eval_in_distribution"] == [FIRST]

    import llgbm_ext.teachers.multitask as multitask_module
    import llgbm_ext.training.trainer as trainer_module

    def no_training(*args, **kwargs):
        raise AssertionError("a complete run was trained again")

    monkeypatch.setattr(trainer_module.Trainer, "train", no_training)
    monkeypatch.setattr(multitask_module.MixtureTrainer, "train_step", no_training)
    run_comparison(cfg, progress=False)  # complete runs and multitask LoRAs are reused


def test_summary_mean_and_std_over_seeds():
    rows = [{"model": "m", "split": "held-out", "seed": s, "task": t, "accuracy": a}
            for s, t, a in [(0, "x", 0.5), (0, "y", 0.7), (1, "x", 0.3), (1, "y", 0.5)]]
    (entry,) = summarise(rows)
    assert entry["seeds"] == 2 and abs(entry["accuracy"] - 0.5) < 1e-12  # seed means 0.6 and 0.4
    assert abs(entry["accuracy_std"] - 0.1414213) < 1e-6


def test_ablate_cli(teachers, tmp_path, capsys):
    config = tmp_path / "ablate.yaml"
    config.write_text(json.dumps({
        "teachers": str(teachers), "overrides": list(FAST), "held_out": [SECOND], "seeds": [0, 1], "eval_limit": 4,
        "samples": 1, "controls": [], "out_dir": str(tmp_path / "out"), **MULTITASK_FAST,
        "variants": [{"name": "delta_only", "overrides": ["loss.mode=delta_only"]}],
    }))
    assert main(["ablate", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| delta_only |" in out and "| multitask_lora |" in out and "±" in out
    assert f"Held-out tasks ({SECOND})" in out and f"In-distribution tasks ({FIRST})" in out
    csv = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert csv[0].startswith("model,seed,task") and csv[0].endswith(",recovery,norm_ratio")
    assert sum(f",{SECOND}," in line for line in csv) == 6  # base, teacher, 2 seeds of delta_only and multitask_lora
    assert main(["ablate", "--config", str(config), f"teachers={tmp_path / 'none'}"]) == 2


def test_a_diverging_run_is_reported_and_left_out(teachers, tmp_path, monkeypatch, capsys):
    import llgbm_ext.training.trainer as trainer_module

    def diverge(self):
        raise trainer_module.DivergedError(f"{self.out}: training diverged at step 1")

    cfg = ComparisonConfig(teachers=str(teachers), overrides=FAST, held_out=(THIRD,), eval_limit=2, samples=1,
                           out_dir=str(tmp_path), controls=(), seeds=(0,), multitask_lora=False)
    real_train = trainer_module.Trainer.train
    monkeypatch.setattr(trainer_module.Trainer, "train",
                        lambda self: diverge(self) if self.cfg.loss.mode == "multitask" else real_train(self))
    rows, _ = run_comparison(cfg, progress=False)
    assert {r["model"] for r in rows} == {"base", "teacher", "weight_only"}
    assert "warning: " in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["diverged"] == ["llgbm seed0"]
    assert "Diverged (non-finite loss; left out of the tables): llgbm seed0." in (tmp_path / "report.md").read_text()


def test_non_finite_loss_raises_diverged_error(teachers, tmp_path):
    from llgbm_ext.config import load_config
    from llgbm_ext.errors import LLGBMError
    from llgbm_ext.training import TrainingConfig
    from llgbm_ext.training.trainer import Trainer

    overrides = [*FAST, f"data.teachers={teachers}", f"out_dir={tmp_path}", "loss.mode=weight_only",
                 "optim.lr=1e30", "optim.warmup_steps=0"]  # one step sends the weights to ~1e30
    cfg = load_config(TrainingConfig, None, overrides)
    trainer = Trainer(cfg, progress=False).setup()
    with pytest.raises(LLGBMError, match="training diverged at step 1"):
        trainer.train()
    trainer.cleanup()


def _rows(model, seed, accuracies, examples=100):
    return [{"model": model, "seed": seed, "task": task, "split": "held-out", "accuracy": a, "examples": examples}
            for task, a in accuracies.items()]


def test_recovery_per_row_and_its_aggregation():
    rows = (_rows("base", None, {"x": 0.20, "y": 0.02, "z": 0.50})
            + _rows("teacher", None, {"x": 0.60, "y": 0.03, "z": 0.505})  # y: one example better; z: none
            + _rows("m", 0, {"x": 0.40, "y": 0.03, "z": 0.9}) + _rows("m", 1, {"x": 0.30, "y": 0.02, "z": 0.1}))
    add_recovery(rows)
    got = {(r["model"], r["seed"], r["task"]): r["recovery"] for r in rows}
    assert got[("base", None, "x")] == 0.0 and got[("teacher", None, "x")] == 1.0
    assert got[("m", 0, "x")] == pytest.approx(0.5) and got[("m", 1, "x")] == pytest.approx(0.25)
    # y: one example of gain counts, although 0.03 − 0.02 < 1/100 in floats
    assert got[("m", 0, "y")] == pytest.approx(1.0) and got[("m", 1, "y")] == pytest.approx(0.0)
    assert all(math.isnan(v) for (_, _, task), v in got.items() if task == "z")  # teacher within one example of base
    entry = next(e for e in summarise(rows) if e["model"] == "m")
    # per seed, the mean over x and y (z left out): 0.75 and 0.125; then mean ± std over seeds
    assert entry["recovery"] == pytest.approx(0.4375) and entry["recovery_std"] == pytest.approx(0.4419417, abs=1e-6)
    # over tasks: seed-averaged x = 0.375, y = 0.5
    assert entry["recovery_task_std"] == pytest.approx(0.0883883, abs=1e-6)
    teacher = next(e for e in summarise(rows) if e["model"] == "teacher")
    assert teacher["recovery"] == 1.0 and teacher["recovery_std"] == 0.0 and teacher["seeds"] == 1


def test_paired_differences_by_seed_with_hand_numbers():
    rows = _rows("base", None, {"x": 0.2, "y": 0.0, "z": 0.5}) + _rows("teacher", None, {"x": 0.6, "y": 1.0, "z": 0.5})
    rows += _rows("m", 0, {"x": 0.6, "y": 0.5}) + _rows("m", 1, {"x": 0.4, "y": 1.0})  # recovery 1, .5 | .5, 1
    rows += _rows("b", 0, {"x": 0.2, "y": 0.5}) + _rows("b", 1, {"x": 0.4, "y": 0.0}) + _rows("b", 2, {"x": 0.6})
    (entry,) = paired_differences(add_recovery(rows), [("m", "b")])
    # per seed, over the tasks both have (z: recovery undefined): seed 0 (1 − 0 + .5 − .5) / 2 = .5,
    # seed 1 (.5 − .5 + 1 − 0) / 2 = .5; seed 2: no m
    assert (entry["split"], entry["seeds"]) == ("held-out", 2)
    assert entry["difference"] == pytest.approx(0.5) and entry["std"] == 0.0 and entry["margin"] == math.inf
    rows += _rows("m", 2, {"x": 0.2})  # seed 2: 0 − 1 = −1
    (entry,) = paired_differences(add_recovery(rows), [("m", "b")])
    assert entry["difference"] == pytest.approx(0.0) and entry["std"] == pytest.approx(math.sqrt(0.75))
    assert entry["margin"] == pytest.approx(0.0)
    assert difference_table([entry]).splitlines()[-1] == "| m − b | held-out | 3 | 0.00 ± 0.87 | 0.0 |"


def test_markdown_tables_show_recovery_and_norm_ratio():
    rows = _rows("base", None, {"x": 0.2}) + _rows("teacher", None, {"x": 0.6})
    rows += [{**r, "cos_own": c, "norm_ratio": n, "specificity": 0.1, "top1": 0.0}
             for r, c, n in zip(_rows("m", 0, {"x": 0.4}) + _rows("m", 1, {"x": 0.3}), (0.5, 0.7), (0.8, 1.2))]
    table = markdown_table(summarise(add_recovery(rows)), "held-out")
    header, _, *lines = table.splitlines()
    assert header == "| model | accuracy % | recovery | Δ cos to own teacher | norm ratio | specificity | top-1 |"
    assert lines[0] == "| base | 20.0 | 0.00 | – | – | – | – |"
    assert lines[2] == ("| m | 35.0 ± 7.1 | 0.38 ± 0.18 | 0.600 ± 0.141 | 1.00 ± 0.28 | 0.100 ± 0.000 "
                        "| 0.000 ± 0.000 |")
    assert markdown_table(summarise(rows), "in-distribution").count("\n") == 1  # no row of another split
    per_task = task_table(rows, "held-out").splitlines()
    assert per_task[0] == "| model | x |" and per_task[-1] == "| m | 35.0 (0.38) |"


def test_auto_in_distribution_picks_the_first_training_task_of_each_family():
    from llgbm_ext.data.teacher_set import TeacherSet
    from llgbm_ext.lora.layout import get_layout

    def teacher_set(tasks):
        return TeacherSet(root=None, model_name="tiny", layout=get_layout("tiny"), entries=[], tasks=tasks)

    synthetic = teacher_set({"kind_1": {"family": "kind"}, "kind_2": {"family": "kind"}, "rank_1": {},
                             "category_food": {"family": "category"}, "category_body": {"family": "category"},
                             "rank_2": {}})
    cfg = ComparisonConfig(held_out=("kind_1", "category_food"))
    assert in_distribution_tasks(cfg, synthetic) == ("kind_2", "rank_1", "category_body")  # rank: the suite's family
    empty = ComparisonConfig(held_out=("kind_1",), eval_in_distribution=())
    assert in_distribution_tasks(empty, synthetic)[0] == "kind_2"
    explicit = ComparisonConfig(held_out=("kind_1",), eval_in_distribution=("rank_2",))
    assert in_distribution_tasks(explicit, synthetic) == ("rank_2",)
    real = teacher_set({"arc_e": {}, "boolq": {}, "piqa": {}})
    assert in_distribution_tasks(ComparisonConfig(held_out=("arc_e",)), real) == ("boolq",)


def test_config_refuses_a_variant_named_like_a_reference_row():
    from llgbm_ext.errors import LLGBMError
    from llgbm_ext.experiments.comparison import Variant

    with pytest.raises(LLGBMError, match="'multitask_lora' names a reference row"):
        ComparisonConfig(variants=(Variant("multitask_lora"),))
    with pytest.raises(LLGBMError, match="multitask_lora_steps must be at least 1"):
        ComparisonConfig(multitask_lora_steps=0)
    with pytest.raises(LLGBMError, match="multitask_lora_lr must be positive"):
        ComparisonConfig(multitask_lora_lr=0.0)


def test_multitask_lora_lr_overrides_the_teachers_lr(teachers):
    from llgbm_ext.data.teacher_set import load_teacher_set
    from llgbm_ext.experiments.comparison import _multitask_config
    from llgbm_ext.teachers.config import TeacherConfig

    teacher_set = load_teacher_set(teachers)
    default = _multitask_config(ComparisonConfig(teachers=str(teachers), **MULTITASK_FAST), teacher_set, 0)
    assert default.lr == TeacherConfig.lr
    faster = _multitask_config(ComparisonConfig(teachers=str(teachers), multitask_lora_lr=6e-3, **MULTITASK_FAST),
                               teacher_set, 0)
    assert faster.lr == 6e-3 and faster.total_steps == default.total_steps == 2


def test_multitask_lora_step_in_length_chunks_equals_one_forward(teachers, tmp_path, monkeypatch):
    """Under the lm objective a step runs its sequences sorted by length in LM_CHUNKS forwards; each chunk's
    loss weighted by its share of the answer tokens gives the loss and gradient of one forward."""
    import torch

    from llgbm_ext.data.teacher_set import load_teacher_set
    from llgbm_ext.models.registry import load_base_model
    from llgbm_ext.teachers import multitask as mt
    from llgbm_ext.teachers.batches import encode_task

    model, tokenizer = load_base_model("tiny")
    teacher_set = load_teacher_set(teachers)
    tasks = [FIRST, "shift_2", "digit_first_1"]  # sequences of 14, 12 and 41 tokens
    config = mt.multitask_config(teacher_set, tasks, steps=2, batch=12, seed=0)
    encoded = [encode_task(mt.training_task(t, None), tokenizer, mt.task_format(teacher_set, t), config.max_length,
                           tokenizer.pad_token_id) for t in tasks]
    trainers = {}
    for chunks in (1, 3):
        monkeypatch.setattr(mt, "LM_CHUNKS", chunks)
        trainer = mt.MixtureTrainer(model, teacher_set.layout, encoded, config, tmp_path / str(chunks))
        with torch.no_grad():  # B ≠ 0, so that A gets a gradient too
            for _, b in trainer.factors.values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        trainers[chunks] = (trainer, trainer.backward(0))
    assert trainers[1][0].batch(0).attention_mask.sum(1).unique().numel() == 3  # the chunks differ in width
    (one, one_loss), (chunked, chunked_loss) = trainers[1], trainers[3]
    assert torch.allclose(one_loss, chunked_loss, atol=1e-6)
    for proj, pair in one.factors.items():
        for x, y in zip(pair, chunked.factors[proj]):
            assert x.grad.abs().max() > 0 and torch.allclose(x.grad, y.grad, atol=1e-6, rtol=1e-4)


def test_multitask_lora_trains_on_the_mixture_and_is_cached(teachers, tmp_path, monkeypatch):
    import shutil

    import torch

    from llgbm_ext.data.teacher_set import load_teacher_set
    from llgbm_ext.lora.adapters import load_adapter, save_peft_adapter
    from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
    from llgbm_ext.models.registry import load_base_model
    from llgbm_ext.teachers import multitask as mt
    from llgbm_ext.teachers.batches import encode_task

    model, tokenizer = load_base_model("tiny")
    teacher_set = load_teacher_set(teachers)
    config = mt.multitask_config(teacher_set, [FIRST, SECOND], steps=30, batch=8, seed=0)
    assert config.batch_size == 4 and config.total_steps == 30

    # a step draws the same number of sequences from every task
    encoded = [encode_task(mt.training_task(t, None), tokenizer, mt.task_format(teacher_set, t), config.max_length,
                           tokenizer.pad_token_id) for t in (FIRST, SECOND)]
    batch = mt.MixtureTrainer(model, teacher_set.layout, encoded, config, tmp_path).batch(0)
    width = batch.input_ids.shape[1]
    assert batch.input_ids.shape[0] == 8
    for k, task in enumerate(encoded):
        rows = batch.input_ids[4 * k : 4 * (k + 1)]
        ids = torch.nn.functional.pad(task.ids, (0, max(0, width - task.ids.shape[1])), value=task.pad_id)[:, :width]
        assert all((ids == row).all(1).any() for row in rows), task.name

    out = tmp_path / "mtl"
    assert mt.train_multitask_lora(model, tokenizer, teacher_set, config, out, progress=False) == out
    losses = json.loads((out / mt.LOSSES).read_text())["loss"]
    assert len(losses) == 30 and sum(losses[-5:]) < 0.8 * sum(losses[:5])
    adapter = load_adapter(out, teacher_set.layout)
    assert any(v.abs().max() > 0 for k, v in adapter.state_dict.items() if "lora_B" in k)

    stamp = (out / "adapter_model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(mt.MixtureTrainer, "train_step", lambda self: pytest.fail("a cached adapter was retrained"))
    mt.train_multitask_lora(model, tokenizer, teacher_set, config, out, progress=False)
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    changed = mt.multitask_config(teacher_set, [FIRST, SECOND], steps=3, batch=8, seed=0)
    mt.train_multitask_lora(model, tokenizer, teacher_set, changed, out, progress=False)
    assert len(json.loads((out / mt.LOSSES).read_text())["loss"]) == 3

    # with a shared initial adapter recorded, training starts from it
    shared = tmp_path / "teachers"
    shutil.copytree(teachers, shared)
    init = state_dict_from_factors(random_factors(teacher_set.layout, generator=torch.Generator().manual_seed(1)),
                                   teacher_set.layout)
    save_peft_adapter({k: v * (".lora_A." in k) for k, v in init.items()}, shared / "init", teacher_set.layout)
    manifest = json.loads((shared / "manifest.json").read_text())
    manifest["init"] = {"kind": "shared", "seed": 0, "path": "init"}
    (shared / "manifest.json").write_text(json.dumps(manifest))
    one_step = mt.multitask_config(teacher_set, [FIRST, SECOND], steps=1, batch=8, seed=0)
    trained = load_adapter(mt.train_multitask_lora(model, tokenizer, load_teacher_set(shared), one_step,
                                                   tmp_path / "from_init", progress=False), teacher_set.layout)
    a_keys = [k for k in init if ".lora_A." in k]
    assert max((trained.state_dict[k] - init[k]).abs().max() for k in a_keys) < 1e-3  # one step of lr 2e-3 / 10


def test_validation_and_excluded_tasks_are_never_trained_on(teachers):
    from llgbm_ext.data.teacher_set import load_teacher_set
    from llgbm_ext.experiments.comparison import _split, training_config

    cfg = ComparisonConfig(teachers=str(teachers), overrides=FAST, validation=(SECOND,), exclude=(THIRD,))
    for variant in cfg.variants:
        assert set(training_config(cfg, variant, 0).data.held_out) == {SECOND, THIRD}
    assert in_distribution_tasks(cfg, load_teacher_set(str(teachers))) == (FIRST,)
    assert [_split(cfg, t) for t in (FIRST, SECOND)] == ["in-distribution", "validation"]
    from llgbm_ext.errors import LLGBMError
    from llgbm_ext.experiments.comparison import train_comparison

    with pytest.raises(LLGBMError, match="needs held-out or validation tasks"):
        train_comparison(ComparisonConfig(teachers=str(teachers), exclude=(THIRD,)), progress=False)


def test_schedule_starts_one_job_of_each_kind_then_longest_first():
    from llgbm_ext.experiments.comparison import schedule

    jobs = [(("weight_only", s), 1400) for s in range(2)] + [(("llgbm", s), 7000 + s) for s in range(3)]
    jobs += [(("multitask_lora", s), 6300) for s in range(2)]
    order = [key for key, _ in schedule(jobs)]
    assert order[:3] == [("llgbm", 2), ("multitask_lora", 0), ("weight_only", 0)]  # the longest of each kind
    assert order[3:] == [("llgbm", 1), ("llgbm", 0), ("multitask_lora", 1), ("weight_only", 1)]
    assert sorted(order) == sorted(key for key, _ in jobs) and schedule([]) == []
