"""``llgbm demo --quick`` end to end (the CI smoke test of the README's main job), and its caching."""

import importlib.util
import json

import pytest

from llgbm_ext.cli import main
from llgbm_ext.data.synthetic import HELD_OUT, held_out_tasks, validation_tasks
from llgbm_ext.experiments.demo import PLANS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, main(["demo", "--quick", "--out", str(out), "--no-progress"])


def test_quick_demo_runs_every_stage(quick_demo, capsys):
    out, code = quick_demo
    assert code == 0
    manifest = json.loads((out / "teachers" / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == sorted(PLANS["quick"].tasks)
    # teachers learn the tasks the base model does not solve (colour it nearly solves already)
    hard = [t for t in manifest["tasks"].values() if t["base_accuracy"] < 0.5]
    assert len(hard) >= 5 and all(t["teacher_accuracy"] > t["base_accuracy"] + 0.3 for t in hard)
    assert manifest["init"]["kind"] == "shared"  # aligned teachers by default
    for variant in ("weight_only", "llgbm"):
        assert (out / "runs" / variant / "seed0" / "metrics.jsonl").is_file()
    assert (out / "runs" / "multitask_lora" / "seed0" / "adapter_model.safetensors").is_file()
    results = json.loads((out / "results.json").read_text())
    for split in ("held-out", "in-distribution"):
        summary = {e["model"]: e for e in results["summary"] if e["split"] == split}
        assert {"base", "teacher", "weight_only", "llgbm", "multitask_lora"} <= set(summary), split
    held = {e["model"]: e for e in results["summary"] if e["split"] == "held-out"}
    assert {"llgbm (mismatched prompts)", "llgbm (random prompts)"} <= set(held)
    teacher_rows = [r for r in results["rows"] if r["model"] == "teacher"]
    assert all(r["recovery"] == pytest.approx(1.0) for r in teacher_rows if r["recovery"] is not None)
    # the behaviour signal moves the generated adapters' outputs toward the teachers' on their own tasks
    indist = {e["model"]: e for e in results["summary"] if e["split"] == "in-distribution"}
    assert indist["llgbm"]["accuracy"] > indist["base"]["accuracy"]
    assert (out / "report.md").is_file() and "## In-distribution tasks" in (out / "report.md").read_text()
    csv_header = (out / "results.csv").read_text().splitlines()[0]
    assert "recovery" in csv_header and "norm_ratio" in csv_header


def test_quick_demo_draws_its_plots(quick_demo):
    """The comparison and each generator run's loss curves (drawn at its last checkpoint), wherever
    matplotlib is installed (``bash scripts/setup.sh`` installs it)."""
    out, code = quick_demo
    assert code == 0
    plots = [out / "comparison.png"] + [out / "runs" / v / "seed0" / "loss_curves.png" for v in ("weight_only", "llgbm")]
    if importlib.util.find_spec("matplotlib") is None:
        assert not any(png.exists() for png in plots)
        return
    for png in plots:  # matplotlib is installed: every plot must be there
        assert png.is_file() and png.read_bytes()[:8] == PNG, png
    for variant in ("weight_only", "llgbm"):
        run = out / "runs" / variant / "seed0"
        assert (run / "loss_curves.png").stat().st_mtime_ns >= (run / "metrics.jsonl").stat().st_mtime_ns


def test_second_run_reuses_every_stage(quick_demo, capsys):
    out, _ = quick_demo
    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| llgbm |" in printed and "| teacher |" in printed and "| multitask_lora |" in printed
    assert "(held out)" in printed and "LLGBM here is:" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps  # nothing retrained


def test_plans_hold_out_tasks_they_train_teachers_for():
    for name, plan in PLANS.items():
        left_out = set(plan.held_out) | set(plan.validation)
        assert set(plan.held_out) < set(plan.tasks) and left_out < set(plan.tasks), name
        assert not set(plan.held_out) & set(plan.validation), name
        assert not left_out & set(plan.eval_in_distribution), name  # in-distribution tasks are trained on
    default = PLANS["default"]  # suite v3, its held-out and validation members, at least 40 training tasks
    assert default.held_out == held_out_tasks(3) and default.validation == validation_tasks(3)
    assert len(default.tasks) - len(default.held_out) - len(default.validation) >= 40 and default.seeds == 3
    assert PLANS["v1"].held_out == ("kind_3", "category_food", "rank_2")  # suite v1's, for its families
    assert set(PLANS["v1"].held_out) < set(HELD_OUT)
    v2 = PLANS["v2"]  # the default's budgets without the none family; v2's held-out members stay held out
    assert v2.held_out == held_out_tasks(2) and set(v2.held_out) < set(default.held_out)
    assert set(v2.tasks) < set(default.tasks) and v2.training == default.training and v2.seeds == 3
    from llgbm_ext.cli.demo import plan_and_out

    assert plan_and_out(_demo_args()) == (default, "runs/demo")
    assert plan_and_out(_demo_args("--v2")) == (v2, "runs/demo-v2")


# --real --hold-out, the held-out evaluation limit and the sampling errors (no SmolLM2 run: plans, fake teachers).

def _demo_args(*argv):
    from llgbm_ext.cli import build_parser

    return build_parser().parse_args(["demo", *argv])


def test_real_demo_holds_out_any_commonsense_task():
    from pathlib import Path

    from llgbm_ext.cli.demo import plan_and_out
    from llgbm_ext.experiments.demo import REAL_TASKS, comparison_config

    assert plan_and_out(_demo_args("--real")) == (PLANS["real"], "runs/demo-real")  # ARC-e by default
    for task in REAL_TASKS:
        plan, out = plan_and_out(_demo_args("--real", "--hold-out", task))
        assert plan.held_out == (task,) and plan.tasks == REAL_TASKS and plan.real_data
        assert out == ("runs/demo-real" if task == "arc_e" else f"runs/demo-real-{task}")
        cfg = comparison_config(plan, Path(out))
        assert cfg.held_out == (task,) and cfg.held_out_limit >= 200 and cfg.eval_limit == 32
        assert cfg.data_dir == str(Path(out) / "data") and cfg.teachers == str(Path(out) / "teachers")
    plan, out = plan_and_out(_demo_args("--real", "--hold-out", "piqa", "--out", "elsewhere"))
    assert plan.held_out == ("piqa",) and out == "elsewhere"
    assert comparison_config(PLANS["quick"], Path("q")).held_out_limit is None  # the other plans as before


def test_task_objective_changes_those_teachers_and_the_default_folder():
    from llgbm_ext.cli.demo import plan_and_out
    from llgbm_ext.teachers.config import TeacherConfig

    shipped = TeacherConfig(base_model="smollm2-135m", tasks=PLANS["real"].tasks, **PLANS["real"].teacher)
    assert [shipped.objective_of(t) for t in PLANS["real"].tasks] == ["lm", "choice", "lm", "choice", "lm"]
    plan, out = plan_and_out(_demo_args("--real", "--task-objective", "OBQA=lm", "piqa=choice"))  # names as --tasks
    assert out == "runs/demo-real-obqa-lm-piqa-choice"
    assert plan.teacher["task_objectives"] == ("arc_c=choice", "obqa=lm", "piqa=choice")  # the plan's, ours win
    assert {k: v for k, v in plan.teacher.items() if k != "task_objectives"} == {
        k: v for k, v in PLANS["real"].teacher.items() if k != "task_objectives"}
    config = TeacherConfig(base_model=plan.base_model, tasks=plan.tasks, **plan.teacher)
    assert [config.objective_of(t) for t in plan.tasks] == ["lm", "choice", "lm", "lm", "choice"]
    plan, out = plan_and_out(_demo_args("--quick", "--task-objective", "word=lm+choice", "--out", "x"))
    assert out == "x" and all(TeacherConfig(base_model="tiny", tasks=plan.tasks, **plan.teacher).objective_of(t)
                              == "lm+choice" for t in plan.tasks)


@pytest.mark.parametrize("argv, message", [
    (["--hold-out", "boolq"], "--hold-out needs --real"),
    (["--quick", "--hold-out", "boolq"], "--hold-out needs --real"),
    (["--real", "--hold-out", "hellaswag"], "--hold-out: unknown task 'hellaswag'"),
    (["--real", "--task-objective", "hellaswag=choice"], "'hellaswag' is not one of the tasks"),
    (["--real", "--task-objective", "obqa"], "--task-objective obqa: write TASK=OBJECTIVE"),
])
def test_hold_out_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    from llgbm_ext.experiments import demo

    def no_demo(*args, **kwargs):
        raise AssertionError("the demo started")

    monkeypatch.setattr(demo, "run_demo", no_demo)
    assert main(["demo", *argv, "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()  # refused before any work


def test_held_out_limit_reaches_the_held_out_rows_only(tmp_path):
    from fake_teachers import write_fake_teachers

    from llgbm_ext.data.synthetic import TASK_FAMILIES
    from llgbm_ext.errors import LLGBMError
    from llgbm_ext.experiments.comparison import (
        ComparisonConfig,
        build_evaluator,
        evaluate,
    )

    first, second, third = list(TASK_FAMILIES)[:3]
    teachers = write_fake_teachers(tmp_path / "teachers", tasks=(first, second, third))
    fast = ("encoder.kind=base-model", "encoder.model=tiny", "device=cpu")
    cfg = ComparisonConfig(teachers=str(teachers), overrides=fast, held_out=(third,), eval_limit=3, held_out_limit=5,
                           samples=1, controls=(), multitask_lora=False, out_dir=str(tmp_path))
    rows = evaluate(cfg, {}, build_evaluator(cfg, progress=False))
    examples = {(r["model"], r["task"]): r["examples"] for r in rows}
    assert examples == {("base", third): 5, ("teacher", third): 5, ("base", first): 3, ("teacher", first): 3}
    unset = build_evaluator(ComparisonConfig(teachers=str(teachers), overrides=fast, held_out=(third,), eval_limit=3),
                            progress=False)
    assert unset.accuracy(third, None)[1] == 3  # None: the held-out tasks get eval_limit too
    with pytest.raises(LLGBMError, match="held_out_limit"):
        ComparisonConfig(held_out=(third,), held_out_limit=0)


def test_standard_errors_match_a_hand_computation():
    import math

    from llgbm_ext.eval.uncertainty import binomial_se, recovery_se

    assert binomial_se(0.6, 200) == pytest.approx(math.sqrt(0.6 * 0.4 / 200))
    assert binomial_se(1.0, 32) == 0.0
    # base 50%, teacher 62.5%, model 55% on 32 examples: r = 0.4,
    # se² = (0.2475 + 0.16 · 0.234375 + 0.36 · 0.25) / 32 / 0.125² = 0.75, se = √3 / 2
    assert recovery_se(0.55, 0.5, 0.625, 32) == pytest.approx(math.sqrt(3) / 2)
    assert recovery_se(0.55, 0.5, 0.625, 128) == pytest.approx(math.sqrt(3) / 4)  # halves with 4× the examples
    assert math.isnan(recovery_se(0.55, 0.5, 0.5, 32))  # no gain, no recovery


def test_paired_gain_se_matches_a_hand_computation_and_the_teacher_table_uses_it():
    import math

    from llgbm_ext.cli.teachers import clearly_better, format_table
    from llgbm_ext.errors import LLGBMError
    from llgbm_ext.eval.uncertainty import paired_gain_se

    # differences 1, 0, 0, 1: mean 1/2, sample variance 1/3, SE = sqrt(1/3) / 2
    assert paired_gain_se([1, 1, 0, 1], [0, 1, 0, 0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert paired_gain_se([1, 0, 1], [1, 0, 1]) == 0.0  # same answers: no uncertainty about the gain
    with pytest.raises(LLGBMError, match="two equal lists"):
        paired_gain_se([1, 0], [1])
    rows = [{"task": t, "kind": "mc", "base_accuracy": b, "teacher_accuracy": a, "gain_se": se, "eval_examples": 200,
             "first_loss": 2.0, "final_loss": 1.0}
            for t, b, a, se in (("arc_e", 0.455, 0.62, 0.03), ("piqa", 0.65, 0.67, 0.02), ("obqa", 0.3, 0.27, 0.03))]
    assert [clearly_better(r) for r in rows] == [True, False, False]
    table = format_table(rows)
    assert " +16.5%   3.0%  200 " in table and "teacher better on 2/3 tasks, by more than 2 SE on 1" in table


def test_error_table_gives_accuracy_and_recovery_with_their_errors():
    import math

    from llgbm_ext.eval.uncertainty import error_table

    rows = [{"model": m, "seed": s, "task": "arc_e", "split": "held-out", "accuracy": a, "examples": 32, "recovery": r}
            for m, s, a, r in (("base", None, 0.5, 0.0), ("teacher", None, 0.625, 1.0), ("llgbm", 0, 0.5, 0.0),
                               ("llgbm", 1, 0.6, 0.8))]
    rows += [{"model": "base", "seed": None, "task": "word", "split": "in-distribution", "accuracy": 0.5,
              "examples": 32, "recovery": math.nan}]
    lines = error_table(rows).splitlines()
    assert lines[0] == "| task | model | examples | accuracy % | accuracy SE | recovery | recovery SE |"
    assert lines[2:] == ["| arc_e | base | 32 | 50.0 | 8.8 | – | – |",  # √(0.25 / 32) = 0.0884
                         "| arc_e | teacher | 32 | 62.5 | 8.6 | – | – |",
                         "| arc_e | llgbm | 32 | 55.0 | 8.8 | 0.40 | 0.87 |"]  # the mean over seeds, √3 / 2


def test_quick_demo_reports_the_sampling_errors_once(quick_demo):
    out, code = quick_demo
    assert code == 0
    report = (out / "report.md").read_text()
    assert report.count("## Held-out tasks: sampling error") == 1  # also after the second run
    section = report.split("## Held-out tasks: sampling error")[1]
    assert "| word_not_food | llgbm |" in section and "| recovery SE |" in section
