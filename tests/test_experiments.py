"""Comparisons of generator variants (demo and ablations): runs are cached, rows and summaries are sound."""

import json

import pytest

from fake_teachers import write_fake_teachers
from llgbm_ext.cli import main
from llgbm_ext.data.synthetic import TASK_FAMILIES
from llgbm_ext.experiments.comparison import ComparisonConfig, run_comparison, summarise

FIRST, SECOND, THIRD = list(TASK_FAMILIES)[:3]  # synthetic task names, so their test splits exist

FAST = ("encoder.kind=base-model", "encoder.model=tiny", "generator.embed_dim=128", "device=cpu",
        "steps=2", "batch_size=2", "save_every=2")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return write_fake_teachers(tmp_path_factory.mktemp("teachers"), tasks=(FIRST, SECOND, THIRD))


def test_comparison_rows_and_cache(teachers, tmp_path, monkeypatch):
    cfg = ComparisonConfig(teachers=str(teachers), overrides=FAST, held_out=(THIRD,), eval_in_distribution=(FIRST,),
                           eval_limit=4, samples=2, out_dir=str(tmp_path), controls=("llgbm",))
    rows, summary = run_comparison(cfg, progress=False)
    models = {r["model"] for r in rows}
    assert models == {"base", "teacher", "weight_only", "llgbm", "llgbm (mismatched prompts)", "llgbm (random prompts)"}
    assert {r["split"] for r in rows} == {"held-out", "in-distribution"}
    teacher = next(r for r in rows if r["model"] == "teacher" and r["task"] == THIRD)
    assert teacher["cos_own"] > 0.9 and teacher["top1"] == 1.0  # a teacher is nearest its own task
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    for name in ("results.json", "results.csv", "report.md", "comparison.png"):
        assert (tmp_path / name).is_file()
    assert "| llgbm |" in (tmp_path / "report.md").read_text()

    import llgbm_ext.training.trainer as trainer_module

    def no_training(*args, **kwargs):
        raise AssertionError("a complete run was trained again")

    monkeypatch.setattr(trainer_module.Trainer, "train", no_training)
    run_comparison(cfg, progress=False)  # complete runs are reused


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
        "samples": 1, "controls": [], "out_dir": str(tmp_path / "out"),
        "variants": [{"name": "delta_only", "overrides": ["loss.mode=delta_only"]}],
    }))
    assert main(["ablate", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| delta_only |" in out and "±" in out
    csv = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert csv[0].startswith("model,seed,task") and sum(f",{SECOND}," in line for line in csv) == 4  # base, teacher, 2 seeds
    assert main(["ablate", "--config", str(config), f"teachers={tmp_path / 'none'}"]) == 2


def test_a_diverging_run_is_reported_and_left_out(teachers, tmp_path, monkeypatch, capsys):
    import llgbm_ext.training.trainer as trainer_module

    def diverge(self):
        raise trainer_module.DivergedError(f"{self.out}: training diverged at step 1")

    cfg = ComparisonConfig(teachers=str(teachers), overrides=FAST, held_out=(THIRD,), eval_limit=2, samples=1,
                           out_dir=str(tmp_path), controls=(), seeds=(0,))
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
